"""Routes of ``birder-serve`` beyond classification: explanation maps and, with ``--index``, similar photos.

- ``POST /v1/explain?method=rollout|hirescam|gradcam|layercam&target=<species>``: the explanation map of the photo, as a
  transparent heat-map PNG (data URL) of the photo's shape, at most ``OVERLAY_MAX_SIDE`` px a side, to lay over it.
- ``POST /v1/similar?k=10``: the nearest photos of the index (``birder-serve --index DIR``), each with its ``path``
  relative to the folder that holds all of the index's photos (the server's own folders are not shown) and
  ``photo_url``: ``GET /v1/similar/photos/<id>`` serves a thumbnail of a photo recorded in the index, by its
  number in the index, never by a path: nothing else on the server's disks can be asked for.

An explanation works at the model's input resolution, whatever the photo's size: the photo is decoded and resized
in a decode thread and let go (:meth:`~birder.serve.app.ModelService.preprocess`), the map is computed on the
model's input and drawn straight at the overlay's size. Explaining changes the network's state for a moment
(attention weights kept, hooks for gradients), so it holds ``service.model_lock``, which batches hold too;
explanations run one at a time in their own thread, ``max_explanations`` at most waiting or running (503 beyond).
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response
from PIL import Image, UnidentifiedImageError

from birder.errors import BirderError, ImageDecodeError
from birder.introspection.explain import EXPLAIN_METHODS, explain_tensor, map_to_photo, preview_size
from birder.introspection.overlay import heat_rgba
from birder.io.images import load_image
from birder.serve.memory import decode_cost, run_held, run_holding
from birder.serve.openapi import error_responses, photo_route
from birder.serve.uploads import ApiError, read_image_request, short_text

OVERLAY_MAX_SIDE = 512
THUMBNAIL_SIDE = 256
MAX_SIMILAR = 100

EXPLAIN_FIELDS = {
    "method": {"type": "string", "enum": list(EXPLAIN_METHODS), "description": "default: rollout"},
    "target": {"type": "string", "description": "the species to explain (default: the most probable one)"},
}
SIMILAR_FIELDS = {"k": {"type": "integer", "minimum": 1, "maximum": MAX_SIMILAR, "description": "default: 10"}}


def _png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def add_extra_routes(app: FastAPI, service: Any, index: Any | None = None) -> None:
    """``/v1/explain`` always; ``/v1/similar`` and its thumbnails when ``index`` (a PhotoIndex) is given."""

    def run_explain(inputs: torch.Tensor, photo_size: tuple[int, int], method: str, target: int | None) -> dict:
        """In the explanation thread: the map of one photo at the model's input, drawn at the overlay's size."""
        with service.model_lock:
            (maps, probabilities) = explain_tensor(
                service.net, inputs[None], method, None if target is None else [target]
            )
        chosen = int(probabilities[0].argmax()) if target is None else target
        (width, height) = photo_size
        drawn = preview_size((height, width), OVERLAY_MAX_SIDE)
        overlay_map = map_to_photo(maps[0].numpy(), (height, width), service.transform, out_size=drawn)
        return {
            "method": method,
            "target": {"species": service.class_names[chosen], "index": chosen},
            "overlay": _png_data_url(heat_rgba(overlay_map)),
            "image": {"width": width, "height": height},
        }

    async def explain_one(request: Request) -> dict[str, Any]:
        (data, file_name, fields) = await read_image_request(request)
        place = {**fields, **request.query_params}
        method = place.get("method") or "rollout"
        if method not in EXPLAIN_METHODS:
            raise ApiError(400, f"unknown method '{short_text(method)}'; choose one of: {', '.join(EXPLAIN_METHODS)}")
        species = place.get("target")
        if species is not None and species not in service.class_names:
            raise ApiError(400, f"'{short_text(species)}' is not a class of this model")
        target = service.class_names.index(species) if species is not None else None
        if not service.explanations.try_acquire(1):
            raise ApiError(
                503, f"{service.explanations.limit} explanations are already waiting or running; retry later"
            )
        handed_over = False
        try:
            (inputs, photo_size) = await service.preprocess(data, file_name)
            del data
            handed_over = True  # run_held releases the place once the explanation's thread is done with it
            return await run_held(
                service.explanations, 1, service.explain_pool, run_explain, inputs, photo_size, method, target
            )
        except BirderError as err:  # not a ViT (an export), or the Grad-CAM package missing
            raise ApiError(409, str(err)) from None
        finally:
            if not handed_over:
                service.explanations.release(1)

    @app.post("/v1/explain", openapi_extra=photo_route(EXPLAIN_FIELDS, (400, 409, 413, 415, 422, 503, 504)))
    async def explain_route(request: Request) -> dict[str, Any]:
        answer = await service.with_timeout(lambda: explain_one(request))
        return {"model": service.name, **answer}

    if index is None:
        return

    from birder.search.query import similar

    shown_from = _common_folder(index.photos.column("path").to_pylist())

    async def similar_to(request: Request) -> dict[str, Any]:
        (data, file_name, fields) = await read_image_request(request)
        raw = request.query_params.get("k", fields.get("k")) or "10"
        try:
            k = int(raw)
        except ValueError:
            raise ApiError(400, f"k must be a whole number, got '{short_text(raw)}'") from None
        if not 1 <= k <= MAX_SIMILAR:
            raise ApiError(400, f"k must be between 1 and {MAX_SIMILAR}, got {k}")
        ((_, embedding), facts) = await service.infer(data, file_name)
        found = similar(index, embedding, k)
        results = [
            {**row, "path": _shown_path(row["path"], shown_from), "photo_url": f"/v1/similar/photos/{row['id']}"}
            for row in found
        ]
        return {"model": service.name, "index_size": len(index), "results": results, **facts}

    @app.post("/v1/similar", openapi_extra=photo_route(SIMILAR_FIELDS))
    async def similar_route(request: Request) -> dict[str, Any]:
        return await service.with_timeout(lambda: similar_to(request))

    async def thumbnail(photo_id: int) -> bytes:
        if not 0 <= photo_id < len(index):
            raise ApiError(404, f"no photo {photo_id} in the index")
        path = index.rows([photo_id])[0]["path"]  # only paths the index recorded
        loop = asyncio.get_running_loop()
        (opened, cost) = await loop.run_in_executor(service.decode_pool, _open_recorded, path, photo_id)
        if cost > service.decoding.limit:
            opened.close()
            raise ApiError(
                413, f"photo {photo_id} is too large for this server to decode ({opened.width}x{opened.height})"
            )
        return await run_holding(service.decoding, cost, service.decode_pool, _thumbnail_jpeg, opened, photo_id)

    @app.get("/v1/similar/photos/{photo_id}", responses=error_responses(400, 404, 410, 413, 504))
    async def photo_route_(photo_id: int) -> Response:
        body = await service.with_timeout(lambda: thumbnail(photo_id))
        return Response(body, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


def _common_folder(paths: list[str]) -> str:
    """The deepest folder holding every one of ``paths`` (absolute, as the index records them)."""
    if not paths:
        return ""
    try:
        return os.path.commonpath([os.path.dirname(path) for path in paths])
    except ValueError:  # paths on different drives (Windows): no folder holds them all
        return ""


def _shown_path(path: str, base: str) -> str:
    """A photo's path as a client sees it: relative to ``base`` (the file's name alone when not under it)."""
    if base and os.path.isabs(path):
        try:
            return os.path.relpath(path, base)
        except ValueError:
            pass
    return os.path.basename(path)


def _open_recorded(path: str, photo_id: int) -> tuple[Image.Image, int]:
    """An index's photo opened for a thumbnail (JPEGs decoded at a reduced scale) and its decoding cost."""
    try:
        opened = Image.open(path)
        opened.draft("RGB", (THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError):
        raise ApiError(410, f"photo {photo_id} can no longer be read") from None
    return (opened, decode_cost(opened))


def _thumbnail_jpeg(opened: Image.Image, photo_id: int) -> bytes:
    try:
        image = load_image(opened)  # PIL closes the file once the pixels are read
    except ImageDecodeError:
        opened.close()
        raise ApiError(410, f"photo {photo_id} can no longer be read") from None
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()
