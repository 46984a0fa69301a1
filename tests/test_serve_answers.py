"""The answer in birder-serve: label, rank, label_probability and unknown_score beside the species top-k, from the
same decision order as birder-predict (birder.inference.decision), for a calibrated model."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from serve_support import SPECIES, expected_outputs, make_photos, running_server, saved_and_loaded_tiny_model

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

import birder  # noqa: E402 (after the extras check)
from birder.inference.calibration import softmax  # noqa: E402
from birder.inference.classification import logits_from_embeddings  # noqa: E402
from birder.inference.decision import build_policy  # noqa: E402
from birder.io.calibration import Calibration  # noqa: E402
from birder.scripts import serve as serve_script  # noqa: E402
from birder.serve.app import create_app  # noqa: E402

TIMEOUT = 60
GENUS = "Avis"
# Every species in one genus: an unclear species falls back to it (the sum of all probabilities)
TAXONOMY = "species,genus,family,order\n" + "".join(f"{name},{GENUS},Avidae,Aviformes\n" for name in SPECIES)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Path]]:
    """A tiny model file calibrated with T = 3 and an msp unknown test, its taxonomy, and photos."""
    directory = tmp_path_factory.mktemp("answers")
    (net, info) = saved_and_loaded_tiny_model(directory)
    net.calibration = Calibration(temperature=3.0, unknown_method="msp", unknown_thresholds={"msp": 0.999})
    model = birder.save_model(net, directory / "calibrated.safetensors", info)
    (directory / "taxonomy.csv").write_text(TAXONOMY)
    return (model, directory / "taxonomy.csv", make_photos(directory / "photos"))


@pytest.fixture(scope="module")
def served(calibrated: tuple[Path, Path, dict[str, Path]]) -> Iterator[tuple[str, object, object]]:
    (model, taxonomy, _) = calibrated
    (net, info) = birder.load_model(model, inference=True)
    policy = build_policy(net, SPECIES, min_prob=0.99, taxonomy=taxonomy, unknown_method="msp", unknown_threshold=0.9)
    with running_server(create_app(net, info, name="calibrated", policy=policy)) as url:
        yield (url, net, info)


def test_classify_answers_with_the_calibrated_decision(served, calibrated) -> None:
    (url, net, info) = served
    (_, taxonomy, photos) = calibrated
    policy = build_policy(net, SPECIES, min_prob=0.99, taxonomy=taxonomy, unknown_method="msp", unknown_threshold=0.9)
    for path in photos.values():
        body = httpx.post(f"{url}/v1/classify", files={"image": path.read_bytes()}, timeout=TIMEOUT).json()
        (probs, embedding) = expected_outputs(net, info, path)  # infer_batch: calibrated by default
        logits = logits_from_embeddings(net, embedding[None])[0]
        np.testing.assert_allclose(probs, softmax(logits[None], 3.0)[0], atol=1e-6)
        assert body["predictions"][0]["probability"] == pytest.approx(float(probs.max()), abs=1e-5)
        expected = policy.decide(probs[None], embeddings=embedding[None]).row(0)
        assert {key: body[key] for key in expected} == pytest.approx(expected, abs=1e-5)
        assert body["label"] in (*SPECIES, GENUS, "unknown")
        assert body["rank"] == {"unknown": ""}.get(body["label"], "species" if body["label"] in SPECIES else "genus")

    models = httpx.get(f"{url}/v1/models", timeout=TIMEOUT).json()["models"][0]
    assert models["answer"]["temperature"] == 3.0 and models["answer"]["taxonomy"] is True
    assert models["answer"]["unknown_method"] == "msp"


def test_the_default_answer_is_the_top_species_of_an_uncalibrated_model(tmp_path: Path) -> None:
    (net, info) = saved_and_loaded_tiny_model(tmp_path)
    photo = make_photos(tmp_path / "photos")["robin.jpg"]
    with running_server(create_app(net, info, name="plain")) as url:
        body = httpx.post(f"{url}/v1/classify", files={"image": photo.read_bytes()}, timeout=TIMEOUT).json()
    (probs, _) = expected_outputs(net, info, photo)
    assert body["label"] == SPECIES[int(np.argmax(probs))] == body["predictions"][0]["species"]
    assert body["rank"] == "species" and body["unknown_score"] is None
    assert body["label_probability"] == pytest.approx(float(probs.max()), abs=1e-5)


def test_serve_command_refuses_bad_answer_options_in_one_line(calibrated, capsys) -> None:
    (model, _, _) = calibrated
    bad = model.with_name("bad.csv")
    bad.write_text("species,genus,family,order\n" + f"{SPECIES[0]},A,B,C\n")
    for args, expected in (
        (["--taxonomy", str(bad)], "4 of the model's species are missing"),
        (["--unknown-method", "energy"], "no threshold for the 'energy' unknown test"),
        (["--unknown-method", "knn", "--unknown-threshold", "0.1"], "needs class statistics"),
    ):
        assert serve_script.main(["--weights", str(model), "--device", "cpu", *args]) == 2
        # The last line: log lines of the loading (the dtype chosen) may come before it
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("birder-serve: ") and expected in err, err


def test_uncalibrated_serving_gives_the_raw_probabilities(calibrated) -> None:
    (model, _, photos) = calibrated
    (net, info) = birder.load_model(model, inference=True)
    policy = build_policy(net, SPECIES, calibrated=False)  # what birder-serve --uncalibrated builds
    photo = photos["robin.jpg"]
    with running_server(create_app(net, info, name="raw", policy=policy)) as url:
        body = httpx.post(f"{url}/v1/classify", files={"image": photo.read_bytes()}, timeout=TIMEOUT).json()
    (_, embedding) = expected_outputs(net, info, photo)
    raw = softmax(logits_from_embeddings(net, embedding[None]), 1.0)[0]
    assert body["predictions"][0]["probability"] == pytest.approx(float(raw.max()), abs=1e-5)
    assert body["label_probability"] == pytest.approx(float(raw.max()), abs=1e-5)
