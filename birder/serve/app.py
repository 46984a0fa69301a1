"""The HTTP API and web page of ``birder-serve``.

``create_app(net, model_info)`` builds a FastAPI app around one loaded model:

- ``POST /v1/classify``: top-k species with probabilities, the answer (``label``, ``rank``, ``label_probability``,
  ``unknown_score``: :mod:`birder.inference.decision`), the model name and timings
- ``POST /v1/embed``: the embedding vector
- ``GET /v1/models``: what the model is (classes, input size, normalisation, the dtype it runs in and why),
  ``similar``: whether ``/v1/similar`` is served (an index was given), ``detect``: whether ``/v1/detect`` is (a
  detector was given; ``detector`` then says which)
- ``POST /v1/detect`` (with a detector): every box found in the photo, each with its species and answer
- ``GET /healthz`` (and ``HEAD``): status and batching figures (mean batch size served)
- ``GET /``: a page to drop a photo on and see its species as a bar chart (assets served from ``/static``)
- ``GET /openapi.json``: the OpenAPI schema of all of these (:mod:`birder.serve.openapi`); no ``/docs`` page (the
  Swagger UI it would show loads from a CDN: blank on a machine offline)

An image can be sent as multipart form data (a file field, ``image`` by preference), as JSON
``{"image": "<base64>"}`` or as the raw bytes of the request body. Every image goes through the library's one
path: :func:`~birder.io.images.load_image` (after a size check on the header), the model's
:func:`~birder.data.transforms.classification_transform`, and
:func:`~birder.inference.classification.infer_batch` run by a :class:`~birder.serve.batcher.DynamicBatcher`.

Every refused request gets a JSON body ``{"error": "<one line>"}``: 413 for an upload or an image (in pixels)
over the limits, 422 for an image that cannot be decoded, 400 for a malformed request, 415 for an unknown
content type, 503 when overloaded (too many images waiting, or the request bodies in flight would pass
``max_inflight_bytes``: refused from the declared size, before the body is read) and 504 when the request took
longer than ``timeout_s`` (every route).

The memory the requests hold at once is bounded (:mod:`birder.serve.memory`): bodies by ``max_inflight_bytes``,
decoding by ``max_decode_bytes`` (a photo waits for room, and is dropped as soon as it is at the model's input
resolution), waiting photos by ``max_queue`` and ``max_explanations``.
"""

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from birder.data.transforms import classification_transform
from birder.errors import BirderError, one_line
from birder.geo.prior import LocationPrior
from birder.geo.serve import prior_answer, request_place
from birder.inference.classification import infer_batch, logits_from_embeddings
from birder.inference.decision import DecisionPolicy, build_policy
from birder.inference.optimize import DtypeChoice
from birder.io.checkpoint import ModelInfo, get_size_from_signature
from birder.serve.batcher import BatchInfo, DynamicBatcher, QueueFullError
from birder.serve.detect import ServedDetector, add_detect_route
from birder.serve.extras import add_extra_routes
from birder.serve.memory import Budget, decode_cost, default_decode_bytes, run_holding
from birder.serve.openapi import DATE, LAT, LON, TOP_K, photo_route
from birder.serve.uploads import (
    ApiError,
    BodySizeLimit,
    InflightBytes,
    InflightLimit,
    decode_opened,
    error_response,
    open_upload,
    parse_top_k,
    read_image_request,
    short_text,
)
from birder.web_page import add_page

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(f"birder-serve needs the 'serve' extra: pip install 'birder[serve]' ({err})") from err

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"

T = TypeVar("T")


