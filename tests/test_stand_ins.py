"""Stand-in unknowns made from known photos (birder.inference.stand_ins), the network's outputs for them
(collect_stand_in_outputs) and the score the unknown-test choice ranks by with them."""

from pathlib import Path

import numpy as np
import pytest
import torch
from test_calibration import model_and_photos  # noqa: F401 (a fixture)
from test_unknown_choice import NAMES_12, Photos, _world, calibrate_argv, single_thread  # noqa: F401 (autouse fixture)

import birder
from birder.inference.labeled import collect_outputs, collect_stand_in_outputs, labeled_photos
from birder.inference.stand_ins import MADE_KINDS, TILES, make_stand_in, pair_sources
from birder.inference.unknown_choice import SelectionError, choose_unknown_test
from birder.io.images import load_image
from birder.scripts import calibrate as calibrate_script


def _photo(seed: int, size: tuple[int, int] = (16, 16), grey: bool = False) -> torch.Tensor:
    pixels = torch.rand((1 if grey else 3, *size), generator=torch.Generator().manual_seed(seed))
    return pixels.expand(3, *size).clone() if grey else pixels


def test_pairs_are_of_two_classes_and_the_same_seed_gives_the_same_pairs() -> None:
    targets = np.repeat(np.arange(4), 5)
    pairs = pair_sources(targets, 500, np.random.default_rng(0))
    assert pairs.shape == (500, 2)
    assert (targets[pairs[:, 0]] != targets[pairs[:, 1]]).all()
    assert len(np.unique(pairs[:, 0])) == len(targets)  # every photo gets used
    np.testing.assert_array_equal(pairs, pair_sources(targets, 500, np.random.default_rng(0)))
    # One class only: any two photos (no other class to pair with)
    assert pair_sources(np.zeros(6, int), 10, np.random.default_rng(0)).shape == (10, 2)


def test_each_kind_makes_what_it_says() -> None:
    (first, second) = (_photo(0), _photo(1))
    rng = np.random.default_rng(0)
    torch.testing.assert_close(make_stand_in(first, second, "blend", rng), (first + second) / 2)

    for _ in range(6):  # either half, each from one of the two photos
        cut = make_stand_in(first, second, "cutmix", rng)
        left = torch.equal(cut[:, :, :8], first[:, :, :8]) and torch.equal(cut[:, :, 8:], second[:, :, 8:])
        top = torch.equal(cut[:, :8], first[:, :8]) and torch.equal(cut[:, 8:], second[:, 8:])
        assert left or top

    shuffled = make_stand_in(first, second, "shuffle", rng)
    side = 16 // TILES
    tiles = {
        first[:, r : r + side, c : c + side].numpy().tobytes() for r in range(0, 16, side) for c in range(0, 16, side)
    }
    moved = {
        shuffled[:, r : r + side, c : c + side].numpy().tobytes()
        for r in range(0, 16, side)
        for c in range(0, 16, side)
    }
    assert moved == tiles and not torch.equal(shuffled, first)  # the same tiles, elsewhere

    swapped = make_stand_in(first, second, "channels", rng)
    orders = [order for order in ((0, 1, 2), (1, 2, 0), (2, 0, 1), (0, 2, 1), (2, 1, 0), (1, 0, 2))]
    matched = [order for order in orders if torch.equal(swapped, first[list(order)])]
    assert matched and matched != [(0, 1, 2)]
    grey = _photo(2, grey=True)
    torch.testing.assert_close(make_stand_in(grey, second, "channels", rng), 1.0 - grey)  # no colours to swap

    turned = make_stand_in(first, second, "rotate", rng)
    assert any(torch.equal(turned, torch.rot90(first, k, dims=(1, 2))) for k in (1, 2, 3))
    wide = _photo(3, size=(8, 16))
    torch.testing.assert_close(make_stand_in(wide, second, "rotate", rng), torch.rot90(wide, 2, dims=(1, 2)))
    with pytest.raises(ValueError, match="unknown kind of stand-in 'melt'"):
        make_stand_in(first, second, "melt", rng)


def test_made_photos_go_through_the_network_as_decoded_photos_do(
    model_and_photos: tuple[Path, Path, Path],  # noqa: F811 (the fixture)
) -> None:
    (model, val, _) = model_and_photos
    (net, info) = birder.load_model(model, inference=True)
    transform = birder.classification_transform(birder.get_size_from_signature(info.signature), info.rgb_stats)
    photos = labeled_photos(val, info.class_to_idx)
    known = collect_outputs(net, transform, photos.paths, photos.targets)

    made = collect_stand_in_outputs(net, transform, known, 6, seed=3, batch_size=4)
    assert list(made) == list(MADE_KINDS)
    for outputs in made.values():
        assert outputs.embeddings.shape == (6, known.embeddings.shape[1]) and (outputs.targets == -1).all()
    # The same seed gives the same photos whatever the batching
    again = collect_stand_in_outputs(net, transform, known, 6, seed=3, batch_size=7)
    for kind in MADE_KINDS:
        np.testing.assert_allclose(again[kind].embeddings, made[kind].embeddings, atol=1e-5)
        assert again[kind].paths == made[kind].paths

    # A blend made by hand from the two decoded photos its path names, through the same transform and network
    (first, second) = made["blend"].paths[0].removeprefix("blend:").split("+")
    mean = torch.tensor(info.rgb_stats["mean"]).view(3, 1, 1)
    std = torch.tensor(info.rgb_stats["std"]).view(3, 1, 1)
    pixels = [transform(load_image(path)) * std + mean for path in (first, second)]
    by_hand = ((pixels[0] + pixels[1]) / 2 - mean) / std
    with torch.inference_mode():
        embedding = net.embedding(by_hand[None]).numpy()
    np.testing.assert_allclose(made["blend"].embeddings[0], embedding[0], atol=1e-4)
    # None asked for: none made
    assert collect_stand_in_outputs(net, transform, known, 0) == {}


