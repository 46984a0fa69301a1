"""The ``ensemble`` unknown test: the z-normalised mean of the best knn and the best relative Mahalanobis, scored on the
folds as one more candidate, kept in the sidecar with each member's normalisation, and used by prediction."""

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_calibration import NAMES, model_and_photos  # noqa: F401 (model_and_photos: a fixture)
from test_unknown_choice import NAMES_12, _world, calibrate_argv, calibrated_file, single_thread  # noqa: F401 (autouse fixture)

import birder
from benchmarks.synthetic import make_class_folder
from birder.errors import BirderError
from birder.inference.calibration import softmax
from birder.inference.labeled import collect_outputs, labeled_photos
from birder.inference.unknown import (
    ClassStatistics,
    EnsembleMember,
    auroc,
    ensemble_scores,
    fit_ensemble,
    unknown_scores,
)
from birder.inference.unknown_choice import (
    STAND_IN_VIEWS,
    Candidate,
    CandidateResult,
    FoldScores,
    _ensemble_result,
    choose_unknown_test,
    ensemble_members,
)
from birder.io.calibration import read_stats_file, stats_path_for
from birder.scripts import evaluate as evaluate_script
from birder.scripts import predict as predict_script

MEMBERS = [("mahalanobis", None), ("knn", 3), ("msp", None), ("energy", None)]


