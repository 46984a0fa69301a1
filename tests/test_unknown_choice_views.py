"""The views of a fold's stand-in unknowns (birder.inference.unknown_choice.STAND_IN_VIEWS): what each one does to
the held-out classes' embeddings, and that every candidate's fold figure is the mean over them, recorded per view."""

from dataclasses import dataclass

import numpy as np
import pytest

from birder.inference.unknown_choice import (
    STAND_IN_VIEWS,
    choose_unknown_test,
    move_onto_kept_span,
)


@dataclass(frozen=True)
class Photos:
    logits: np.ndarray
    embeddings: np.ndarray
    targets: np.ndarray


CLASSES = 9
DIM = 24


def _learned(seed: int, per_class: int, noise: float = 0.5) -> Photos:
    """Photos of ``CLASSES`` classes as a trained backbone leaves them: a shared feature part (classes overlap there)
    plus a direction of each class's own, which training gave every class it saw; ``noise``: each photo's scatter."""
    rng = np.random.default_rng(seed)
    features = np.random.default_rng(99).normal(0, 1.0, size=(CLASSES, DIM))
    own = np.random.default_rng(98).normal(0, 3.0, size=(CLASSES, DIM))
    targets = np.repeat(np.arange(CLASSES), per_class)
    embeddings = features[targets] + own[targets] + rng.normal(0, noise, size=(len(targets), DIM))
    logits = rng.normal(0, 1.0, size=(len(targets), CLASSES))
    return Photos(logits, embeddings, targets)


def _means(photos: Photos) -> dict[int, np.ndarray]:
    return {int(c): photos.embeddings[photos.targets == c].mean(axis=0) for c in np.unique(photos.targets)}


def test_moving_onto_the_kept_span_drops_only_what_no_kept_class_expresses() -> None:
    (train, val) = (_learned(1, 40), _learned(2, 10))
    means = _means(train)
    held = np.array([0, 7])
    kept = [c for c in range(CLASSES) if c not in held]
    moved = move_onto_kept_span(means, held, val.embeddings, val.targets)
    centre = np.mean([means[c] for c in kept], axis=0)
    directions = np.stack([means[c] - centre for c in kept], axis=1)
    assert np.linalg.matrix_rank(directions) == len(kept) - 1  # centred means: one fewer direction than classes

    def outside(vector: np.ndarray) -> np.ndarray:  # the part no combination of kept classes' directions expresses
        return vector - directions @ np.linalg.lstsq(directions, vector, rcond=None)[0]

    for c in range(CLASSES):
        rows = val.targets == c
        if c not in held:  # the kept classes' photos are left alone
            np.testing.assert_allclose(moved[rows], val.embeddings[rows], atol=1e-5)
            continue
        shift = moved[rows] - val.embeddings[rows]
        # One step for the whole class: its photos' scatter about their mean is kept
        np.testing.assert_allclose(shift, np.broadcast_to(shift[0], shift.shape), atol=1e-4)
        # The step removes the class mean's own direction, and only that: what the kept classes express stays
        own = outside(means[c] - centre)
        assert np.linalg.norm(own) > 3
        np.testing.assert_allclose(shift[0], -own, atol=1e-4)
        np.testing.assert_allclose(outside(means[c] + shift[0] - centre), 0, atol=1e-4)
    # Nothing held out: nothing moves
    unchanged = move_onto_kept_span(means, np.array([], dtype=int), val.embeddings, val.targets)
    np.testing.assert_allclose(unchanged, val.embeddings, atol=1e-5)


def test_each_fold_figure_is_the_mean_over_the_views_and_the_record_keeps_each_view() -> None:
    (train, val) = (_learned(3, 30, noise=3.0), _learned(4, 12, noise=3.0))  # classes that overlap a little
    names = [f"c{i}" for i in range(CLASSES)]
    choice = choose_unknown_test(val, names, train=train, folds=3, seed=1, neighbour_grid=(1, 5))
    scored = [result for result in choice.results if not result.skipped]
    assert {result.candidate.method for result in scored if result.candidate.method != "ensemble"} == {
        "msp", "energy", "mahalanobis", "relative_mahalanobis", "nearest_mahalanobis", "knn"
    }  # fmt: skip
    for result in scored:
        assert set(result.view_auroc) == set(STAND_IN_VIEWS)
        per_view = np.array([result.view_auroc[view] for view in STAND_IN_VIEWS])  # [views, folds]
        assert per_view.shape == (len(STAND_IN_VIEWS), 3)
        np.testing.assert_allclose(result.fold_auroc, per_view.mean(axis=0), atol=1e-9)
        record = result.record()
        assert set(record["view_auroc"]) == set(STAND_IN_VIEWS)
        assert all(len(values) == 3 for values in record["view_auroc"].values())
    # The views differ: the held-out classes' own directions make them easy as learned; moved onto the kept classes'
    # span they sit among the kept classes, harder for the distance to the nearest training photo
    knn = next(r for r in scored if r.candidate.method == "knn" and r.candidate.neighbours == 1)
    assert np.mean(knn.view_auroc["as_learned"]) > np.mean(knn.view_auroc["onto_kept_span"]) + 0.05
    # The printed table shows each view's mean
    table = choice.format()
    assert all(view in table.splitlines()[1] for view in STAND_IN_VIEWS)
    row = next(line for line in table.splitlines() if " knn " in line and "k=1 " in line)
    assert f"{np.mean(knn.view_auroc['onto_kept_span']):.4f}" in row
    # Without training photos there is nothing to fit a view on: the logit tests alone, no views
    logits_only = choose_unknown_test(val, names, folds=3)
    assert all(result.view_auroc == {} for result in logits_only.results)


@pytest.mark.parametrize("folds", [2, 4])
def test_the_same_photos_give_the_same_choice(folds: int) -> None:
    (train, val) = (_learned(5, 20), _learned(6, 8))
    names = [f"c{i}" for i in range(CLASSES)]
    first = choose_unknown_test(val, names, train=train, folds=folds, seed=3, neighbour_grid=(1, 3))
    again = choose_unknown_test(val, names, train=train, folds=folds, seed=3, neighbour_grid=(1, 3))
    assert first.record() == again.record()
