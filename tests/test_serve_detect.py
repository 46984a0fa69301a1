"""``birder-serve --detector``: ``POST /v1/detect`` on a real server, a tiny classifier and a tiny detector."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from detect_support import BOX_SCORE, BOXES_PER_PHOTO, save_tiny_detector, tiny_detector
from serve_support import RGB_STATS, SPECIES, make_photos, running_server, saved_and_loaded_tiny_model

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

import birder  # noqa: E402 (after the extras check)
from birder.inference.classification import infer_batch  # noqa: E402
from birder.inference.crops import crop_box  # noqa: E402
from birder.inference.decision import build_policy  # noqa: E402
from birder.inference.detection import detection_transform, infer_image  # noqa: E402
from birder.io.images import load_image  # noqa: E402
from birder.scripts import serve as serve_script  # noqa: E402
from birder.serve.app import create_app  # noqa: E402
from birder.serve.detect import ServedDetector  # noqa: E402

TIMEOUT = 60
MARGIN = 0.2


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, dict[str, Path], object, object]]:
    directory = tmp_path_factory.mktemp("serve-detect")
    (net, model_info) = saved_and_loaded_tiny_model(directory)
    photos = make_photos(directory / "photos")
    (det, det_info) = tiny_detector()
    served = ServedDetector(det, det_info, "tiny-det", threshold=0.5, margin=MARGIN)
    # Unclear species fall back to one genus: the answer of each box follows the decision order
    taxonomy = directory / "taxonomy.csv"
    taxonomy.write_text("species,genus,family,order\n" + "".join(f"{name},Avis,Avidae,Aviformes\n" for name in SPECIES))
    policy = build_policy(net, SPECIES, min_prob=0.99, taxonomy=taxonomy)
    with (
        running_server(create_app(net, model_info, name="tiny-birds", detector=served, policy=policy)) as url,
        running_server(create_app(net, model_info, name="plain")) as plain_url,
    ):
        yield (url, plain_url, photos, net, model_info)


def _post(url: str, path: Path, **params: str) -> httpx.Response:
    with open(path, "rb") as handle:
        return httpx.post(f"{url}/v1/detect", files={"image": (path.name, handle)}, params=params, timeout=TIMEOUT)


def test_models_says_whether_detect_is_served(site: tuple) -> None:
    (url, plain_url, photos, _, _) = site
    described = httpx.get(f"{url}/v1/models", timeout=TIMEOUT).json()
    assert described["detect"] is True and described["detector"]["classes"] == ["bird"]
    assert described["detector"]["threshold"] == 0.5 and described["detector"]["crop_margin"] == MARGIN
    plain = httpx.get(f"{plain_url}/v1/models", timeout=TIMEOUT).json()
    assert plain["detect"] is False and "detector" not in plain
    response = _post(plain_url, photos["robin.jpg"])
    assert response.status_code == 404 and "error" in response.json()


def test_each_box_is_the_librarys_crop_then_classify(site: tuple) -> None:
    (url, _, photos, net, model_info) = site
    (det, det_info) = tiny_detector()
    transform = birder.classification_transform(birder.get_size_from_signature(model_info.signature), RGB_STATS)
    for name in ("robin.jpg", "rotated.jpg"):
        response = _post(url, photos[name], top_k="3")
        assert response.status_code == 200, response.text
        body = response.json()
        photo = load_image(photos[name])
        assert body["image"] == {"width": photo.width, "height": photo.height}
        assert body["model"] == "tiny-birds" and body["detector"] == "tiny-det"

        expected = infer_image(det, photo, detection_transform(det.size, det_info.rgb_stats), score_threshold=0.5)
        assert len(body["detections"]) == len(expected.boxes) == BOXES_PER_PHOTO
        for box, reference in zip(body["detections"], expected.boxes.tolist(), strict=True):
            np.testing.assert_allclose(box["box"], reference, atol=0.01)
            assert box["det_class"] == "bird" and box["det_score"] == pytest.approx(BOX_SCORE, abs=1e-5)
            crop = transform(crop_box(photo, reference, MARGIN)).unsqueeze(0)
            (probs, _) = infer_batch(net, crop)
            order = np.argsort(-probs[0], kind="stable")[:3]
            assert [p["species"] for p in box["predictions"]] == [SPECIES[i] for i in order]
            np.testing.assert_allclose([p["probability"] for p in box["predictions"]], probs[0][order], atol=1e-5)
            # No species reaches 0.99: each box falls back to the genus, which holds them all
            assert (box["label"], box["rank"]) == ("Avis", "genus")
            assert box["label_probability"] == pytest.approx(1.0, abs=1e-5)
        assert set(body["timing_ms"]) == {"detect", "classify", "total"}


def test_threshold_and_bad_requests(site: tuple, tmp_path: Path) -> None:
    (url, _, photos, _, _) = site
    response = _post(url, photos["wren.png"], threshold="0.95")
    assert response.status_code == 200 and response.json()["detections"] == []
    for value, fragment in (("2", "between 0 and 1"), ("high", "must be a number")):
        response = _post(url, photos["wren.png"], threshold=value)
        assert response.status_code == 400 and fragment in response.json()["error"]
    not_a_photo = tmp_path / "notes.jpg"
    not_a_photo.write_text("no pixels here")
    response = _post(url, not_a_photo)
    assert response.status_code == 422 and "not a recognised image format" in response.json()["error"]


def command_error(capsys: pytest.CaptureFixture) -> str:
    """The command's error: exactly one line starting with its name (log lines of the run may come before it)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("birder-serve:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_command_line_refuses_a_classifier_as_detector(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    saved_and_loaded_tiny_model(tmp_path)  # writes tiny_birds.safetensors
    classifier = tmp_path / "tiny_birds.safetensors"
    code = serve_script.main(["--weights", str(classifier), "--detector", str(classifier), "--port", "0"])
    error = command_error(capsys)
    assert code == 2 and "not a detector file" in error
    with pytest.raises(SystemExit):
        serve_script.main(["--weights", str(classifier), "--det-threshold", "1.5"])
    assert "--det-threshold must be between 0 and 1" in capsys.readouterr().err
    detector = save_tiny_detector(tmp_path / "det.pt")
    code = serve_script.main(["--weights", str(detector)])
    error = command_error(capsys)
    assert code == 2 and "a detector file" in error and "--detector" in error