def _by_hand(method: str, neighbours: int | None, statistics: ClassStatistics, logits, embeddings) -> np.ndarray:
    """A member's raw score computed here from its definition, not by the library's scoring code."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if method == "msp":
        return 1.0 - softmax(logits).max(axis=1)
    if method == "energy":
        return -np.log(np.exp(logits).sum(axis=1))
    if method == "knn":
        unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
        similarities = np.sort(unit @ statistics.bank.T.astype(np.float64), axis=1)[:, ::-1]
        return 1.0 - similarities[:, neighbours - 1]
    means = statistics.means[statistics.present]
    differences = embeddings[:, None, :] - means[None, :, :]
    return np.einsum("bcd,de,bce->bc", differences, statistics.precision, differences).min(axis=1)


def test_the_ensemble_score_is_the_mean_of_its_members_scores_normalised_on_the_known_photos() -> None:
    (train, val, test, unknown) = _world("nuisance", seed=5)
    statistics = ClassStatistics.fit(train.embeddings, train.targets, NAMES_12, shrinkage="ledoit_wolf")
    inputs = {"probabilities": softmax(val.logits), "logits": val.logits, "embeddings": val.embeddings}
    members = fit_ensemble(MEMBERS, statistics=statistics, **inputs)

    # Each member's normalisation: the mean and spread of its score on the known (validation) photos
    for member, (method, neighbours) in zip(members, MEMBERS, strict=True):
        raw = _by_hand(method, neighbours, statistics, val.logits, val.embeddings)
        assert (member.method, member.neighbours) == (method, neighbours)
        assert member.centre == pytest.approx(raw.mean(), rel=1e-6, abs=1e-9)
        assert member.scale == pytest.approx(raw.std(), rel=1e-6)

    photos = [test, unknown]
    for photo in photos:
        expected = np.mean(
            [
                (_by_hand(m.method, m.neighbours, statistics, photo.logits, photo.embeddings) - m.centre) / m.scale
                for m in members
            ],
            axis=0,
        )
        with_these = {"probabilities": softmax(photo.logits), "logits": photo.logits, "embeddings": photo.embeddings}
        np.testing.assert_allclose(ensemble_scores(members, statistics=statistics, **with_these), expected, atol=1e-6)
        stored = replace(statistics, ensemble=members)
        np.testing.assert_allclose(unknown_scores("ensemble", statistics=stored, **with_these), expected, atol=1e-6)
    # On known photos the normalised mean is centred: each member is
    known_scores = unknown_scores("ensemble", statistics=replace(statistics, ensemble=members), **inputs)
    assert abs(known_scores.mean()) < 1e-9


def test_the_ensemble_round_trips_through_the_sidecar_and_stays_small(tmp_path: Path) -> None:
    (train, val, test, _) = _world("modes", seed=6)
    statistics = ClassStatistics.fit(train.embeddings, train.targets, NAMES_12, shrinkage="oas")
    members = fit_ensemble(
        [("relative_mahalanobis", None), ("knn", 2)], embeddings=val.embeddings, statistics=statistics
    )
    fitted = replace(statistics, ensemble=members)
    path = fitted.save(tmp_path / "stats.safetensors")
    loaded = ClassStatistics.load(path, NAMES_12)
    assert loaded.ensemble == members  # methods, k, centres and scales exactly
    assert loaded.supports("ensemble") and not statistics.supports("ensemble")
    np.testing.assert_allclose(
        loaded.score("ensemble", test.embeddings), fitted.score("ensemble", test.embeddings), atol=1e-6
    )
    assert loaded.describe("ensemble") == "mean of relative_mahalanobis + knn k=2"
    # The members add a few numbers to the header, whatever the number of classes
    assert len(json.dumps(read_stats_file(path)[1]["ensemble"])) < 1000
    # A sidecar without an ensemble (every one written before it) loads with none
    plain = ClassStatistics.load(statistics.save(tmp_path / "plain.safetensors"), NAMES_12)
    assert plain.ensemble == ()
    with pytest.raises(BirderError, match=r"hold no ensemble .* choose another --unknown-method"):
        unknown_scores("ensemble", embeddings=test.embeddings, statistics=plain)


def _result(candidate: Candidate, folds: tuple[float, ...]) -> CandidateResult:
    return CandidateResult(candidate, folds)


def test_the_ensemble_joins_the_best_knn_and_the_best_relative_mahalanobis() -> None:
    tied = (0.81, 0.74, 0.90, 0.77, 0.85)
    relative = Candidate("relative_mahalanobis", shrinkage="oas")
    results = [
        _result(Candidate("msp"), (0.60, 0.55, 0.66, 0.58, 0.62)),
        _result(Candidate("mahalanobis", shrinkage="oas"), tuple(v + 0.03 for v in tied)),  # sets the shrinkage
        _result(relative, tied),
        _result(Candidate("relative_mahalanobis", shrinkage="ledoit_wolf"), tuple(v + 0.01 for v in tied)),
        _result(Candidate("knn", neighbours=1), tuple(v - 0.02 for v in tied)),  # knn's worse k: not a member
        _result(Candidate("knn", neighbours=5), tied),
    ]
    # Relative Mahalanobis with the shrinkage the class statistics will hold (the best Mahalanobis candidate's), so
    # that prediction can score it from the sidecar, even where another shrinkage did a little better on the folds
    assert ensemble_members(results) == (Candidate("knn", neighbours=5), relative)
    # Either kind missing (logits only, or skipped): no ensemble
    assert ensemble_members([r for r in results if r.candidate.method != "knn"]) == ()
    assert ensemble_members([r for r in results if r.candidate.method != "relative_mahalanobis"]) == ()


FIRST = Candidate("knn", neighbours=1)
SECOND = Candidate("relative_mahalanobis", shrinkage="oas")


def test_the_ensemble_is_scored_on_the_same_folds_and_wins_where_its_members_see_different_unknowns() -> None:
    # Each member sees half of the stand-in unknowns (the other half looks known to it): together they see all. The
    # two see the same scores in other halves, so the folds cannot tell them apart
    rng = np.random.default_rng(0)
    known = np.r_[np.ones(60, bool), np.zeros(40, bool)]
    folds = []
    for _ in range(3):
        (seen, unseen) = (rng.normal(3.0, 1.0, 20), rng.normal(0.0, 1.0, 20))
        first = np.r_[rng.normal(0.0, 1.0, 60), seen, unseen]
        second = np.r_[rng.normal(0.0, 1.0, 60), unseen, seen] * 50 + 7  # another scale: z-normalised away
        folds.append(FoldScores({view: {FIRST: first, SECOND: second} for view in STAND_IN_VIEWS}, known, ~known))

    def fold_auroc(candidate: Candidate) -> tuple[float, ...]:
        return tuple(
            auroc(f.by_view["as_learned"][candidate][known], f.by_view["as_learned"][candidate][~known]) for f in folds
        )

    singles = [_result(FIRST, fold_auroc(FIRST)), _result(SECOND, fold_auroc(SECOND))]
    ensemble = _ensemble_result(singles, folds)
    assert ensemble is not None and set(ensemble.candidate.members) == {FIRST, SECOND}
    assert len(ensemble.fold_auroc) == 3 and set(ensemble.view_auroc) == set(STAND_IN_VIEWS)
    assert ensemble.mean > max(result.mean for result in singles) + 0.1


def test_the_choice_weighs_the_ensemble_on_the_same_folds_as_every_single_candidate() -> None:
    (train, val, _, _) = _world("nuisance", seed=3)
    choice = choose_unknown_test(val, NAMES_12, train=train, folds=4, seed=0)
    singles = [r for r in choice.results if r.candidate.method != "ensemble" and not r.skipped]
    members = ensemble_members(singles)
    ensembles = [r for r in choice.results if r.candidate.method == "ensemble"]
    assert members and [r.candidate.members for r in ensembles] == [members]
    assert len(ensembles[0].fold_auroc) == 4
    # The best single candidate wins; the ensemble is scored beside it, not chosen on its own
    assert choice.chosen == max(singles, key=lambda r: r.score).candidate
    forced = choose_unknown_test(val, NAMES_12, train=train, folds=4, seed=0, forced="ensemble")
    assert forced.chosen.method == "ensemble" and forced.chosen.members == members
    recorded = choice.record()["candidates"][-1]
    assert recorded["method"] == "ensemble" and len(recorded["settings"]["members"]) == len(members)
    assert "ensemble" in choice.format()
    # A single method forced: the ensemble is not chosen
    assert choose_unknown_test(val, NAMES_12, train=train, folds=4, seed=0, forced="knn").chosen.method == "knn"


def test_predict_and_eval_use_the_ensemble_the_sidecar_holds(
    model_and_photos: tuple[Path, Path, Path],  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    val = model_and_photos[1]
    output = calibrated_file(model_and_photos, tmp_path, "--unknown-folds", "3")
    (net, info) = birder.load_model(output, inference=True)
    temperature = net.calibration.temperature
    transform = birder.classification_transform(birder.get_size_from_signature(info.signature), info.rgb_stats)
    photos = labeled_photos(val, info.class_to_idx)
    outputs = collect_outputs(net, transform, photos.paths, photos.targets)
    statistics = ClassStatistics.load(stats_path_for(output), NAMES)
    # Whatever the folds chose on this tiny model, an ensemble of three kinds of score in the sidecar
    members = fit_ensemble(
        [("knn", 2), ("mahalanobis", None), ("msp", None)],
        probabilities=softmax(outputs.logits, temperature),
        logits=outputs.logits,
        embeddings=outputs.embeddings,
        statistics=statistics,
    )
    replace(statistics, ensemble=members).save(stats_path_for(output))
    expected = ensemble_scores(
        members,
        probabilities=softmax(outputs.logits, temperature),
        logits=outputs.logits,
        embeddings=outputs.embeddings,
        statistics=statistics,
    )
    threshold = float(np.median(expected))

    common = ["--weights", str(output), str(val), "-j", "0", "-b", "8", "--no-progress"]
    answer = [
        "--unknown-method",
        "ensemble",
        "--unknown-threshold",
        str(threshold),
        "--output-dir",
        str(tmp_path / "p"),
    ]
    assert predict_script.main([*common, *answer]) == 0
    with open(tmp_path / "p" / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_path = {Path(row["path"]).resolve(): row for row in rows}
    for path, score in zip(photos.paths, expected, strict=True):
        row = by_path[Path(path).resolve()]
        assert float(row["unknown_score"]) == pytest.approx(score, abs=1e-4)
        assert (row["label"] == "unknown") == (score > threshold)

    unknown = make_class_folder(tmp_path / "unknown", [45, 54], per_class=3, size=32, seed=4)
    report = tmp_path / "report"
    argv = ["--weights", str(output), str(val), "--workers", "0", "--no-progress", "--output-dir", str(report)]
    assert evaluate_script.main([*argv, "--unknown-dir", str(unknown)]) == 0
    with open(report / "unknown_detection.csv", newline="") as handle:
        table = {row["method"]: row for row in csv.DictReader(handle)}
    assert table["ensemble"]["settings"] == "mean of knn k=2 + mahalanobis + msp"
    unknown_outputs = collect_outputs(net, transform, sorted(Path(unknown).rglob("*.png")))
    unknown_scores_ = ensemble_scores(
        members,
        probabilities=softmax(unknown_outputs.logits, temperature),
        logits=unknown_outputs.logits,
        embeddings=unknown_outputs.embeddings,
        statistics=statistics,
    )
    assert float(table["ensemble"]["auroc"]) == pytest.approx(auroc(expected, unknown_scores_), abs=1e-3)
    assert EnsembleMember("knn", 2).describe() == "knn k=2"


def test_calibrate_keeps_the_ensemble_in_the_calibration_file_and_its_sidecar(
    model_and_photos: tuple[Path, Path, Path],  # noqa: F811 (the fixture)
    tmp_path: Path,
    capsys,
) -> None:
    output = calibrated_file(model_and_photos, tmp_path, "--unknown-folds", "3", "--unknown-method", "ensemble")
    out = capsys.readouterr().out
    assert "unknown test: ensemble" in out and "(normalised scores of: " in out
    (net, _) = birder.load_model(output, inference=True)
    calibration = net.calibration
    chosen = calibration.unknown_selection["chosen"]
    assert calibration.unknown_method == "ensemble" == chosen["method"]
    statistics = ClassStatistics.load(stats_path_for(output), NAMES)
    # The sidecar's members are the recorded choice's, and the file has a threshold for their score
    assert [(m.method, m.neighbours) for m in statistics.ensemble] == [
        (m["method"], m.get("neighbours")) for m in chosen["settings"]["members"]
    ]
    mahalanobis = [m["shrinkage"] for m in chosen["settings"]["members"] if "shrinkage" in m]
    assert all(shrinkage == statistics.shrinkage for shrinkage in mahalanobis)
    assert np.isfinite(calibration.unknown_thresholds["ensemble"])