def test_made_stand_ins_count_beside_the_folds_and_can_turn_the_choice() -> None:
    # Logits only: on the folds msp is clearly the better test (every photo's logits carry an offset of its own,
    # which moves energy and not the softmax). Made stand-ins whose logits are known photos' lowered by a constant
    # (as confident a softmax, far less energy) are seen by energy alone
    (_, val, _, _) = _world("shifted", seed=3)
    rows = np.random.default_rng(0).integers(len(val.targets), size=40)
    made = {"blend": Photos(val.logits[rows] - 40.0, val.embeddings[rows], np.full(40, -1))}
    folds_only = choose_unknown_test(val, NAMES_12, folds=4, seed=0)
    both = choose_unknown_test(val, NAMES_12, folds=4, seed=0, made=lambda: made)
    assert folds_only.chosen.method == "msp" and both.chosen.method == "energy", both.format()
    # The folds' figures are the same with or without them; the score is the lower of the two sorts' figures
    assert [r.fold_auroc for r in both.results] == [r.fold_auroc for r in folds_only.results]
    for result in both.results:
        assert set(result.made_auroc) == {"blend"}
        assert result.score == pytest.approx(min(result.mean, result.made_auroc["blend"]))
    assert all(result.score == result.mean for result in folds_only.results)
    assert "blend" in both.format() and "score" in both.format()


def test_with_training_photos_every_candidate_and_the_ensemble_get_the_made_figures() -> None:
    (train, val, _, _) = _world("nuisance", seed=3)
    rows = np.random.default_rng(0).integers(len(val.targets), size=40)
    shifted = val.embeddings[rows].copy()
    shifted[:, -4:] += 1.0  # off every class along the dimensions where classes are tight
    made = {"blend": Photos(val.logits[rows], shifted, np.full(40, -1))}
    choice = choose_unknown_test(val, NAMES_12, train=train, folds=4, seed=0, made=lambda: made)
    scored = [result for result in choice.results if not result.skipped]
    assert {result.candidate.method for result in scored} >= {"msp", "knn", "mahalanobis", "ensemble"}
    assert all(set(result.made_auroc) == {"blend"} for result in scored)
    # Near by cosine, far by the covariance: the Mahalanobis tests see them, knn does not
    best = {
        method: max(r.made_auroc["blend"] for r in scored if r.candidate.method == method)
        for method in ("knn", "mahalanobis")
    }
    assert best["mahalanobis"] > best["knn"] + 0.3
    assert choice.chosen.method != "ensemble" and not np.isnan(choice.results[-1].score)


def test_calibrate_without_made_stand_ins_chooses_on_the_folds_and_refuses_a_negative_count(
    model_and_photos: tuple[Path, Path, Path],  # noqa: F811 (the fixture)
    tmp_path: Path,
    capsys,
) -> None:
    output = tmp_path / "calibrated.pt"
    argv = [*calibrate_argv(*model_and_photos, output), "--unknown-folds", "3", "-j", "0", "--no-progress"]
    assert calibrate_script.main([*argv, "--stand-in-photos", "-1"]) == 2
    assert "--stand-in-photos must be 0 or more, got -1" in capsys.readouterr().err
    assert not output.exists()
    assert calibrate_script.main([*argv, "--stand-in-photos", "0"]) == 0
    assert "kinds of stand-ins made" not in capsys.readouterr().out
    (net, _) = birder.load_model(output)
    for candidate in net.calibration.unknown_selection["candidates"]:
        if candidate["skipped"] is None:
            assert candidate["made_auroc"] == {} and candidate["score"] == candidate["mean"]


def test_no_stand_ins_are_made_when_the_photos_cannot_support_a_choice() -> None:
    # Two classes cannot be split into folds; making the stand-ins (1,000 photos through the network) would be wasted
    (train, val, _, _) = _world("nuisance", seed=3)
    two = np.isin(val.targets, [0, 1])
    calls = []

    def made() -> dict:
        calls.append(1)
        return {}

    with pytest.raises(SelectionError, match="at least 3 classes"):
        choose_unknown_test(Photos(val.logits[two], val.embeddings[two], val.targets[two]), NAMES_12, made=made)
    assert calls == []
    choose_unknown_test(val, NAMES_12, train=train, folds=4, seed=0, made=made)
    assert calls == [1]  # once, where the choice is made