@dataclass(frozen=True)
class ServeSettings:
    """Limits and batching of the service (the command line's options)."""

    max_batch_size: int = 32
    batch_window_ms: float = 5.0
    max_upload_bytes: int = 20 * 1024 * 1024
    # Request bodies held at once (read or being read, until answered): a flood of large uploads gets 503
    # instead of growing memory without bound. At least max_upload_bytes, or a largest upload never fits.
    max_inflight_bytes: int = 256 * 1024 * 1024
    # A 50 MP camera frame fits; PIL's own decompression-bomb guard (about 89 MP) stays behind this one.
    max_pixels: int = 50_000_000
    # Bytes that photos being decoded may take at once (birder.serve.memory.decode_cost): a photo waits for room.
    # None: 26 bytes per pixel of max_pixels, so that an 8-bit photo with alpha at the pixel limit fits.
    max_decode_bytes: int = None  # type: ignore[assignment]  # set in __post_init__
    timeout_s: float = 30.0
    default_top_k: int = 5
    # Images waiting for a batch beyond this are refused with 503 instead of queueing without bound.
    max_queue: int = 1024
    # Explanations waiting or running (one runs at a time) beyond this are refused with 503.
    max_explanations: int = 8
    decode_workers: int = max(2, min(8, os.cpu_count() or 2))

    def __post_init__(self) -> None:
        if self.max_decode_bytes is None:
            object.__setattr__(self, "max_decode_bytes", default_decode_bytes(self.max_pixels))


