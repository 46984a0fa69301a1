"""Calibration: the arithmetic (temperature, metrics, thresholds, unknown scores), the calibrated file
(``birder-calibrate``), and a calibrated model in infer_image, birder-predict and birder-eval."""

import csv
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_vit, one_torch_thread

import birder
from benchmarks.synthetic import class_name, make_class_folder
from birder.inference.calibration import (
    calibration_metrics,
    fit_species_thresholds,
    fit_temperature,
    softmax,
)
from birder.inference.classification import infer_batch, infer_image
from birder.inference.labeled import collect_outputs, labeled_photos
from birder.inference.unknown import ClassStatistics, auroc, fpr_at_tpr, threshold_for_keep_rate, unknown_scores
from birder.io.calibration import CALIBRATION_KEY, stats_path_for
from birder.io.checkpoint import read_checkpoint
from birder.scripts import calibrate as calibrate_script
from birder.scripts import evaluate as evaluate_script
from birder.scripts import predict as predict_script
from birder.training.evaluation import ClassificationMeter

CLASSES = [0, 9, 18, 27]  # rendered classes of distinct shape and colour
NAMES = [class_name(c) for c in CLASSES]
RGB_STATS = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
SIZE = (32, 32)


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture
def model_and_photos(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A tiny ViT saved as a file, and generated photos of its classes: ``(model, val, train)``.

    Its backbone is untrained; its head points at the (centred) class means of the training photos' embeddings,
    so its logits favour the right class more often than not (a random head would not: no temperature fits a
    model no better than chance) without being right on every photo (then none fits either)."""
    net = make_tiny_vit(num_classes=len(NAMES), size=SIZE, seed=1)
    class_to_idx = {name: index for (index, name) in enumerate(NAMES)}
    val = make_class_folder(tmp_path / "val", CLASSES, per_class=6, size=32, seed=1)
    train = make_class_folder(tmp_path / "train", CLASSES, per_class=6, size=32, seed=2)
    photos = labeled_photos(train, class_to_idx)
    outputs = collect_outputs(net, birder.classification_transform(SIZE, RGB_STATS), photos.paths, photos.targets)
    means = np.stack([outputs.embeddings[outputs.targets == index].mean(axis=0) for index in range(len(NAMES))])
    centred = means - means.mean(axis=0)
    with torch.no_grad():
        net.classifier.weight.copy_(torch.from_numpy(2.0 * centred / np.linalg.norm(centred, axis=1, keepdims=True)))
        net.classifier.bias.zero_()
    model = birder.save_model(net, tmp_path / "tiny.pt", birder.ModelInfo(class_to_idx, None, RGB_STATS))
    return (model, val, train)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Arithmetic
# ---------------------------------------------------------------------------------------------------------------------


def test_fit_temperature_recovers_the_temperature_labels_were_drawn_with() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, size=(4000, 6))
    true_temperature = 2.5
    probabilities = softmax(logits, true_temperature)
    targets = np.array([rng.choice(6, p=row) for row in probabilities])
    assert fit_temperature(logits, targets) == pytest.approx(true_temperature, rel=0.05)


def test_calibration_metrics_match_the_trainers_ece_and_the_textbook_formulas() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(0.0, 2.0, size=(200, 5)).astype(np.float32)
    targets = rng.integers(0, 5, size=200)
    metrics = calibration_metrics(logits, targets)
    meter = ClassificationMeter(5)
    meter.update(torch.from_numpy(logits), torch.from_numpy(targets))
    trainer = meter.result([str(i) for i in range(5)])
    assert metrics.ece == pytest.approx(trainer.ece, abs=1e-6)
    assert metrics.nll == pytest.approx(trainer.loss, abs=1e-5)
    probabilities = softmax(logits)
    one_hot = np.eye(5)[targets]
    assert metrics.brier == pytest.approx(((probabilities - one_hot) ** 2).sum(axis=1).mean())
    assert metrics.bins.counts.sum() == 200
    filled = metrics.bins.counts > 0
    assert (metrics.bins.confidence[filled] >= metrics.bins.edges[:-1][filled] - 1e-9).all()


def test_species_thresholds_reach_the_target_precision_or_say_why_not() -> None:
    # Predicted "a" at these confidences; True marks a correct photo. Above 0.6 every "a" is right.
    confidences = [0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.55, 0.5, 0.45, 0.4]
    correct = [True, True, True, True, True, True, False, True, False, False]
    rows = []
    targets = []
    for confidence, right in zip(confidences, correct, strict=True):
        rows.append([confidence, (1 - confidence) / 2, (1 - confidence) / 2])
        targets.append(0 if right else 1)
    # "b": predicted 10 times, always wrong; "c": predicted twice (too few)
    rows += [[0.1, 0.8, 0.1]] * 10 + [[0.1, 0.1, 0.8]] * 2
    targets += [0] * 10 + [2] * 2
    fit = fit_species_thresholds(np.array(rows), np.array(targets), ["a", "b", "c"], 0.85, min_photos=5)
    # Keeping down to 0.5: 7 of 8 right (0.875 >= 0.85); down to 0.45: 7 of 9 (0.78)
    assert fit.thresholds == {"a": 0.5, "b": 1.0}
    assert fit.unreachable == ["b"] and fit.too_few == ["c"]


def test_unknown_scores_thresholds_and_separation_measures() -> None:
    known = np.array([0.1, 0.2, 0.3, 0.4])
    unknown = np.array([0.35, 0.5, 0.6])
    assert auroc(known, unknown) == pytest.approx(11 / 12)  # 11 of the 12 pairs ranked right
    assert auroc(known, known) == pytest.approx(0.5)  # ties count half
    assert threshold_for_keep_rate(known, 0.75) == 0.3
    assert fpr_at_tpr(known, unknown, 0.75) == 0.0 and fpr_at_tpr(known, unknown, 1.0) == pytest.approx(1 / 3)
    logits = np.array([[3.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(unknown_scores("msp", probabilities=softmax(logits)), [1 - 1 / (1 + np.exp(-3)), 0.5])
    np.testing.assert_allclose(unknown_scores("energy", logits=logits), -np.log(np.exp(logits).sum(axis=1)))


def test_class_statistics_score_distance_to_the_training_embeddings(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    centres = np.array([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    targets = np.repeat([0, 1], 50)
    embeddings = centres[targets] + rng.normal(0, 0.5, size=(100, 3))
    statistics = ClassStatistics.fit(embeddings, targets, ["a", "b", "c"])  # "c" has no photos: never the nearest
    near = centres + 0.1
    far = np.array([[0.0, 0.0, 5.0], [-5.0, -5.0, 0.0]])
    assert (statistics.mahalanobis(far) > statistics.mahalanobis(near).max()).all()
    assert (statistics.knn(far) > statistics.knn(near).max()).all()

    path = statistics.save(tmp_path / "m.stats.safetensors")
    loaded = ClassStatistics.load(path, ["a", "b", "c"])
    np.testing.assert_allclose(loaded.mahalanobis(far), statistics.mahalanobis(far), rtol=1e-4)
    np.testing.assert_allclose(loaded.knn(far), statistics.knn(far), atol=1e-3)  # the bank is stored in float16
    with pytest.raises(birder.errors.CheckpointError, match="other classes"):
        ClassStatistics.load(path, ["a", "b"])


# ---------------------------------------------------------------------------------------------------------------------
# The calibrated file
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_calibration_leaves_the_state_dict_alone_and_travels_as_metadata(
    model_and_photos: tuple[Path, Path, Path], tmp_path: Path, suffix: str, capsys
) -> None:
    (model, val, train) = model_and_photos
    before = _digest(model)
    output = tmp_path / f"calibrated{suffix}"
    argv = ["--weights", str(model), "--val", str(val), "--train", str(train), "-o", str(output)]
    argv += ["--keep-known", "0.9", "--target-precision", "0.5", "--min-photos", "3", "-j", "0", "--no-progress"]
    assert calibrate_script.main([*argv, "--unknown-method", "knn"]) == 0
    out = capsys.readouterr().out
    assert "temperature:" in out and "unknown test: knn" in out and str(stats_path_for(output)) in out

    assert _digest(model) == before  # the input is never written to
    (original, _) = read_checkpoint(model)
    (state, metadata) = read_checkpoint(output)
    assert sorted(state) == sorted(original)  # same keys (safetensors stores them sorted) ...
    assert all(torch.equal(state[key], original[key]) for key in state)  # ... same weights
    assert isinstance(metadata[CALIBRATION_KEY], str)  # a JSON string, in both formats
    assert stats_path_for(output).is_file()

    (net, _) = birder.load_model(output, inference=True)
    calibration = net.calibration
    assert calibration.temperature > 0 and calibration.temperature != 1.0
    assert calibration.unknown_method == "knn"
    assert set(calibration.unknown_thresholds) == {
        "msp", "energy", "mahalanobis", "relative_mahalanobis", "nearest_mahalanobis", "knn"
    }  # fmt: skip
    assert calibration.stats_path == stats_path_for(output)
    assert set(calibration.species_thresholds) <= set(NAMES)

    # Saving the loaded model again keeps it; a file without calibration has none
    birder.save_model(net, tmp_path / f"again{suffix}", birder.ModelInfo(*birder.load_model(output)[1]))
    assert birder.load_model(tmp_path / f"again{suffix}")[0].calibration == calibration
    assert birder.load_model(model)[0].calibration is None


def test_calibrated_probabilities_and_the_ways_to_opt_out(model_and_photos: tuple[Path, Path, Path], tmp_path) -> None:
    (model, val, _) = model_and_photos
    output = tmp_path / "calibrated.safetensors"
    assert calibrate_script.main(["--weights", str(model), "--val", str(val), "-o", str(output), "-j", "0"]) == 0
    (plain, info) = birder.load_model(model, inference=True)
    (calibrated, _) = birder.load_model(output, inference=True)
    temperature = calibrated.calibration.temperature
    transform = birder.classification_transform(SIZE, info.rgb_stats)
    photo = next(iter(sorted(val.rglob("*.png"))))

    (raw, _) = infer_image(plain, photo, transform)
    (logits, _) = infer_image(calibrated, photo, transform, return_logits=True)
    (probabilities, _) = infer_image(calibrated, photo, transform)
    (opted_out, _) = infer_image(calibrated, photo, transform, calibrated=False)
    np.testing.assert_array_equal(opted_out, raw)  # calibrated=False: exactly the uncalibrated numbers
    np.testing.assert_array_equal(infer_image(plain, photo, transform, return_logits=True)[0], logits)  # raw logits
    np.testing.assert_allclose(probabilities, softmax(logits, temperature), atol=1e-6)
    assert not np.allclose(probabilities, raw, atol=1e-3)


def test_a_calibration_fitted_on_other_weights_is_dropped_with_a_warning(
    model_and_photos: tuple[Path, Path, Path], tmp_path: Path, caplog
) -> None:
    (model, val, _) = model_and_photos
    output = tmp_path / "calibrated.pt"
    assert calibrate_script.main(["--weights", str(model), "--val", str(val), "-o", str(output), "-j", "0"]) == 0
    (net, info) = birder.load_model(output)
    with torch.no_grad():
        net.classifier.bias.add_(1.0)  # fine-tuned after calibrating
    birder.save_model(net, tmp_path / "tuned.pt", info)
    logging.getLogger().addHandler(caplog.handler)  # the command's logging set-up replaced the root's handlers
    with caplog.at_level(logging.WARNING, logger="birder"):
        assert birder.load_model(tmp_path / "tuned.pt")[0].calibration is None
    assert "fitted on other weights" in caplog.text


def test_bad_calibration_input_is_one_line_and_writes_nothing(
    model_and_photos: tuple[Path, Path, Path], tmp_path: Path, capsys
) -> None:
    (model, val, _) = model_and_photos
    (tmp_path / "empty").mkdir()
    foreign = make_class_folder(tmp_path / "foreign", [CLASSES[0], 45], per_class=1, size=32, seed=3)
    output = tmp_path / "out" / "calibrated.pt"
    base = ["--weights", str(model), "-o", str(output), "-j", "0", "--no-progress"]
    cases = {
        "no class folders with images": ["--val", str(tmp_path / "empty")],
        f"1 class(es) the model does not have: {class_name(45)}": ["--val", str(foreign)],
        "no such directory": ["--val", str(tmp_path / "nowhere")],
        "needs class statistics: pass --train": ["--val", str(val), "--keep-known", "0.9", "--unknown-method", "knn"],
        "must be in (0, 1]": ["--val", str(val), "--target-precision", "1.5"],
        "the output must be a new file": ["--val", str(val), "-o", str(model)],
        "unsupported model file extension": ["--val", str(val), "-o", str(tmp_path / "calibrated.bin")],
    }
    for expected, args in cases.items():
        assert calibrate_script.main(base + args) == 2, expected
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("birder-calibrate: error: ") and expected in err, err
        assert not (tmp_path / "out").exists() and not (tmp_path / "calibrated.bin").exists()


# ---------------------------------------------------------------------------------------------------------------------
# A calibrated model in the commands
# ---------------------------------------------------------------------------------------------------------------------


def _results(directory: Path) -> list[dict[str, str]]:
    with open(directory / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_predict_adds_the_answer_columns_only_when_asked_and_keeps_the_others(
    model_and_photos: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    (model, val, _) = model_and_photos
    common = ["--weights", str(model), str(val), "-j", "0", "-b", "8", "--no-progress", "--top-k", "2"]
    assert predict_script.main([*common, "--output-dir", str(tmp_path / "plain")]) == 0
    taxonomy = tmp_path / "taxonomy.csv"
    rows = [f"{name},G{i % 2},F,O" for (i, name) in enumerate(NAMES)]
    taxonomy.write_text("species,genus,family,order\n" + "\n".join(rows) + "\n")
    answer = ["--taxonomy", str(taxonomy), "--min-prob", "0.99"]
    answer += ["--unknown-method", "msp", "--unknown-threshold", "0.9"]
    assert predict_script.main([*common, *answer, "--output-dir", str(tmp_path / "answer")]) == 0

    plain = _results(tmp_path / "plain")
    answered = _results(tmp_path / "answer")
    assert list(answered[0])[-4:] == ["label", "rank", "label_probability", "unknown_score"]
    assert list(plain[0]) == list(answered[0])[:-4]  # appended: the other columns keep their places
    for before, after in zip(plain, answered, strict=True):
        assert {key: after[key] for key in before if key != "prediction"} == {
            key: value for (key, value) in before.items() if key != "prediction"
        }
        score = float(after["unknown_score"])
        assert score == pytest.approx(1 - float(after["top1_prob"]), abs=2e-6)
        if score > 0.9:
            assert (after["label"], after["rank"], after["label_probability"]) == ("unknown", "", "")
        elif float(after["top1_prob"]) >= 0.99:
            assert (after["label"], after["rank"]) == (after["top1_class"], "species")
        else:
            assert after["rank"] in ("genus", "family", "order")
            assert float(after["label_probability"]) >= 0.99

    with pytest.raises(SystemExit):  # argparse: a method that does not exist
        predict_script.main([*common, "--unknown-method", "guess"])
    bad = tmp_path / "bad.csv"
    bad.write_text("species,genus,family,order\n" + "\n".join(rows[:2]) + "\n")
    assert predict_script.main([*common, "--taxonomy", str(bad), "--output-dir", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad" / "results.csv").exists()


def test_eval_reports_calibration_unknown_detection_and_taxonomic_coverage(
    model_and_photos: tuple[Path, Path, Path], tmp_path: Path, capsys
) -> None:
    (model, val, train) = model_and_photos
    output = tmp_path / "calibrated.pt"
    argv = ["--weights", str(model), "--val", str(val), "--train", str(train), "-o", str(output), "-j", "0"]
    assert calibrate_script.main(argv) == 0
    unknown = make_class_folder(tmp_path / "unknown", [45, 54], per_class=3, size=32, seed=4)
    taxonomy = tmp_path / "taxonomy.csv"
    taxonomy.write_text("species,genus,family,order\n" + "\n".join(f"{n},G{i % 2},F,O" for (i, n) in enumerate(NAMES)))
    report = tmp_path / "report"
    argv = ["--weights", str(output), str(val), "--workers", "0", "--no-progress", "--output-dir", str(report)]
    assert evaluate_script.main([*argv, "--unknown-dir", str(unknown), "--taxonomy", str(taxonomy)]) == 0
    out = capsys.readouterr().out
    assert "calibration (temperature" in out and "ECE" in out and "Brier" in out
    assert "unknown detection (24 known, 6 unknown photos)" in out and "knn" in out and "mahalanobis" in out
    assert "taxonomic fallback" in out
    assert {path.name for path in report.iterdir()} >= {
        "calibration.csv", "reliability_diagram.png", "unknown_detection.csv", "taxonomy_coverage.csv",
        "taxonomy_coverage.png",
    }  # fmt: skip
    assert (report / "reliability_diagram.png").read_bytes()[:4] == b"\x89PNG"
    with open(report / "taxonomy_coverage.csv", newline="") as handle:
        coverage = list(csv.DictReader(handle))
    assert float(coverage[0]["threshold"]) == 0.0 and float(coverage[0]["species"]) == 1.0
    assert all(float(row["answered"]) == 1.0 for row in coverage)  # one order: every photo gets a label


def test_eval_refuses_a_bad_taxonomy_before_writing_anything(
    model_and_photos: tuple[Path, Path, Path], tmp_path: Path, capsys
) -> None:
    (model, val, _) = model_and_photos
    taxonomy = tmp_path / "taxonomy.csv"
    taxonomy.write_text("species,genus,family,order\n" + f"{NAMES[0]},G,F,O\n" * 2)
    report = tmp_path / "report"
    argv = ["--weights", str(model), str(val), "--workers", "0", "--no-progress", "--output-dir", str(report)]
    assert evaluate_script.main([*argv, "--taxonomy", str(taxonomy)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"species listed more than once: {NAMES[0]}" in err
    assert not report.exists()


def test_an_export_of_a_calibrated_model_keeps_its_calibration(model_and_photos, tmp_path: Path) -> None:
    (model, val, _) = model_and_photos
    output = tmp_path / "calibrated.pt"
    assert calibrate_script.main(["--weights", str(model), "--val", str(val), "-o", str(output), "-j", "0"]) == 0
    (net, info) = birder.load_model(output, inference=True)
    exported = birder.save_model(net, tmp_path / "calibrated.pts", info)
    (loaded, _) = birder.load_model(exported)
    assert loaded.calibration == net.calibration
    inputs = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(infer_batch(loaded, inputs)[0], infer_batch(net, inputs)[0], atol=1e-5)


@pytest.mark.slow
def test_calibration_benchmark_runs_end_to_end_tiny(tmp_path: Path) -> None:
    from benchmarks import calibration as benchmark

    output = tmp_path / "calibration.json"
    argv = ["--tiny", "--repeats", "1", "--batch-size", "1", "--workdir", str(tmp_path), "--output", str(output)]
    assert benchmark.main(argv) == 0
    report = json.loads(output.read_text())
    assert report["per_photo_s"]["plain"] > 0 and report["per_photo_s"]["decision_steps"] > 0
    assert report["machine"]["cpu_model"] and report["target_overhead"] == 0.05
