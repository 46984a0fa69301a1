"""birder-serve on what a sweep of hostile-but-honest requests found: JSON numbers for the place, every route under
--timeout, explanations limited in number, decoding within its memory, paths of /v1/similar, no CDN page, HEAD
/healthz, thin photos on /v1/detect, and the command's own options."""

import base64
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from detect_support import tiny_detector
from PIL import Image
from serve_support import SPECIES, encode, make_photos, running_server, saved_and_loaded_tiny_model

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402 (after the extras check)

from birder.geo.prior import LocationPrior  # noqa: E402
from birder.geo.records import Records  # noqa: E402
from birder.serve.app import ServeSettings, create_app  # noqa: E402
from birder.serve.detect import ServedDetector  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PLACE = (48.2, 16.3)
CLIENT_TIMEOUT = 60


def tiny_prior() -> LocationPrior:
    rng = np.random.default_rng(2)
    records = Records(
        PLACE[0] + rng.standard_normal(300) * 0.5,
        PLACE[1] + rng.standard_normal(300) * 0.5,
        rng.integers(100, 200, 300).astype(np.int16),
        np.full(300, SPECIES.index("Great Tit"), np.int32),
        np.ones(300, np.float32),
    )
    return LocationPrior.build(records, SPECIES)


def png(size: tuple[int, int] = (40, 30), seed: int = 0, mode: str = "RGB") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels).convert(mode), "PNG")


def json_photo(**fields: Any) -> dict[str, Any]:
    return {"json": {"image": base64.b64encode(png()).decode(), **fields}}


@pytest.fixture(scope="module")
def with_prior(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    (net, info) = saved_and_loaded_tiny_model(tmp_path_factory.mktemp("prior"))
    with TestClient(create_app(net, info, name="tiny", prior=tiny_prior())) as client:
        yield client


# ---------------------------------------------------------------------------------------------------------------------
# The place and date as JSON
# ---------------------------------------------------------------------------------------------------------------------


def test_json_place_as_floats_integers_or_text_gives_the_same_answer(with_prior: TestClient) -> None:
    answers = {
        "floats": with_prior.post("/v1/classify", **json_photo(lat=PLACE[0], lon=PLACE[1], date="2023-05-14")),
        "text": with_prior.post("/v1/classify", **json_photo(lat="48.2", lon=" 16.3 ", date="2023-05-14")),
        "float and text": with_prior.post("/v1/classify", **json_photo(lat=48.2, lon="16.3", date="2023-05-14")),
    }
    for kind, answer in answers.items():
        assert answer.status_code == 200, (kind, answer.text)
        assert answer.json()["prior"]["mode"] == "place_day", kind
        assert answer.json()["predictions"] == answers["floats"].json()["predictions"], kind
    integers = with_prior.post("/v1/classify", **json_photo(lat=48, lon=16))
    assert integers.status_code == 200 and integers.json()["prior"]["mode"] == "place"
    absent = with_prior.post("/v1/classify", **json_photo(lat=None, lon=None))
    assert absent.status_code == 200 and absent.json()["prior"]["mode"] == "none"


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"lat": 95.5, "lon": 16.3}, "'lat'"),
        ({"lat": 48.2, "lon": -180.01}, "'lon'"),
        ({"lat": "abc", "lon": 16.3}, "'lat'"),
        ({"lat": True, "lon": 16.3}, "'lat'"),
        ({"lat": 48.2, "lon": [16, 3]}, "'lon'"),
        ({"lat": 48.2}, "'lat' and 'lon'"),
        ({"lat": 48.2, "lon": 16.3, "date": 2023.5}, "'date'"),
    ],
)
def test_json_place_out_of_range_or_not_a_number_is_a_400_naming_the_field(
    with_prior: TestClient, fields: dict[str, Any], named: str
) -> None:
    answer = with_prior.post("/v1/classify", **json_photo(**fields))
    assert answer.status_code == 400, answer.text
    assert set(answer.json()) == {"error"} and named in answer.json()["error"]


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"image": "", "top_k": ' + b"1" * 5000 + b"}"])
def test_json_nested_too_deep_or_with_a_huge_integer_is_a_400(with_prior: TestClient, body: bytes) -> None:
    answer = with_prior.post("/v1/classify", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 400 and "not valid JSON" in answer.json()["error"]


# ---------------------------------------------------------------------------------------------------------------------
# Every route under --timeout; explanations limited in number; decoding within its memory
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def everything(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any, Path]]:
    """A server with an index and a detector, one decode thread, a short timeout and one explanation at a time."""
    pytest.importorskip("faiss")
    from birder.search.build import IndexOptions, run_index
    from birder.search.store import PhotoIndex

    directory = tmp_path_factory.mktemp("everything")
    (net, info) = saved_and_loaded_tiny_model(directory)
    make_photos(directory / "photos" / "garden")
    make_photos(directory / "photos" / "forest")
    options = IndexOptions([directory / "photos"], directory / "index", weights=directory / "tiny_birds.safetensors")
    (options.num_workers, options.progress) = (0, False)
    run_index(options, add=False)
    (detector, detector_info) = tiny_detector()
    settings = ServeSettings(timeout_s=1.0, decode_workers=1, max_explanations=1, max_decode_bytes=24 * 2**20)
    app = create_app(
        net,
        info,
        settings=settings,
        photo_index=PhotoIndex(directory / "index"),
        detector=ServedDetector(detector, detector_info, "tiny-det"),
    )
    with running_server(app) as url:
        yield (url, app.state.service, directory)


