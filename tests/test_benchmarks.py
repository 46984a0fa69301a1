"""The benchmarks run end to end (in a tiny mode) and write their JSON.

Speed figures are not judged (they vary with the machine); the int8 top-1 agreement with float32 is.
"""

import json
from pathlib import Path

import pytest

from benchmarks import inference, quantization


def test_throughput_section_tiny(tmp_path: Path) -> None:
    output = tmp_path / "inference.json"
    argv = ["--tiny", "--sections", "throughput", "--modes", "float32", "bfloat16", "int8", "--batch-sizes", "1", "4"]
    assert inference.main([*argv, "--workdir", str(tmp_path), "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    cases = {(r["mode"], r["batch_size"]) for r in report["throughput"]}
    assert cases == {(m, b) for m in ("float32", "bfloat16", "int8") for b in (1, 4)}
    for result in report["throughput"]:
        assert len(result["model_s_runs"]) >= 5 and len(result["gemm_s_runs"]) >= 5
        assert result["images_per_s"] > 0 and result["gemm_peak_gflops"] > 0 and result["ratio_to_peak"] > 0
    assert report["machine"]["threads"] >= 1


def test_repeats_below_five_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        inference.main(["--tiny", "--repeats", "3", "--output", str(tmp_path / "x.json")])


@pytest.mark.slow
def test_every_section_tiny(tmp_path: Path) -> None:
    # About 40 s: subprocesses for peak memory and time to first prediction, a short training run.
    output = tmp_path / "inference.json"
    assert inference.main(["--tiny", "--workdir", str(tmp_path), "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert {"throughput", "load", "first_prediction", "training", "quantization"} <= set(report)
    assert report["load"]["formats"]["pt"]["peak_rss_bytes"] > 0
    assert report["first_prediction"]["seconds"] > 0 and len(report["first_prediction"]["runs"]) >= 5
    # int8 keeps float32's top-1 on the trained model (README: 1.000; target 99%). Measured on a model that learned
    # something (chance: 0.1), whose outputs are not near-uniform: there the agreement is meaningful.
    trained = report["quantization"]["trained_model"]
    assert trained["held_out_top1"] >= 0.2
    assert trained["agreement"]["int8"]["top1_agreement"] >= 0.99


@pytest.mark.slow
def test_int8_agreement_on_trained_model(tmp_path: Path) -> None:
    # The README's figure at the benchmark's own settings (about 40 s): a small ViT trained to ~0.98 held-out
    # top-1, 200 held-out photos, int8 top-1 agreement with float32 1.000 (target 0.99).
    output = tmp_path / "quantization.json"
    assert quantization.main(["--workdir", str(tmp_path), "--skip-vit-l16", "--output", str(output)]) == 0
    trained = json.loads(output.read_text())["trained_model"]
    assert trained["images"] == 200 and trained["held_out_top1"] >= 0.9
    assert trained["agreement"]["int8"]["top1_agreement"] >= 0.99
    assert trained["agreement"]["bfloat16"]["top1_agreement"] >= 0.99
