"""The unknown test chosen on the user's photos (birder.inference.unknown_choice), what the calibrated file records of
it, the sidecar's size bound, and the temperature refused on too few (or degenerate) validation photos."""

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_calibration import (  # noqa: F401 (model_and_photos: a fixture; single_thread: an autouse one)
    CLASSES,
    NAMES,
    model_and_photos,
    single_thread,
)

import birder
from benchmarks.synthetic import make_class_folder
from birder.errors import BirderError
from birder.inference.calibration import MIN_TEMPERATURE_PHOTOS, fit_temperature_checked, softmax
from birder.inference.stand_ins import MADE_KINDS
from birder.inference.unknown import (
    MAHALANOBIS_METHODS,
    SINGLE_METHODS,
    ClassStatistics,
    auroc,
    ensemble_scores,
    fit_ensemble,
    nearest_similarities,
    normalise,
    sidecar_bytes,
    unknown_scores,
)
from birder.inference.unknown_choice import (
    NOT_CHOSEN_ON_THEIR_OWN,
    Candidate,
    SelectionError,
    candidate_scores,
    choose_unknown_test,
)
from birder.io.calibration import read_stats_file, stats_path_for, write_stats_file
from birder.runs.eval_reports import DetectionRow, better_test, format_detection
from birder.scripts import calibrate as calibrate_script
from birder.scripts import evaluate as evaluate_script

# ---------------------------------------------------------------------------------------------------------------------
# Worlds of embeddings where one kind of test is clearly the right one
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Photos:
    logits: np.ndarray
    embeddings: np.ndarray
    targets: np.ndarray


KNOWN = 12
UNKNOWN = 6
DIM = 16


