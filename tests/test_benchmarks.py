"""The benchmarks run end to end (in a tiny mode) and write their JSON."""

import json
from pathlib import Path

from benchmarks import inference


def test_inference_benchmark_tiny(tmp_path: Path) -> None:
    output = tmp_path / "inference.json"
    assert inference.main(["--tiny", "--batch-sizes", "1", "4", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    cases = {(r["mode"], r["batch_size"]) for r in report["results"]}
    assert cases == {(m, b) for m in ("float32", "bfloat16", "int8") for b in (1, 4)}
    for result in report["results"]:
        assert len(result["model_s_runs"]) >= 5
        assert result["images_per_s"] > 0 and result["gemm_peak_gflops"] > 0
        assert result["ratio_to_peak"] > 0