PHOTO_ROUTES = ["/v1/classify", "/v1/embed", "/v1/explain", "/v1/similar", "/v1/detect"]


def test_every_route_answers_504_past_the_timeout_and_the_server_recovers(everything: tuple[str, Any, Path]) -> None:
    (url, service, _) = everything
    unblock = threading.Event()
    # The decode thread and the model stalled: whatever a request waits for, it waits past the timeout
    stalled = service.decode_pool.submit(unblock.wait, 30)
    service.model_lock.acquire()
    try:
        for route in [*PHOTO_ROUTES, "/v1/similar/photos/0"]:
            started = time.monotonic()
            if route.startswith("/v1/similar/photos"):
                answer = httpx.get(url + route, timeout=CLIENT_TIMEOUT)
            else:
                answer = httpx.post(url + route, files={"image": ("p.png", png())}, timeout=CLIENT_TIMEOUT)
            assert answer.status_code == 504, (route, answer.text)
            assert "timed out after 1 s" in answer.json()["error"]
            assert time.monotonic() - started < 10, route
    finally:
        service.model_lock.release()
        unblock.set()
    stalled.result(timeout=30)

    for route in PHOTO_ROUTES:
        answer = httpx.post(url + route, files={"image": ("p.png", png())}, timeout=CLIENT_TIMEOUT)
        assert answer.status_code == 200, (route, answer.text)
    assert httpx.get(url + "/v1/similar/photos/0", timeout=CLIENT_TIMEOUT).status_code == 200


def test_explanations_beyond_the_limit_get_503_while_one_waits_its_turn(everything: tuple[str, Any, Path]) -> None:
    (url, service, _) = everything
    answers: dict[str, Any] = {}

    def explain(key: str) -> None:
        answers[key] = httpx.post(f"{url}/v1/explain", files={"image": ("p.png", png())}, timeout=CLIENT_TIMEOUT)

    service.model_lock.acquire()  # the first explanation gets its place, then waits for the model
    first = threading.Thread(target=explain, args=("first",))
    try:
        first.start()
        deadline = time.monotonic() + 10
        while service.explanations.held == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        explain("second")
    finally:
        service.model_lock.release()
        first.join(timeout=30)

    assert answers["second"].status_code == 503, answers["second"].text
    assert "explanations are already waiting or running" in answers["second"].json()["error"]
    assert answers["first"].status_code == 200, answers["first"].text
    assert service.explanations.held == 0


def test_a_photo_needing_more_memory_to_decode_than_the_server_has_is_a_413(everything: tuple[str, Any, Path]) -> None:
    (url, _, _) = everything
    # 1000 x 1000 at 16 bits a pixel: about 50 MB counted to decode (float64 scaling), over the 24 MiB given
    deep = encode(Image.fromarray(np.full((1000, 1000), 30_000, dtype=np.uint16)), "PNG")
    refused = httpx.post(f"{url}/v1/classify", files={"image": ("deep.png", deep)}, timeout=CLIENT_TIMEOUT)
    assert refused.status_code == 413, refused.text
    assert "deep.png" in refused.json()["error"] and "--max-decode-mb" in refused.json()["error"]
    # The same pixels with 8 bits a channel fit
    plain = encode(Image.fromarray(np.full((1000, 1000, 3), 117, dtype=np.uint8)), "JPEG")
    assert httpx.post(f"{url}/v1/classify", files={"image": ("plain.jpg", plain)}, timeout=CLIENT_TIMEOUT).is_success


