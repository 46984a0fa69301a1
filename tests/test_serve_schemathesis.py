"""birder-serve against its own OpenAPI schema: Schemathesis sends generated requests to every route.

A real uvicorn server on 127.0.0.1 serves a tiny classifier with everything switched on (a location prior, a photo
index for /v1/similar, a detector for /v1/detect). For each operation of /openapi.json, Hypothesis draws requests
that fit the schema (photos of every kind among the bodies, numbers in range) and requests that do not (negative
mode: missing or wrongly typed fields, values out of range). No answer may be a 5xx; every 4xx must be the JSON
error body ``{"error": "<one line>"}``. The draws are derandomized: the same requests on every run.
"""

import base64
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from detect_support import tiny_detector
from PIL import Image
from serve_support import SPECIES, make_photos, running_server, saved_and_loaded_tiny_model

pytest.importorskip("fastapi")
pytest.importorskip("faiss")
schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402 (after the extras check)
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.specs.openapi import formats  # noqa: E402

from birder.geo.prior import LocationPrior  # noqa: E402
from birder.geo.records import Records  # noqa: E402
from birder.search.build import IndexOptions, run_index  # noqa: E402
from birder.search.store import PhotoIndex  # noqa: E402
from birder.serve.app import ServeSettings, create_app  # noqa: E402
from birder.serve.detect import ServedDetector  # noqa: E402

# Requests per operation and mode: routes that read a photo get the most (their bodies and fields vary most)
PHOTO_EXAMPLES = {GenerationMode.POSITIVE: 36, GenerationMode.NEGATIVE: 14}
OTHER_EXAMPLES = {GenerationMode.POSITIVE: 8, GenerationMode.NEGATIVE: 8}
CLIENT_TIMEOUT = 60
PHOTO_MEDIA_TYPES = ("image/jpeg", "image/png", "application/octet-stream")


def _encode(image: Image.Image, file_format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=file_format, **options)
    return buffer.getvalue()


@st.composite
def photo_files(draw: st.DrawFn) -> bytes:
    """Image files as clients send them: modes, formats, sizes, EXIF rotations; and broken ones."""
    width = draw(st.integers(1, 96))
    height = draw(st.integers(1, 96))
    seed = draw(st.integers(0, 2**16))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    kind = draw(st.sampled_from(["rgb", "rgba", "gray", "palette", "16bit", "cmyk", "rotated"]))
    file_format = draw(st.sampled_from(["PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP"]))
    if kind == "rgba":
        image = Image.fromarray(pixels, "RGBA")
    elif kind == "gray":
        image = Image.fromarray(pixels[..., 0], "L")
    elif kind == "palette":
        image = Image.fromarray(pixels[..., :3], "RGB").convert("P")
    elif kind == "16bit":
        image = Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
        file_format = "PNG"
    elif kind == "cmyk":
        image = Image.fromarray(pixels, "RGBA").convert("CMYK")
        file_format = "JPEG"
    else:
        image = Image.fromarray(pixels[..., :3], "RGB")
    options: dict[str, Any] = {}
    if kind == "rotated":
        exif = image.getexif()
        exif[0x0112] = draw(st.integers(1, 8))
        (file_format, options) = ("JPEG", {"exif": exif.tobytes()})
    if file_format == "JPEG" and image.mode not in ("RGB", "L", "CMYK"):
        image = image.convert("RGB")
    data = _encode(image, file_format, **options)
    damage = draw(st.sampled_from(["none", "none", "none", "truncated", "flipped"]))
    if damage == "truncated":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == "flipped":
        position = draw(st.integers(0, len(data) - 1))
        data = data[:position] + bytes([data[position] ^ 0xFF]) + data[position + 1 :]
    return data


