"""The benchmarks run end to end (in a tiny mode) and write their JSON.

Speed figures are not judged (they vary with the machine); the int8 top-1 agreement with float32 is.
"""

import json
from pathlib import Path

import pytest

from benchmarks import distillation, inference, quantization


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
        assert result["mfu"] == pytest.approx(result["achieved_gflops"] / report["bf16_gemm_peak_gflops"])
    machine = report["machine"]
    assert machine["threads"] >= 1 and machine["cpu_model"] and isinstance(machine["cpu_flags"], list)
    assert all(flag.startswith(("avx", "amx", "fma", "f16c", "sse4")) for flag in machine["cpu_flags"])


def test_gpu_plan() -> None:
    # What `python -m benchmarks.inference --device cuda` runs when given nothing else (no GPU needed to check).
    assert inference.default_plan("cuda", True) == (["float32", "bfloat16"], [1, 64, 256])
    assert inference.default_plan("cpu", False) == (["float32", "int8"], [1, 4, 16])
    assert inference.default_plan("cpu", True) == (["float32", "int8", "bfloat16"], [1, 4, 16])
    label = inference.machine_label(
        {"cpu_model": "AMD EPYC", "cpu_flags": ["avx2", "avx512_bf16", "avx512_vnni"], "threads": 2}
    )
    assert label == "AMD EPYC (avx512_bf16, avx512_vnni), 2 threads"


