"""Routes of ``birder-serve`` beyond classification: explanation maps and, with ``--index``, similar photos.

- ``POST /v1/explain?method=rollout|hirescam|gradcam|layercam&target=<species>``: the explanation map of the photo, as a
  transparent heat-map PNG (data URL) the size of the photo (at most 512 px a side) to lay over it.
- ``POST /v1/similar?k=10``: the nearest photos of the index (``birder-serve --index DIR``), each with
  ``photo_url``: ``GET /v1/similar/photos/<id>`` serves a thumbnail of a photo recorded in the index, by its
  number in the index, never by a path: nothing else on the server's disks can be asked for.

Explaining changes the network's state for a moment (attention weights kept, hooks for gradients), so it holds
``service.model_lock``, which batches hold too.
"""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from PIL import Image

from birder.errors import BirderError, ImageDecodeError
from birder.introspection.explain import EXPLAIN_METHODS, explain
from birder.introspection.overlay import heat_rgba
from birder.io.images import load_image
from birder.serve.uploads import ApiError, decode_upload, read_image_request

OVERLAY_MAX_SIDE = 512
THUMBNAIL_SIDE = 256
MAX_SIMILAR = 100


def _png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _overlay_layer(photo_map: np.ndarray) -> Image.Image:
    layer = heat_rgba(photo_map)
    layer.thumbnail((OVERLAY_MAX_SIDE, OVERLAY_MAX_SIDE))
    return layer


def add_extra_routes(app: FastAPI, service: Any, index: Any | None = None) -> None:
    """``/v1/explain`` always; ``/v1/similar`` and its thumbnails when ``index`` (a PhotoIndex) is given."""

    def run_explain(data: bytes, file_name: str, method: str, target: int | None) -> dict[str, Any]:
        photo = decode_upload(data, file_name, service.settings.max_pixels)
        with service.model_lock:
            result = explain(service.net, photo, service.transform, method=method, target=target)
        return {
            "method": method,
            "target": {"species": service.class_names[result.target], "index": result.target},
            "overlay": _png_data_url(_overlay_layer(result.photo_map)),
            "image": {"width": photo.width, "height": photo.height},
        }

    @app.post("/v1/explain")
    async def explain_route(request: Request) -> dict[str, Any]:
        (data, file_name, fields) = await read_image_request(request)
        method = request.query_params.get("method", fields.get("method", "rollout"))
        if method not in EXPLAIN_METHODS:
            raise ApiError(400, f"unknown method '{method}'; choose one of: {', '.join(EXPLAIN_METHODS)}")
        species = request.query_params.get("target", fields.get("target"))
        if species is not None and species not in service.class_names:
            raise ApiError(400, f"'{species}' is not a class of this model")
        target = service.class_names.index(species) if species is not None else None
        loop = asyncio.get_running_loop()
        try:
            answer = await loop.run_in_executor(service.decode_pool, run_explain, data, file_name, method, target)
        except BirderError as err:  # not a ViT (an export), or the Grad-CAM package missing
            raise ApiError(409, str(err)) from None
        return {"model": service.name, **answer}

    if index is None:
        return

    from birder.search.query import similar

    @app.post("/v1/similar")
    async def similar_route(request: Request) -> dict[str, Any]:
        (data, file_name, fields) = await read_image_request(request)
        raw = request.query_params.get("k", fields.get("k", "10"))
        try:
            k = int(raw)
        except ValueError:
            raise ApiError(400, f"k must be a whole number, got '{raw}'") from None
        if not 1 <= k <= MAX_SIMILAR:
            raise ApiError(400, f"k must be between 1 and {MAX_SIMILAR}, got {k}")
        ((_, embedding), facts) = await service.infer(data, file_name)
        found = similar(index, embedding, k)
        results = [{**row, "photo_url": f"/v1/similar/photos/{row['id']}"} for row in found]
        return {"model": service.name, "index_size": len(index), "results": results, **facts}

    @app.get("/v1/similar/photos/{photo_id}")
    async def photo_route(photo_id: int) -> Response:
        if not 0 <= photo_id < len(index):
            raise ApiError(404, f"no photo {photo_id} in the index")
        path = index.rows([photo_id])[0]["path"]  # only paths the index recorded
        loop = asyncio.get_running_loop()
        try:
            body = await loop.run_in_executor(service.decode_pool, _thumbnail_jpeg, path)
        except ImageDecodeError:
            raise ApiError(410, f"photo {photo_id} can no longer be read") from None
        return Response(body, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


def _thumbnail_jpeg(path: str) -> bytes:
    image = load_image(path)
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()
