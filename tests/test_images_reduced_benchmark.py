"""``python -m benchmarks.decode`` runs end to end in its tiny mode and reports what reduced decoding changes."""

import json
from pathlib import Path

from benchmarks import decode


def test_decode_benchmark_tiny(tmp_path: Path) -> None:
    output = tmp_path / "decode.json"
    report = decode.main(["--tiny", "--workdir", str(tmp_path / "work"), "--output", str(output)])

    assert json.loads(output.read_text(encoding="utf-8")) == json.loads(json.dumps(report))
    assert set(report["machine"]["flags_of_note"]) >= {"avx2", "avx512_bf16", "amx_bf16"}
    assert report["decode"]["detector_reduction"] == 4 and report["decode"]["reduced_size"] == [200, 150]
    assert report["decode"]["crop"]["mean_abs_pixel_difference"] < 2.0
    assert report["detector_input"]["boxes_compared"] > 0 and report["detector_input"]["boxes_iou_at_least_0.9"] >= 0.9
    dtype = report["detector_dtype"]
    assert dtype["float32_s"] > 0 and dtype["bfloat16_s"] > 0 and dtype["bf16_boxes_iou_at_least_0.9"] >= 0.9
    assert ("note" in dtype) == (not dtype["bf16_native"])