def test_similar_photos_are_named_relative_to_their_folder(everything: tuple[str, Any, Path]) -> None:
    (url, _, directory) = everything
    answer = httpx.post(f"{url}/v1/similar?k=10", files={"image": ("p.png", png())}, timeout=CLIENT_TIMEOUT)
    assert answer.status_code == 200, answer.text
    paths = [result["path"] for result in answer.json()["results"]]
    assert len(paths) == 10
    assert str(directory) not in answer.text and not any(os.path.isabs(path) for path in paths)
    photos = {path.relative_to(directory / "photos").as_posix() for path in (directory / "photos").rglob("*.*")}
    assert {Path(path).as_posix() for path in paths} <= photos


def test_detect_takes_photos_thinner_than_the_detectors_patches(everything: tuple[str, Any, Path]) -> None:
    (url, _, _) = everything
    for size in ((96, 1), (1, 96), (3000, 20)):
        answer = httpx.post(f"{url}/v1/detect", files={"image": ("thin.png", png(size))}, timeout=CLIENT_TIMEOUT)
        assert answer.status_code == 200, (size, answer.text)
        assert answer.json()["image"] == {"width": size[0], "height": size[1]}
        for found in answer.json()["detections"]:
            (x1, y1, x2, y2) = found["box"]
            assert 0 <= x1 <= x2 <= size[0] and 0 <= y1 <= y2 <= size[1]


# ---------------------------------------------------------------------------------------------------------------------
# Pages and methods
# ---------------------------------------------------------------------------------------------------------------------


def test_no_page_loads_from_a_cdn_and_the_schema_describes_the_photo_routes(with_prior: TestClient) -> None:
    for page in ("/docs", "/redoc"):
        answer = with_prior.get(page)
        assert answer.status_code == 404 and set(answer.json()) == {"error"}
    schema = with_prior.get("/openapi.json")
    assert schema.status_code == 200
    classify = schema.json()["paths"]["/v1/classify"]["post"]
    assert set(classify["requestBody"]["content"]) >= {"multipart/form-data", "application/json", "image/jpeg"}
    assert {parameter["name"] for parameter in classify["parameters"]} == {"top_k", "lat", "lon", "date"}
    assert classify["responses"]["413"]["content"]["application/json"]["schema"]["required"] == ["error"]
    assert "https://" not in json.dumps(schema.json())


def test_head_healthz_answers_like_get(with_prior: TestClient) -> None:
    head = with_prior.head("/healthz")
    assert head.status_code == 200 and head.headers["content-type"] == "application/json" and head.content == b""
    assert with_prior.get("/healthz").json()["status"] == "ok"


# ---------------------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------------------


def test_cli_refuses_a_prior_strength_that_is_not_a_finite_number(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import uvicorn

    from birder.geo.prior_file import save_prior
    from birder.scripts import serve

    saved_and_loaded_tiny_model(tmp_path)
    prior = save_prior(tiny_prior(), tmp_path / "prior.bpr")
    served: list[object] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **_: served.append(app))
    for strength in ("nan", "inf"):
        argv = ["--weights", str(tmp_path / "tiny_birds.safetensors"), "--prior", str(prior)]
        with pytest.raises(SystemExit) as refused:  # refused by the option's type, as in birder-predict
            serve.main([*argv, "--prior-strength", strength])
        assert refused.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert "--prior-strength: must be a finite number >= 0" in error
    assert served == []


def test_cli_decode_memory_option_reaches_the_settings_and_must_hold_one_photo(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from birder.scripts import serve

    parser = serve.build_parser()
    args = parser.parse_args(["-n", "x", "--max-decode-mb", "700", "--max-explanations", "3"])
    serve._check_args(parser, args)
    settings = serve.settings_from_args(args)
    assert settings.max_decode_bytes == 700 * 2**20 and settings.max_explanations == 3
    default = serve.settings_from_args(parser.parse_args(["-n", "x", "--max-pixels", "1000000"]))
    assert default.max_decode_bytes == ServeSettings(max_pixels=1_000_000).max_decode_bytes > 24_000_000

    with pytest.raises(SystemExit) as exited:
        serve._check_args(parser, parser.parse_args(["-n", "x", "--max-decode-mb", "100"]))
    assert exited.value.code == 2 and "cannot hold one 8-bit photo of --max-pixels" in capsys.readouterr().err


def test_index_commands_print_no_faiss_loader_lines() -> None:
    pytest.importorskip("faiss")
    code = (
        "import logging; from birder.log_setup import configure_logging;"
        "configure_logging(logging.INFO, '%(message)s'); from birder.search.vectors import import_faiss;"
        "import_faiss(); logging.getLogger('birder').info('done')"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["done"]