def test_cuda_run_without_a_gpu_is_one_line(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the real run is the slow test")
    with pytest.raises(SystemExit, match="2"):
        inference.main(["--device", "cuda", "--tiny", "--output", str(tmp_path / "x.json")])


def test_distillation_benchmark_tiny(tmp_path: Path) -> None:
    output = tmp_path / "distillation.json"
    argv = ["--tiny", "--skip-speed", "--skip-hard", "--epochs", "1", "--teacher-epochs", "1"]
    argv += ["--train-per-class", "2", "--held-out-per-class", "1", "--workdir", str(tmp_path), "--output", str(output)]
    assert distillation.main(argv) == 0
    report = json.loads(output.read_text())
    assert set(report["held_out_top1"]) == {"teacher", "labels_only", "soft"}
    assert set(report["gain_points"]) == {"soft"} and report["machine"]["cpu_model"]


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
    # The README's figures at the benchmark's own settings (about 2 min, static int8 compiles): a small ViT trained
    # to ~0.98 held-out top-1, 800 held-out photos; every fast mode passes the 0.99 gate of an automatic choice.
    output = tmp_path / "quantization.json"
    assert quantization.main(["--workdir", str(tmp_path), "--skip-vit-l16", "--output", str(output)]) == 0
    trained = json.loads(output.read_text())["trained_model"]
    assert trained["images"] == 800 and trained["held_out_top1"] >= 0.9
    assert {"bfloat16", "float16", "int8", "int8-static"} <= set(trained["agreement"])
    for mode, figures in trained["agreement"].items():
        assert figures["top1_agreement"] >= 0.99 and figures["auto_eligible"], mode
        assert figures["mean_prob_diff"] <= figures["max_prob_diff"] <= 0.1, mode


@pytest.mark.slow
def test_distillation_gain(tmp_path: Path) -> None:
    # The README's distillation setting with a shorter teacher (20 epochs), without the hard student and speed part
    # (about 4 min on 2 cores): the distilled student beats the same student on labels alone by 2 points or more.
    output = tmp_path / "distillation.json"
    argv = ["--workdir", str(tmp_path), "--skip-hard", "--skip-speed", "--teacher-epochs", "20"]
    assert distillation.main([*argv, "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    top1 = report["held_out_top1"]
    assert top1["teacher"] > top1["soft"] and report["data"]["held_out_images"] == 1000
    assert report["gain_points"]["soft"] >= 2.0


@pytest.mark.slow
def test_gpu_plan_with_compile_on_the_cpu(tmp_path: Path) -> None:
    # The prepared GPU run's code path (both dtypes, --compile, MFU) on a tiny network, on whatever device is here.
    output = tmp_path / "inference.json"
    argv = ["--tiny", "--sections", "throughput", "--modes", "float32", "bfloat16", "--batch-sizes", "1", "2"]
    assert inference.main([*argv, "--compile", "--workdir", str(tmp_path), "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert {(r["mode"], r["batch_size"]) for r in report["throughput"]} == {
        (m, b) for m in ("float32", "bfloat16") for b in (1, 2)
    }
    assert all(r["mfu"] > 0 for r in report["throughput"])


def test_detection_benchmark_tiny(tmp_path: Path) -> None:
    from benchmarks import detection

    metrics = tmp_path / "det_metrics.csv"
    metrics.write_text("epoch,step,lr,train_loss,map,map50,unreadable_images\n1,10,0.001,1.2,0.1,0.3,0\n")
    output = tmp_path / "detection.json"
    assert detection.main(["--tiny", "--metrics", str(metrics), "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert {(r["head"], r["size"]) for r in report["speed"]} == {
        (h, s) for h in ("faster_rcnn", "retinanet") for s in (64, 128)
    }
    assert all(r["images_per_s"] > 0 for r in report["speed"]) and report["map_curve"][0]["map50"] == 0.3


def test_crop_classify_benchmark_tiny(tmp_path: Path) -> None:
    # Every stage on tiny data: classifier training, birder-train-det, both birder-predict runs, the true-box crops.
    from benchmarks import crop_classify

    output = tmp_path / "crop_classify.json"
    assert crop_classify.main(["--tiny", "--workdir", str(tmp_path / "work"), "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    assert set(report["top1"]) == {"whole", "crop", "true_box_crop"} and report["photos"] == 4
    assert all(0.0 <= value <= 1.0 for value in report["top1"].values())
    assert report["gain_points"] == pytest.approx(100 * (report["top1"]["crop"] - report["top1"]["whole"]))
    assert report["training"]["detector_trained_here"] and len(report["training"]["detector_map50_by_epoch"]) == 1
    assert report["machine"]["cpu_model"] and 0.0 <= report["detector_recall_iou50"] <= 1.0


def test_shards_benchmark_tiny(tmp_path: Path) -> None:
    from benchmarks import shards

    output = tmp_path / "shards.json"
    assert (
        shards.main(["--photos", "30", "--tiny", "--workers", "0", "--workdir", str(tmp_path), "--output", str(output)])
        == 0
    )
    report = json.loads(output.read_text())
    assert report["pack_photos_per_s"] > 0 and report["shards"] >= 1 and report["machine"]["cpu_model"]
    assert set(report["training_input_images_per_s"]) == {"folders, 0 workers", "shards, 0 workers"}
    assert set(report["raw_read_mb_per_s"]) == {"folders", "shards"}


def test_fsdp_memory_benchmark_tiny(tmp_path: Path) -> None:
    # About 7 s: two runs (DDP, FSDP) of two processes each, a tiny ViT at 32 px.
    from benchmarks import fsdp_memory

    output = tmp_path / "fsdp_memory.json"
    assert fsdp_memory.main(["--tiny", "--networks", "vit_b16", "--threads", "1", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    runs = {run["mode"]: run for run in report["runs"]}
    assert set(runs) == {"ddp", "fsdp"} and report["machine"]["cpu_model"]
    (ddp, fsdp) = (runs["ddp"]["per_rank"], runs["fsdp"]["per_rank"])
    assert len(ddp) == len(fsdp) == 2 and all(rank["peak_rss_bytes"] > 0 for rank in ddp + fsdp)
    # DDP: every process holds everything; FSDP: each holds its half of every tensor (shards padded to a row).
    assert ddp[0]["parameter_bytes"] == ddp[1]["parameter_bytes"]
    for key in ("parameter_bytes", "gradient_bytes", "optimizer_bytes"):
        assert sum(rank[key] for rank in fsdp) == pytest.approx(ddp[0][key], rel=0.02), key
    assert report["fsdp_over_ddp_state"]["vit_b16"] == pytest.approx(0.5, abs=0.01)