class ModelService:
    """One loaded model behind the API: preprocessing, the batcher and the figures /healthz reports."""

    def __init__(self, net: torch.nn.Module, model_info: ModelInfo, name: str, settings: ServeSettings) -> None:
        self.net = net
        self.model_info = model_info
        self.name = name
        self.settings = settings
        self.size = get_size_from_signature(model_info.signature)
        self.transform = classification_transform(self.size, model_info.rgb_stats)
        self.class_names = _class_names(model_info.class_to_idx)
        self.batcher: DynamicBatcher[tuple[np.ndarray, np.ndarray]] = DynamicBatcher(
            self._run_batch,
            max_batch_size=settings.max_batch_size,
            window_s=settings.batch_window_ms / 1000.0,
            max_queue=settings.max_queue,
        )
        self.inflight = InflightBytes(settings.max_inflight_bytes)
        self.decoding = Budget(settings.max_decode_bytes)
        self.explanations = Budget(settings.max_explanations)
        # Batches and explanations (birder.serve.extras: they switch attention recording on) take turns
        self.model_lock = threading.Lock()
        self.dtype: DtypeChoice | None = None  # set by create_app
        self.policy = DecisionPolicy(self.class_names)  # set by create_app
        self.decode_pool: concurrent.futures.ThreadPoolExecutor | None = None
        # One explanation at a time (each holds the model lock anyway); the others wait their turn in its queue
        self.explain_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.started_at = time.time()
        self.requests_ok = 0
        self.requests_refused = 0

    def _run_batch(self, inputs: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
        # The embedding is computed anyway (forward = classify(embedding)), so every batch returns both and
        # /v1/classify and /v1/embed requests share batches.
        with self.model_lock:
            (probs, embedding) = infer_batch(self.net, inputs, return_embedding=True, calibrated=self.policy.calibrated)
        assert embedding is not None
        return list(zip(probs, embedding, strict=True))

    async def start(self) -> None:
        self.decode_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.settings.decode_workers, thread_name_prefix="birder-decode"
        )
        self.explain_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="birder-explain")
        await self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        for pool in (self.decode_pool, self.explain_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    async def with_timeout(self, handler: Callable[[], Awaitable[T]]) -> T:
        """``handler()``, answered 504 past ``timeout_s`` (from the request's start: reading the body counts)."""
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                response = await handler()
        except TimeoutError:
            raise ApiError(504, f"request timed out after {self.settings.timeout_s:g} s (server busy?)") from None
        self.requests_ok += 1
        return response

    async def decoded(self, data: bytes, name: str, work: Callable[[Image.Image], T], *, crops: bool = False) -> T:
        """``work(photo)`` on the decoded upload, in a decode thread, within the decoding budget; the photo is let
        go when ``work`` returns (it should return nothing of the photo's size). ``crops``: ``work`` crops the
        photo (:func:`~birder.serve.memory.decode_cost`)."""
        loop = asyncio.get_running_loop()
        (opened, cost) = await loop.run_in_executor(self.decode_pool, self._open, data, name, crops)
        if cost > self.decoding.limit:
            raise ApiError(
                413,
                f"image '{short_text(name)}' ({opened.width}x{opened.height}, mode {opened.mode}) needs about "
                f"{cost / 2**20:.0f} MiB to decode; this server decodes at most {self.decoding.limit / 2**20:.0f} "
                "MiB at once (--max-decode-mb): send it smaller, or with 8 bits a channel",
            )
        return await run_holding(self.decoding, cost, self.decode_pool, _decode_then, opened, name, work)

    def _open(self, data: bytes, name: str, crops: bool) -> tuple[Image.Image, int]:
        opened = open_upload(data, name, self.settings.max_pixels)
        return (opened, decode_cost(opened, crops=crops))

    async def preprocess(self, data: bytes, name: str) -> tuple[torch.Tensor, tuple[int, int]]:
        """An upload at the model's input resolution (the decoded photo dropped), and the photo's ``(width,
        height)``."""
        return await self.decoded(data, name, lambda photo: (self.transform(photo), photo.size))

    async def infer(self, data: bytes, name: str) -> tuple[tuple[np.ndarray, np.ndarray], dict[str, Any]]:
        """Decode and run one uploaded image; returns its ``(probs, embedding)`` and facts for the response."""
        started = time.perf_counter()
        (inputs, (width, height)) = await self.preprocess(data, name)
        decoded = time.perf_counter()
        (result, info) = await self.run_tensor(inputs)
        facts = {
            "image": {"width": width, "height": height},
            "batch_size": info.batch_size,
            "timing_ms": _timings(started, decoded, info),
        }
        return (result, facts)

    async def run_tensor(self, inputs: torch.Tensor) -> tuple[tuple[np.ndarray, np.ndarray], BatchInfo]:
        """One transformed image (a photo, or a crop of one) through the batcher: its ``(probs, embedding)``."""
        try:
            return await self.batcher.submit(inputs)
        except QueueFullError as err:
            raise ApiError(503, f"server overloaded ({err}); retry later") from None
        except Exception as err:
            # Only this image's batch failed (the batcher logged why and carries on). Answered as an ApiError, not
            # left to the catch-all handler: Starlette re-raises from there and uvicorn then drops the connection
            # under a keep-alive client.
            raise ApiError(500, f"internal error while running the model ({type(err).__name__}); retry") from err

    def health(self) -> dict[str, Any]:
        stats = self.batcher.stats
        return {
            "status": "ok" if self.batcher.alive else "stopped",
            "model": self.name,
            "uptime_s": round(time.time() - self.started_at, 3),
            "requests_ok": self.requests_ok,
            "requests_refused": self.requests_refused + self.inflight.refused_early,
            "batches": stats.batches,
            "images": stats.images,
            "mean_batch_size": round(stats.mean_batch_size, 3),
            "largest_batch": stats.largest_batch,
            "max_batch_size": self.settings.max_batch_size,
            "queue_depth": self.batcher.queue_depth,
            "inflight_bytes": self.inflight.held,
            "max_inflight_bytes": self.inflight.limit,
        }

    def describe(self) -> dict[str, Any]:
        embedding_size = getattr(self.net, "embedding_size", None)
        return {
            "name": self.name,
            "network": getattr(self.net, "network_name", None),
            "num_classes": len(self.class_names),
            "input_size": list(self.size),
            "embedding_size": embedding_size if isinstance(embedding_size, int) else None,
            "rgb_stats": {key: list(value) for key, value in self.model_info.rgb_stats.items()},
            "classes": self.class_names,
            **_dtype_fields(self.net, self.dtype),
            "answer": self.policy.describe(),
        }

    def answer(self, probs: np.ndarray, embedding: np.ndarray) -> dict[str, Any]:
        """Steps 5-8 of the decision order for one photo: its ``label``, ``rank``, ``label_probability`` and
        ``unknown_score`` (:mod:`birder.inference.decision`)."""
        logits = logits_from_embeddings(self.net, embedding[None]) if self.policy.needs_logits else None
        decisions = self.policy.decide(probs[None], logits=logits, embeddings=embedding[None])
        return decisions.row(0)


def _decode_then(opened: Image.Image, name: str, work: Callable[[Image.Image], T]) -> T:
    return work(decode_opened(opened, name))


def _with_prior(
    prior: LocationPrior | None,
    strength: float,
    probs: np.ndarray,
    fields: dict[str, str],
    top_k: int,
    class_names: list[str],
) -> tuple[np.ndarray, dict[str, Any]]:
    """Step 4 of the decision order with ``birder-serve --prior`` (:mod:`birder.geo.serve`): the adjusted
    probabilities and the keys the answer gains; without a prior, the probabilities as they are and nothing."""
    if prior is None:
        return (probs, {})
    try:
        return prior_answer(prior, strength, probs, fields, top_k, class_names)
    except BirderError as err:
        raise ApiError(400, str(err)) from None


def _dtype_fields(net: torch.nn.Module, choice: DtypeChoice | None) -> dict[str, str | None]:
    """What /v1/models says of the dtype: the choice when the command line made one, else the weights' own."""
    if choice is not None:
        return {"dtype": choice.dtype, "dtype_reason": choice.reason}
    param = next(net.parameters(), None) if isinstance(net, torch.nn.Module) else None
    dtype = str(param.dtype).removeprefix("torch.") if param is not None else None
    return {"dtype": dtype, "dtype_reason": "as the network was passed in"}


def _class_names(class_to_idx: dict[str, int]) -> list[str]:
    names = [f"class_{index}" for index in range(len(class_to_idx))]
    for name, index in class_to_idx.items():
        if 0 <= index < len(names):
            names[index] = name
    return names


def _timings(started: float, decoded: float, info: BatchInfo) -> dict[str, float]:
    total = time.perf_counter() - started
    return {
        "decode": round((decoded - started) * 1000, 3),
        "queue": round(info.queue_s * 1000, 3),
        "inference": round(info.inference_s * 1000, 3),
        "total": round(total * 1000, 3),
    }


def _model_service(
    net: torch.nn.Module,
    model_info: ModelInfo,
    name: str,
    settings: ServeSettings,
    *,
    dtype: DtypeChoice | None,
    prior: LocationPrior | None,
    policy: DecisionPolicy | None,
) -> ModelService:
    """The service ``create_app`` answers with: the settings and the prior checked, ``net`` in eval mode."""
    if settings.max_inflight_bytes < settings.max_upload_bytes:
        raise ValueError(
            f"max_inflight_bytes ({settings.max_inflight_bytes}) is below max_upload_bytes "
            f"({settings.max_upload_bytes}): raise it to at least the upload limit"
        )
    if hasattr(net, "eval"):
        net.eval()
    service = ModelService(net, model_info, name, settings)
    service.policy = policy if policy is not None else build_policy(net, service.class_names)
    service.dtype = dtype
    if prior is not None:
        prior.check_classes(service.class_names)
    return service


def create_app(
    net: torch.nn.Module,
    model_info: ModelInfo,
    *,
    name: str | None = None,
    settings: ServeSettings | None = None,
    dtype: DtypeChoice | None = None,
    prior: LocationPrior | None = None,
    prior_strength: float = 1.0,
    policy: DecisionPolicy | None = None,
    photo_index: Any | None = None,
    detector: ServedDetector | None = None,
) -> FastAPI:
    """A FastAPI app serving ``net`` (a birder network or a loaded export) under the model name ``name``.

    ``net`` needs ``embedding`` and ``classify`` (what :func:`infer_batch` calls); it is put in eval mode.
    ``dtype``: the choice that converted ``net`` (``birder-serve --dtype``), reported by /v1/models.
    ``prior``: a location-and-season prior for the model's classes (``lat``, ``lon``, ``date`` fields of
    /v1/classify; :mod:`birder.geo.serve`), applied as ``image × prior ** prior_strength``.
    ``policy``: how the answer (``label``, ``rank``, ``label_probability``, ``unknown_score``) is decided
    (:func:`birder.inference.decision.build_policy`; default: the model's calibration, no taxonomy).
    ``detector``: adds ``POST /v1/detect`` (:mod:`birder.serve.detect`: each box found, classified by ``net``).
    """
    settings = settings or ServeSettings()
    name = name or getattr(net, "network_name", None) or "model"
    service = _model_service(net, model_info, name, settings, dtype=dtype, prior=prior, policy=policy)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        logger.info("serving model '%s' (batches of up to %d)", name, settings.max_batch_size)
        try:
            yield
        finally:
            await service.stop()

    # No /docs or /redoc: their pages load Swagger UI and ReDoc from a CDN. The schema is /openapi.json.
    app = FastAPI(title="birder", summary="Bird species from photos", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    # The last added runs first: an upload over the size limit gets 413 (retrying cannot help) before the
    # in-flight bound is asked.
    app.add_middleware(InflightLimit, inflight=service.inflight)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)
    _add_error_handlers(app, service)

    with_timeout = service.with_timeout
    classify_fields = {"top_k": TOP_K, "lat": LAT, "lon": LON, "date": DATE}

    @app.post("/v1/classify", openapi_extra=photo_route(classify_fields, (400, 409, 413, 415, 422, 503, 504)))
    async def classify(request: Request) -> dict[str, Any]:
        if not service.class_names:
            raise ApiError(409, f"model '{name}' has no classes (a headless encoder): use /v1/embed")

        async def handle() -> dict[str, Any]:
            (data, file_name, fields) = await read_image_request(request)
            place = {**fields, **request.query_params}
            top_k = parse_top_k(place.get("top_k"), settings.default_top_k, len(service.class_names))
            check_place(place)  # a bad field is refused before the photo is decoded
            ((probs, embedding), facts) = await service.infer(data, file_name)
            return {"model": name, **answer_for(probs, embedding, place, top_k), **facts}

        return await with_timeout(handle)

    def check_place(place: dict[str, str]) -> None:
        if prior is not None:
            try:
                request_place(place)
            except BirderError as err:
                raise ApiError(400, str(err)) from None

    def answer_for(probs: np.ndarray, embedding: np.ndarray, place: dict[str, str], top_k: int) -> dict[str, Any]:
        """The top-k species and the answer of one image (a photo, or a detected box's crop): the decision order
        from step 4 (the prior, with ``lat``, ``lon``, ``date`` in ``place``)."""
        (probs, geo) = _with_prior(prior, prior_strength, probs, place, top_k, service.class_names)
        order = np.argsort(-probs, kind="stable")[:top_k]
        predictions = [
            {"species": service.class_names[index], "index": int(index), "probability": float(probs[index])}
            for index in order
        ]
        return {"predictions": predictions, **service.answer(probs, embedding), **geo}

    @app.post("/v1/embed", openapi_extra=photo_route())
    async def embed(request: Request) -> dict[str, Any]:
        async def handle() -> dict[str, Any]:
            (data, file_name, _) = await read_image_request(request)
            ((_, embedding), facts) = await service.infer(data, file_name)
            return {"model": name, "dim": int(embedding.shape[0]), "embedding": embedding.tolist(), **facts}

        return await with_timeout(handle)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        # "similar" and "detect": whether /v1/similar (birder-serve --index) and /v1/detect (--detector) answer, so
        # the page asks only a server that can
        described = {"models": [service.describe()], "similar": photo_index is not None, "detect": detector is not None}
        if detector is not None:
            described["detector"] = detector.describe()
        return described

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        health = service.health()
        return JSONResponse(health, status_code=200 if health["status"] == "ok" else 503)

    # Load balancers and uptime checks often ask with HEAD: the same answer, without its body
    app.add_api_route("/healthz", healthz, methods=["HEAD"], operation_id="healthz_head")

    # Explanation maps, and similar photos with an index (birder.search.store.PhotoIndex): birder.serve.extras
    add_extra_routes(app, service, photo_index)
    if detector is not None:
        add_detect_route(app, service, detector, answer_for, check_place)
    add_page(app, STATIC_DIR, "index.html")
    return app


def _add_error_handlers(app: FastAPI, service: ModelService) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, err: ApiError) -> JSONResponse:
        service.requests_refused += 1
        return error_response(err.status, err.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException) -> JSONResponse:
        service.requests_refused += 1
        return error_response(err.status_code, str(err.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, err: RequestValidationError) -> JSONResponse:
        service.requests_refused += 1
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("path", "query", "body"))
        reason = one_line(str(first.get("msg", "bad parameters")), 200)
        return error_response(400, f"invalid request: {where + ': ' if where else ''}{reason}")

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, err: Exception) -> JSONResponse:
        logger.exception("internal error while serving a request")
        # uvicorn closes the connection after this one (Starlette re-raises the error): say so to the client.
        return error_response(500, f"internal error: {type(err).__name__}", close=True)