def _world(kind: str, seed: int) -> tuple[Photos, Photos, Photos, Photos]:
    """``(train, val, test, unknown)`` photos of ``KNOWN`` classes plus ``UNKNOWN`` others from the same generator:

    - ``modes``: every class is five tight clusters far apart: a class mean lies between them, where no photo is,
      so only the nearest neighbours see the class's shape (knn);
    - ``nuisance``: all classes share a large spread along half the dimensions (lighting, pose), and differ only
      along the other half, where they are tight: only a covariance-aware distance sees the difference (the
      Mahalanobis methods);
    - ``shifted``: logits only (no training photos: the logit tests alone compete); every photo's logits are
      shifted by its own offset (exposure, say), which moves the energy but not the softmax (msp).
    """
    rng = np.random.default_rng(seed)
    classes = KNOWN + UNKNOWN
    if kind == "modes":
        centres = rng.normal(0, 4.0, size=(classes, 5, DIM))
    elif kind == "nuisance":
        means = np.concatenate([np.zeros((classes, DIM // 2)), rng.normal(0, 1.0, (classes, DIM // 2))], axis=1)
        means += 3.0  # away from the origin: cosine similarity is not centred
    scale = np.concatenate([np.full(DIM // 2, 5.0), np.full(DIM // 2, 0.08)])

    def draw(class_ids: range, count: int) -> Photos:
        targets = np.repeat(np.asarray(class_ids), count)
        if kind == "modes":
            embeddings = centres[targets, rng.integers(0, 5, len(targets))] + rng.normal(0, 0.3, (len(targets), DIM))
        elif kind == "nuisance":
            embeddings = means[targets] + rng.normal(0, 1.0, (len(targets), DIM)) * scale
        else:
            embeddings = rng.normal(0, 1.0, (len(targets), DIM))
        logits = rng.normal(0, 1.0, (len(targets), KNOWN))
        if kind == "shifted":
            known = targets < KNOWN
            logits[np.flatnonzero(known), targets[known]] += 5.0  # the class the model was trained on stands out
            logits += rng.normal(0, 4.0, (len(targets), 1))
        return Photos(logits, embeddings, np.where(targets < KNOWN, targets, -1))

    known = range(KNOWN)
    return (draw(known, 40), draw(known, 15), draw(known, 15), draw(range(KNOWN, classes), 15))


NAMES_12 = [f"c{i}" for i in range(KNOWN)]


def calibrate_argv(model: Path, val: Path, train: Path, output: Path) -> list[str]:
    """birder-calibrate on the fixture's model and photos, with the unknown thresholds keeping 90 % known."""
    return ["--weights", str(model), "--val", str(val), "--train", str(train), "-o", str(output), "--keep-known", "0.9"]


def calibrated_file(fixture: tuple[Path, Path, Path], tmp_path: Path, *extra: str) -> Path:
    """``birder-calibrate`` on the ``model_and_photos`` fixture (:func:`calibrate_argv`, one process, no progress
    bar, then ``extra``) run to success: the calibrated file."""
    (model, val, train) = fixture
    output = tmp_path / "calibrated.pt"
    argv = [*calibrate_argv(model, val, train, output), "-j", "0", "--no-progress", *extra]
    assert calibrate_script.main(argv) == 0
    return output


def _true_auroc(candidate: Candidate, train: Photos, test: Photos, unknown: Photos, val: Photos) -> float:
    if candidate.method == "ensemble":  # its members normalised on the known validation photos, as calibrate does
        shrinkage = next((m.shrinkage for m in candidate.members if m.shrinkage), "ledoit_wolf")
        statistics = ClassStatistics.fit(train.embeddings, train.targets, NAMES_12, shrinkage=shrinkage)

        def inputs(photos: Photos) -> dict:
            return {"probabilities": softmax(photos.logits), "logits": photos.logits, "embeddings": photos.embeddings}

        members = fit_ensemble(
            [(m.method, m.neighbours) for m in candidate.members], statistics=statistics, **inputs(val)
        )
        return auroc(
            ensemble_scores(members, statistics=statistics, **inputs(test)),
            ensemble_scores(members, statistics=statistics, **inputs(unknown)),
        )
    if candidate.method == "msp":
        return auroc(1 - softmax(test.logits).max(1), 1 - softmax(unknown.logits).max(1))
    if candidate.method == "energy":
        return auroc(-np.logaddexp.reduce(test.logits, 1), -np.logaddexp.reduce(unknown.logits, 1))
    statistics = ClassStatistics.fit(
        train.embeddings, train.targets, NAMES_12, shrinkage=candidate.shrinkage or "ledoit_wolf"
    )
    return auroc(
        candidate_scores(statistics, candidate, test.embeddings),
        candidate_scores(statistics, candidate, unknown.embeddings),
    )


@pytest.mark.parametrize(
    ("kind", "family"),
    # nearest_mahalanobis measures to the nearest training photo too: of the knn kind where a class has several modes
    [("modes", ("knn", "nearest_mahalanobis")), ("nuisance", MAHALANOBIS_METHODS), ("shifted", ("msp",))],
)
def test_the_folds_pick_the_kind_of_test_that_is_clearly_best_on_true_unknowns(kind: str, family: tuple) -> None:
    (train, val, test, unknown) = _world(kind, seed=3)
    choice = choose_unknown_test(val, NAMES_12, train=train if kind != "shifted" else None, folds=4, seed=0)
    assert choice.chosen.method in family, choice.format()
    assert choice.folds == 4 and sum(choice.held_out) == KNOWN  # every class held out once
    scored = [result for result in choice.results if not result.skipped]
    assert all(len(result.fold_auroc) == 4 for result in scored)
    # Without made stand-ins the score is the fold mean; the ensemble and nearest_mahalanobis are scored but not
    # chosen on their own
    assert all(result.score == result.mean for result in scored)
    singles = [result for result in scored if result.candidate.method not in NOT_CHOSEN_ON_THEIR_OWN]
    assert max(singles, key=lambda result: result.score).candidate == choice.chosen

    # On the true unknowns (classes no fold saw), the chosen kind is the best kind too, by a clear margin
    true = {result.candidate: _true_auroc(result.candidate, train, test, unknown, val) for result in scored}
    singles = {candidate: value for (candidate, value) in true.items() if candidate.method != "ensemble"}
    best_in_family = max(value for (candidate, value) in singles.items() if candidate.method in family)
    best_elsewhere = max(value for (candidate, value) in singles.items() if candidate.method not in family)
    assert true[choice.chosen] >= best_in_family - 0.02
    assert best_in_family >= best_elsewhere + 0.1


def test_same_seed_same_folds_and_a_forced_method_keeps_its_best_settings() -> None:
    (train, val, _, _) = _world("modes", seed=4)
    first = choose_unknown_test(val, NAMES_12, train=train, folds=3, seed=7)
    again = choose_unknown_test(val, NAMES_12, train=train, folds=3, seed=7)
    assert first.record() == again.record()
    forced = choose_unknown_test(val, NAMES_12, train=train, folds=3, seed=7, forced="mahalanobis")
    assert forced.forced and forced.chosen.method == "mahalanobis"
    assert forced.chosen == forced.best("mahalanobis").candidate
    # Without training photos only the logit methods are candidates
    logits_only = choose_unknown_test(val, NAMES_12, folds=3)
    assert {result.candidate.method for result in logits_only.results} == {"msp", "energy"}
    with pytest.raises(SelectionError, match="at least 3 classes"):
        two = val.targets < 2
        choose_unknown_test(Photos(val.logits[two], val.embeddings[two], val.targets[two]), NAMES_12)

    # nearest_mahalanobis is scored and can be forced, but the choice never keeps it on its own (module docstring)
    assert first.best("nearest_mahalanobis") is not None
    assert first.chosen.method not in NOT_CHOSEN_ON_THEIR_OWN
    near = choose_unknown_test(val, NAMES_12, train=train, folds=3, seed=7, forced="nearest_mahalanobis")
    assert near.chosen == near.best("nearest_mahalanobis").candidate and near.shrinkage == near.chosen.shrinkage


def test_no_shrinkage_is_offered_only_for_a_well_conditioned_covariance() -> None:
    (train, val, _, _) = _world("nuisance", seed=5)
    choice = choose_unknown_test(val, NAMES_12, train=train, folds=3)
    assert not any(result.skipped for result in choice.results)  # 16-d from 480 photos: invertible
    # A direction no embedding varies in (as a final LayerNorm leaves) does not make it singular
    flat = Photos(train.logits, np.concatenate([train.embeddings, np.ones((len(train.targets), 1))], 1), train.targets)
    val_flat = Photos(val.logits, np.concatenate([val.embeddings, np.ones((len(val.targets), 1))], 1), val.targets)
    choice = choose_unknown_test(val_flat, NAMES_12, train=flat, folds=3, neighbour_grid=(1,))
    assert not any(result.skipped for result in choice.results)

    # 5 photos per class in 80 dimensions: fewer photos than dimensions, no covariance without shrinkage
    rng = np.random.default_rng(0)
    few = np.concatenate([np.flatnonzero(train.targets == index)[:5] for index in range(KNOWN)])
    wide = np.concatenate([train.embeddings[few], rng.normal(size=(len(few), 64))], axis=1)
    val_wide = np.concatenate([val.embeddings, rng.normal(size=(len(val.targets), 64))], axis=1)
    choice = choose_unknown_test(
        Photos(val.logits, val_wide, val.targets),
        NAMES_12,
        train=Photos(train.logits[few], wide, train.targets[few]),
        folds=3,
        neighbour_grid=(1,),
    )
    skipped = {result.candidate.shrinkage for result in choice.results if result.skipped}
    assert skipped == {"none"}
    assert all("singular or ill-conditioned" in result.skipped for result in choice.results if result.skipped)


# ---------------------------------------------------------------------------------------------------------------------
# Class statistics: kNN search, size bound, older sidecars
# ---------------------------------------------------------------------------------------------------------------------


def test_knn_search_is_exact_with_and_without_faiss() -> None:
    rng = np.random.default_rng(0)
    bank = normalise(rng.normal(size=(700, 24)))
    queries = normalise(rng.normal(size=(40, 24)))  # more than a few: faiss
    many = nearest_similarities(bank, queries, 5)
    few = np.concatenate([nearest_similarities(bank, queries[i : i + 1], 5) for i in range(len(queries))])
    truth = -np.sort(-(queries @ bank.T), axis=1)[:, :5]
    np.testing.assert_allclose(many, truth, atol=1e-5)
    np.testing.assert_allclose(few, truth, atol=1e-5)


@pytest.mark.parametrize("shrinkage", ["ledoit_wolf", "none"])
def test_nearest_mahalanobis_is_the_distance_to_the_nearest_training_photo(shrinkage: str) -> None:
    rng = np.random.default_rng(3)
    targets = np.repeat(np.arange(4), 50)
    embeddings = rng.normal(size=(200, 6)) * [1, 1, 1, 1, 5, 0.2] + rng.normal(0, 4, size=(4, 6))[targets]
    statistics = ClassStatistics.fit(embeddings, targets, list("abcd"), shrinkage=shrinkage, bank_per_class=64)
    queries = rng.normal(0, 4, size=(30, 6))  # more than a few: faiss; one at a time: numpy
    differences = queries[:, None, :] - embeddings[None, :, :]
    truth = np.einsum("qnd,de,qne->qn", differences, statistics.precision, differences).min(axis=1)
    np.testing.assert_allclose(statistics.nearest_mahalanobis(queries), truth, rtol=2e-3)
    one_by_one = np.concatenate([statistics.nearest_mahalanobis(queries[i : i + 1]) for i in range(len(queries))])
    np.testing.assert_allclose(one_by_one, truth, rtol=2e-3)
    # A training photo itself is at distance (almost) zero; a photo near no training photo is far
    assert statistics.nearest_mahalanobis(embeddings[:3]).max() < 1e-2 * np.median(truth)
    assert unknown_scores("nearest_mahalanobis", embeddings=queries, statistics=statistics).shape == (30,)


def test_the_sidecar_stays_within_its_stated_bound(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    (classes, dim, per_class, cap) = (40, 48, 30, 8)
    targets = np.repeat(np.arange(classes), per_class)
    embeddings = rng.normal(size=(len(targets), dim)) + rng.normal(0, 3, size=(classes, dim))[targets]
    statistics = ClassStatistics.fit(embeddings, targets, [f"s{i}" for i in range(classes)], bank_per_class=cap)
    assert len(statistics.bank) == classes * cap  # capped per class, whatever the photos
    path = statistics.save(tmp_path / "m.stats.safetensors")
    header = 8 + 2048 + sum(len(f"s{i}") + 4 for i in range(classes))  # the JSON header: tensor index, class names
    assert path.stat().st_size <= sidecar_bytes(classes, dim, cap) + header
    # The card's scale, as the README states it: 707 classes, 1024-d, 64 per class
    assert sidecar_bytes(707, 1024, 64) == pytest.approx(112.53e6, rel=1e-3)

    loaded = ClassStatistics.load(path, [f"s{i}" for i in range(classes)])
    queries = rng.normal(size=(5, dim))
    for method in ("mahalanobis", "relative_mahalanobis", "knn"):
        np.testing.assert_allclose(loaded.score(method, queries), statistics.score(method, queries), rtol=1e-9)
    # The bank's lengths travel too: the distance to the nearest training photo is the same after a reload
    np.testing.assert_allclose(loaded.nearest_mahalanobis(queries), statistics.nearest_mahalanobis(queries), rtol=1e-5)


def test_a_sidecar_of_an_older_release_still_scores_what_it_can(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    targets = np.repeat(np.arange(3), 10)
    statistics = ClassStatistics.fit(rng.normal(size=(30, 4)) + targets[:, None], targets, ["a", "b", "c"])
    tensors = {
        "class_means": torch.from_numpy(statistics.means.astype(np.float32)),
        "class_present": torch.from_numpy(statistics.present.astype(np.uint8)),
        "precision": torch.from_numpy(statistics.precision.astype(np.float32)),
        "knn_bank": torch.from_numpy(statistics.bank.astype(np.float16)),
    }
    old = write_stats_file(tmp_path / "old.stats.safetensors", tensors, {"classes": ["a", "b", "c"], "neighbours": 5})
    loaded = ClassStatistics.load(old, ["a", "b", "c"])
    assert loaded.supports("knn") and loaded.supports("mahalanobis") and not loaded.supports("relative_mahalanobis")
    assert not loaded.supports("nearest_mahalanobis")  # no bank lengths
    np.testing.assert_allclose(loaded.knn(rng.normal(size=(2, 4))).shape, (2,))
    with pytest.raises(BirderError, match="run birder-calibrate --train again"):
        loaded.relative_mahalanobis(rng.normal(size=(2, 4)))
    with pytest.raises(BirderError, match="run birder-calibrate --train again"):
        loaded.nearest_mahalanobis(rng.normal(size=(2, 4)))


# ---------------------------------------------------------------------------------------------------------------------
# birder-calibrate and birder-eval
# ---------------------------------------------------------------------------------------------------------------------


def test_calibrate_prints_the_table_and_the_file_records_the_choice(
    model_and_photos: tuple[Path, Path, Path],  # noqa: F811 (the fixture)
    tmp_path: Path,
    capsys,
) -> None:
    val = model_and_photos[1]
    output = calibrated_file(model_and_photos, tmp_path, "--unknown-folds", "3")
    out = capsys.readouterr().out
    assert "unknown test chosen on 3 folds of held-out classes" in out
    (net, _) = birder.load_model(output)
    selection = net.calibration.unknown_selection
    chosen = selection["chosen"]
    assert net.calibration.unknown_method == chosen["method"] and not selection["forced"]
    assert selection["folds"] == 3 and selection["classes"] == len(NAMES)
    methods = {candidate["method"] for candidate in selection["candidates"]}
    # Every single method, and the ensemble (scored beside them)
    formed = [candidate for candidate in selection["candidates"] if candidate["method"] == "ensemble"]
    assert methods == set(SINGLE_METHODS) | ({"ensemble"} if formed else set())
    for candidate in selection["candidates"]:
        if candidate["skipped"] is None:
            assert len(candidate["fold_auroc"]) == 3
            assert candidate["mean"] == pytest.approx(np.mean(candidate["fold_auroc"]), abs=1e-5)
            # The score: the lower of the fold mean and the mean over the kinds of made stand-in unknowns
            assert set(candidate["made_auroc"]) == set(MADE_KINDS)
            made = np.mean(list(candidate["made_auroc"].values()))
            assert candidate["score"] == pytest.approx(min(candidate["mean"], made), abs=1e-5)
            # Each candidate is a row of the printed table with its mean
            settings = next(iter(candidate["settings"].values()), "")
            label = f"k={settings}" if candidate["method"] == "knn" else str(settings)
            if candidate["method"] == "ensemble":
                label = f"mean of {len(settings)}"
            row = next(line for line in out.splitlines() if f" {candidate['method']} " in line and label in line)
            assert f"{candidate['mean']:.4f} ±" in row and row.endswith(f"{candidate['score']:.4f}")
    singles = [
        c for c in selection["candidates"] if c["skipped"] is None and c["method"] not in NOT_CHOSEN_ON_THEIR_OWN
    ]
    best = max(singles, key=lambda c: c["score"])
    assert (best["method"], best["settings"]) == (chosen["method"], chosen["settings"])
    # The sidecar holds the settings the choice found best for the embedding methods
    info = read_stats_file(stats_path_for(output))[1]
    knn_best = max(
        (c for c in selection["candidates"] if c["method"] == "knn"), key=lambda c: c["score"]
    )  # the first of equals, as the choice
    assert info["neighbours"] == knn_best["settings"]["neighbours"]

    # birder-eval reports every method with its settings and marks the model's own
    unknown = make_class_folder(tmp_path / "unknown", [45, 54], per_class=3, size=32, seed=4)
    report = tmp_path / "report"
    argv = ["--weights", str(output), str(val), "--workers", "0", "--no-progress", "--output-dir", str(report)]
    assert evaluate_script.main([*argv, "--unknown-dir", str(unknown)]) == 0
    with open(report / "unknown_detection.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["method"] for row in rows] == list(SINGLE_METHODS) + (["ensemble"] if formed else [])
    assert [row["method"] for row in rows if row["chosen"] == "1"] == [chosen["method"]]
    knn_row = next(row for row in rows if row["method"] == "knn")
    assert knn_row["settings"].startswith(f"k={info['neighbours']} of ")
    assert float(knn_row["fold_auroc"]) == pytest.approx(knn_best["mean"], abs=1e-5)


def test_eval_points_out_a_test_that_separates_the_users_unknowns_better() -> None:
    own = DetectionRow("relative_mahalanobis", 0.886, 0.4, "oas (weight 0.02)", 0.95, chosen=True)
    near = DetectionRow("nearest_mahalanobis", 0.939, 0.3, "oas (weight 0.02)", 0.96)
    knn = DetectionRow("knn", 0.890, 0.35, "k=1 of 640 (at most 64 per class)", 0.97)
    assert better_test([own, near, knn]) == near
    text = format_detection([own, near, knn], known=700, unknown=300)
    assert "nearest_mahalanobis separates the unknown ones better than the model's own test (0.9390 against " in text
    assert text.rstrip().endswith("birder-calibrate --unknown-method nearest_mahalanobis keeps it")
    # Within the margin, or the model's own test the best: nothing to point out
    assert better_test([own, knn]) is None
    assert better_test([DetectionRow("knn", 0.95, 0.2, chosen=True), near]) is None
    assert "keeps it" not in format_detection([own, knn], known=700, unknown=300)
    assert better_test([near, knn]) is None  # no test of the model's own (an uncalibrated file)


def test_unknown_method_forces_the_method_with_its_best_settings(
    model_and_photos: tuple[Path, Path, Path],  # noqa: F811 (the fixture)
    tmp_path: Path,
    capsys,
) -> None:
    output = calibrated_file(model_and_photos, tmp_path, "--unknown-method", "relative_mahalanobis")
    out = capsys.readouterr().out
    assert "[method forced by --unknown-method]" in out and "unknown test: relative_mahalanobis" in out
    calibration = birder.load_model(output)[0].calibration
    assert calibration.unknown_method == "relative_mahalanobis"
    selection = calibration.unknown_selection
    assert selection["forced"] and selection["chosen"]["method"] == "relative_mahalanobis"
    forced = [c for c in selection["candidates"] if c["method"] == "relative_mahalanobis" and c["skipped"] is None]
    assert selection["chosen"]["settings"] == max(forced, key=lambda c: c["score"])["settings"]
    # predict can still switch methods (a forced single method keeps no ensemble)
    assert set(calibration.unknown_thresholds) == set(SINGLE_METHODS)


def test_one_validation_photo_is_refused_in_one_line_and_nothing_is_written(
    model_and_photos: tuple[Path, Path, Path],  # noqa: F811 (the fixture)
    tmp_path: Path,
    capsys,
) -> None:
    (model, _, train) = model_and_photos
    one = make_class_folder(tmp_path / "one", CLASSES[:1], per_class=1, size=32, seed=5)
    output = tmp_path / "out" / "calibrated.pt"
    argv = ["--weights", str(model), "--val", str(one), "--train", str(train), "-o", str(output), "-j", "0"]
    assert calibrate_script.main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("birder-calibrate: error: ")
    assert f"1 readable photo(s); a temperature needs at least {MIN_TEMPERATURE_PHOTOS} labelled photos" in err
    assert not (tmp_path / "out").exists()


def test_a_validation_set_of_one_class_calibrates_but_cannot_choose_the_test(
    model_and_photos: tuple[Path, Path, Path],  # noqa: F811 (the fixture)
    tmp_path: Path,
    capsys,
) -> None:
    (model, _, train) = model_and_photos
    single = make_class_folder(tmp_path / "single", CLASSES[1:2], per_class=24, size=32, seed=6)
    output = tmp_path / "calibrated.pt"
    argv = ["--weights", str(model), "--val", str(single), "--train", str(train), "-o", str(output)]
    # One class, some photos wrong: the temperature has a finite fit; only the choice needs more classes
    assert calibrate_script.main([*argv, "--keep-known", "0.9", "-j", "0", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "unknown test not chosen: choosing the unknown test needs photos of at least 3 classes" in captured.out
    calibration = birder.load_model(output)[0].calibration
    assert calibration.unknown_selection is None and calibration.unknown_method == "knn"
    assert 0.05 < calibration.temperature < 20


def test_the_temperature_is_refused_or_kept_where_its_fit_is_degenerate() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2.0, size=(40, 5))
    right = logits.argmax(axis=1)
    with pytest.raises(BirderError, match="needs at least 20 labelled photos"):
        fit_temperature_checked(logits[:1], (right[:1] + 1) % 5)  # the 148.41 of one wrong photo
    fit = fit_temperature_checked(logits, right)  # every photo right: no finite optimum
    assert fit.temperature == 1.0 and "all 40 photos are predicted right" in fit.note
    wrong = logits.argmin(axis=1)  # the labelled class below the mean logit: T would run to infinity
    with pytest.raises(BirderError, match="no higher than its mean logit"):
        fit_temperature_checked(logits, wrong)
    mostly = right.copy()
    mostly[:8] = (right[:8] + 1) % 5
    fit = fit_temperature_checked(logits, mostly)
    assert fit.note is None and 0.1 < fit.temperature < 10


def test_every_benchmark_generator_makes_known_and_unknown_classes_the_same_way_each_time(tmp_path: Path) -> None:
    """Each drawn data set of the unknown-choice benchmark (one photo per class and split here): the known classes in
    train/val/test, other classes as unknowns, photos of the stated size, the same photos from the same seed."""
    from benchmarks.unknown_choice import MAKERS

    per_class = {"train": 1, "val": 1, "test": 1, "unknown": 1}
    for name, make in MAKERS.items():
        if name == "digits":  # scikit-learn's real scans, all of them whatever the counts: not drawn here
            continue
        (size, known) = make(tmp_path / name / "a", 0, per_class)
        make(tmp_path / name / "b", 0, per_class)
        for split in ("train", "val", "test"):
            assert sorted(p.name for p in (tmp_path / name / "a" / split).iterdir()) == sorted(known), name
        unknown = {p.name for p in (tmp_path / name / "a" / "unknown").iterdir()}
        assert unknown and not unknown & set(known), name
        folders = [path for path in (tmp_path / name / "a").glob("*/*") if path.is_dir()]
        assert len(folders) == 3 * len(known) + len(unknown) and all(any(f.iterdir()) for f in folders), name
        photos = sorted((tmp_path / name / "a").rglob("*.png"))
        assert {Image.open(photo).size for photo in photos} == {(size, size)}, name
        for photo in photos:
            assert photo.read_bytes() == (tmp_path / name / "b" / photo.relative_to(tmp_path / name / "a")).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["shapes", "textures", "calls"])
def test_unknown_choice_benchmark_runs_end_to_end_tiny(tmp_path: Path, dataset: str) -> None:
    from benchmarks import unknown_choice as benchmark

    output = tmp_path / "unknown_choice.json"
    argv = ["--tiny", "--epochs", "1", "--datasets", dataset, "--workdir", str(tmp_path), "--output", str(output)]
    assert benchmark.main(argv) == 0
    report = json.loads(output.read_text())
    (result,) = report["results"]
    assert report["machine"]["cpu_model"] and result["dataset"] == dataset
    # Each run's result is on disk as it ends, and the measured gap comes with its noise over resampled photos
    assert json.loads((tmp_path / f"{dataset}_seed0" / "result.json").read_text()) == result
    assert result["gap_bootstrap_sd"] >= 0
    assert {c["method"] for c in result["candidates"]} - {"ensemble"} == set(SINGLE_METHODS)
    # The choice on the folds alone (without the made stand-ins) is reported beside it, from the same run
    single = result["folds_alone"]
    assert single["gap_to_best"] == pytest.approx(result["best"]["true_auroc"] - single["true_auroc"])
    assert single["method"] != "ensemble"
    assert result["gap_to_best"] == pytest.approx(result["best"]["true_auroc"] - result["chosen"]["true_auroc"])
    # The target's reference is the best test the choice can keep; the best of every single test is beside it
    assert result["chosen"]["method"] not in NOT_CHOSEN_ON_THEIR_OWN
    assert result["best"]["method"] not in NOT_CHOSEN_ON_THEIR_OWN
    assert result["best_single_test"]["true_auroc"] >= result["best"]["true_auroc"]
    # birder-eval's figure for the calibrated file's own test is the benchmark's figure for the chosen candidate
    assert result["eval_chosen"]["auroc"] == pytest.approx(result["chosen"]["true_auroc"], abs=1e-6)
    assert report["card_sidecar_bytes"]["bank_per_class"]["64"] == sidecar_bytes(707, 1024, 64)


def test_unknown_choice_benchmark_never_removes_photo_folders_it_did_not_make(tmp_path: Path) -> None:
    from benchmarks import unknown_choice as benchmark

    mine = tmp_path / "shapes_seed0" / "train" / "robin" / "mine.png"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"a user's photo")
    argv = ["--tiny", "--epochs", "1", "--datasets", "shapes", "--workdir", str(tmp_path)]
    with pytest.raises(SystemExit, match="did not make; choose another --workdir"):
        benchmark.main([*argv, "--output", str(tmp_path / "out.json")])
    assert mine.read_bytes() == b"a user's photo"