@dataclass
class Site:
    url: str
    schema: Any
    seen: dict[str, list[int]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    directory = tmp_path_factory.mktemp("schemathesis")
    (net, model_info) = saved_and_loaded_tiny_model(directory)
    photos = make_photos(directory / "photos")
    options = IndexOptions([directory / "photos"], directory / "index", weights=directory / "tiny_birds.safetensors")
    options.num_workers = 0
    options.progress = False
    run_index(options, add=False)
    rng = np.random.default_rng(0)
    records = Records(
        48.2 + rng.standard_normal(200), 16.4 + rng.standard_normal(200), rng.integers(1, 366, 200).astype(np.int16),
        rng.integers(0, len(SPECIES), 200).astype(np.int32), np.ones(200, np.float32),
    )  # fmt: skip
    (detector_net, detector_info) = tiny_detector()
    settings_ = ServeSettings(max_upload_bytes=2 * 2**20, max_pixels=4_000_000, timeout_s=30, batch_window_ms=1)
    app = create_app(
        net,
        model_info,
        name="tiny-birds",
        settings=settings_,
        prior=LocationPrior.build(records, SPECIES),
        photo_index=PhotoIndex(directory / "index"),
        detector=ServedDetector(detector_net, detector_info, "tiny-det", threshold=0.3),
    )
    assert len(photos) == len(PhotoIndex(directory / "index"))

    # The photos that fit the schema are real image files (and some broken ones), not only random bytes
    saved = {name: formats.STRING_FORMATS.get(name) for name in ("binary", "byte")}
    schemathesis.openapi.format("binary", photo_files())
    schemathesis.openapi.format("byte", photo_files().map(lambda data: base64.b64encode(data).decode()))
    for media_type in PHOTO_MEDIA_TYPES:
        schemathesis.openapi.media_type(media_type, photo_files())
    try:
        with running_server(app) as url:
            schema = schemathesis.openapi.from_dict(app.openapi())
            yield Site(url, schema)
    finally:
        for name, strategy in saved.items():
            if strategy is not None:
                formats.STRING_FORMATS[name] = strategy
        formats._invalidate_caches()  # as the public registration does
        for media_type in PHOTO_MEDIA_TYPES:
            schemathesis.core.media_types.MEDIA_TYPE_STRATEGIES.pop(media_type, None)


def check_answer(case: Any, response: Any) -> None:
    where = f"{case.method} {case.formatted_path} ({case.media_type}, query {case.query})"
    assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:300]}"
    if 400 <= response.status_code < 500:
        content_type = response.headers.get("content-type", [""])[0]  # Schemathesis keeps each header's values
        assert content_type.startswith("application/json"), f"{where}: {content_type}"
        if case.method == "HEAD":
            return  # no body to read
        body = response.json()
        assert isinstance(body, dict) and set(body) == {"error"}, f"{where}: {body}"
        assert isinstance(body["error"], str) and body["error"] and "\n" not in body["error"], where


def send_generated(url: str, operation: Any, mode: GenerationMode, examples: int, statuses: list[int]) -> None:
    """``examples`` requests drawn for ``operation`` in ``mode``, each answer checked; their statuses appended."""

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def send(case: Any) -> None:
        response = case.call(base_url=url, timeout=CLIENT_TIMEOUT)
        check_answer(case, response)
        statuses.append(response.status_code)

    send()


def test_every_route_answers_generated_requests_without_a_server_error(site: Site) -> None:
    operations = [result.ok() for result in site.schema.get_all_operations()]
    labels = sorted(operation.label for operation in operations)
    assert labels == [
        "GET /healthz",
        "GET /v1/models",
        "GET /v1/similar/photos/{photo_id}",
        "HEAD /healthz",
        "POST /v1/classify",
        "POST /v1/detect",
        "POST /v1/embed",
        "POST /v1/explain",
        "POST /v1/similar",
    ]
    statuses: dict[str, list[int]] = {}
    for operation in operations:
        reads_photo = "requestBody" in operation.definition.raw
        takes_input = reads_photo or bool(operation.definition.raw.get("parameters"))
        for mode, examples in (PHOTO_EXAMPLES if reads_photo else OTHER_EXAMPLES).items():
            if mode == GenerationMode.NEGATIVE and not takes_input:
                continue  # nothing to get wrong
            send_generated(site.url, operation, mode, examples, statuses.setdefault(operation.label, []))

    counts = {label: len(codes) for (label, codes) in statuses.items()}
    print("requests per operation:", json.dumps(counts), "statuses:", sorted({c for s in statuses.values() for c in s}))
    assert set(counts) == set(labels)
    assert sum(counts.values()) >= 250
    # The photos reached the model: every photo route answered 200 to some of them
    for label in ("POST /v1/classify", "POST /v1/embed", "POST /v1/explain", "POST /v1/similar", "POST /v1/detect"):
        assert 200 in statuses[label], (label, sorted(set(statuses[label])))
