"""The review page and its JSON API, on the server stack of ``birder-serve`` (FastAPI, run by uvicorn).

- ``GET /``: the page (``static/review.html``; script and style from ``/static``, nothing from elsewhere)
- ``GET /api/session``: the folder, the model, the order, the default reviewer, what was noticed on opening
- ``GET /api/next?reviewer=&client=&skip=``: the next unit for that browser tab, the progress, and the expected
  wrong records left per species
- ``GET /api/units/{index}``: one unit (its photos, boxes, the machine's answer, the decision that counts)
- ``GET /api/units/{index}/photos/{number}``: a photo as JPEG (EXIF rotation applied, as the boxes are measured)
- ``POST /api/decisions``: ``{decision_id, unit, reviewer, labels: [{box?, label}], count?, comment?, seconds?}``
- ``POST /api/undo``: ``{reviewer, undo_id}``: takes back that reviewer's latest decision, returns its unit
- ``GET /api/search?q=``: the model's classes and the taxonomy's names matching the words typed

Photos are served by their place among the units, never by a path a request names. With a token (``--token``,
required by ``birder-review`` off this machine), every request for the survey (the API, the photos) must carry it:
``X-Review-Token`` header, or ``?token=`` (the page passes it on from its own address). Every refused request gets
``{"error": "<one line>"}``.
"""

from __future__ import annotations

import asyncio
import hmac
import io
from pathlib import Path
from typing import Any

from birder.errors import BirderError, ImageDecodeError, one_line
from birder.review.session import ReviewSession
from birder.web_page import add_page

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.middleware.base import BaseHTTPMiddleware
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(f"birder-review needs the 'serve' extra: pip install 'birder[serve]' ({err})") from err

STATIC_DIR = Path(__file__).parent / "static"
# Photos are sent no larger than this (longest side): a review screen needs no 50 MP frame
MAX_PHOTO_SIDE = 1600
TOKEN_HEADER = "X-Review-Token"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": one_line(message)}, status_code=status)


class _TokenCheck(BaseHTTPMiddleware):
    def __init__(self, app: Any, token: str) -> None:
        super().__init__(app)
        self.token = token.encode("utf-8")

    async def dispatch(self, request: Request, call_next: Any) -> Any:
        if request.url.path == "/" or request.url.path.startswith("/static/"):
            return await call_next(request)  # the page and its script hold nothing of the survey
        given = request.headers.get(TOKEN_HEADER) or request.query_params.get("token") or ""
        if not hmac.compare_digest(given.encode("utf-8"), self.token):
            return _error(401, "this review needs its token: open the address birder-review printed (with ?token=)")
        return await call_next(request)


def create_review_app(session: ReviewSession, *, reviewer: str, token: str | None = None) -> FastAPI:
    """The app over ``session``; decisions without a reviewer name go in under ``reviewer``."""
    app = FastAPI(title="birder-review", docs_url=None, redoc_url=None)
    if token:
        app.add_middleware(_TokenCheck, token=token)

    def who(name: Any) -> str:
        return str(name or "").strip() or reviewer

    async def run(function: Any, *args: Any, **kwargs: Any) -> Any:
        # File reads, fsync-ed writes and planning leave the event loop free for the other tab
        return await asyncio.to_thread(function, *args, **kwargs)

    def next_payload(name: str, client: str, skipped: list[str]) -> dict[str, Any]:
        unit = session.next_unit(client, skipped)
        return {
            "unit": session.view(unit, name) if unit is not None else None,
            "progress": session.progress(),
            "species_left": _species_left(session),
        }

    @app.get("/api/session")
    async def describe() -> dict[str, Any]:
        folder = session.folder
        return {
            "results_dir": str(folder.directory),
            "model": folder.model,
            "order": session.order,
            "reviewer": reviewer,
            "units": len(folder.units),
            "unit_kind": "event" if folder.events else "photo",
            "detector": folder.detector,
            "missing_photos": folder.missing_photos,
            "failures": len(folder.failures),
            "partial": folder.partial,
            "notes": list(session.store.notes),
        }

    @app.get("/api/next")
    async def next_unit(reviewer: str = "", client: str = "", skip: str = "") -> dict[str, Any]:
        skipped = [unit for unit in skip.split(",") if unit]
        return await run(next_payload, who(reviewer), client, skipped)

    @app.get("/api/units/{index}")
    async def unit(index: int, reviewer: str = "") -> dict[str, Any]:
        return await run(session.view, _unit_at(session, index), who(reviewer))

    @app.get("/api/units/{index}/photos/{number}")
    async def photo(index: int, number: int) -> Response:
        photos = _unit_at(session, index).photos
        if not 0 <= number < len(photos):
            raise BirderError(f"unit {index} has no photo {number}")
        if photos[number].missing:
            return _error(404, f"{photos[number].path} is missing (moved or deleted since the run)")
        data = await run(_jpeg, photos[number].file)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/api/decisions")
    async def decide(request: Request) -> dict[str, Any]:
        body = await _json_object(request)
        name = who(body.get("reviewer"))
        labels = body.get("labels")
        if not isinstance(labels, list) or not all(isinstance(entry, dict) for entry in labels):
            raise BirderError("'labels' must be a list of {box, label} objects")
        count = body.get("count")
        submission = await run(
            session.decide,
            str(body.get("unit", "")),
            name,
            labels,
            count=None if count in (None, "") else _int(count, "count"),
            comment=str(body.get("comment") or ""),
            seconds=_float(body.get("seconds")),
            decision_id=str(body["decision_id"]) if body.get("decision_id") else None,
        )
        payload = await run(next_payload, name, str(body.get("client", "")), [])
        return {"saved": submission.decision_id, **payload}

    @app.post("/api/undo")
    async def undo(request: Request) -> dict[str, Any]:
        body = await _json_object(request)
        name = who(body.get("reviewer"))
        undo_id = str(body["undo_id"]) if body.get("undo_id") else None
        target = await run(session.undo, name, undo_id)
        return {
            "unit": session.view(target, name) if target is not None else None,
            "progress": session.progress(),
            "species_left": await run(_species_left, session),
        }

    @app.get("/api/search")
    async def search(q: str = "") -> dict[str, Any]:
        return {"matches": session.names.search(q)}

    add_page(app, STATIC_DIR, "review.html")

    @app.exception_handler(BirderError)
    async def user_error(_request: Request, err: BirderError) -> JSONResponse:
        return _error(400, str(err))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail))

    return app


def _species_left(session: ReviewSession) -> list[dict[str, Any]]:
    left = session.expected_wrong()
    ranked = sorted(left.items(), key=lambda pair: -pair[1])
    return [{"species": name, "expected_wrong": round(value, 2)} for (name, value) in ranked if value >= 0.005]


def _unit_at(session: ReviewSession, index: int) -> Any:
    if not 0 <= index < len(session.folder.units):
        raise BirderError(f"no unit {index}: this folder has {len(session.folder.units)}")
    return session.folder.units[index]


def _jpeg(file: Path) -> bytes:
    from birder.io.images import load_image

    try:
        image = load_image(file)
    except ImageDecodeError as err:
        raise BirderError(str(err)) from None
    image.thumbnail((MAX_PHOTO_SIDE, MAX_PHOTO_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=88)
    return buffer.getvalue()


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise BirderError("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise BirderError("the request body must be a JSON object")
    return body


def _int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise BirderError(f"'{name}' must be a whole number, got {value!r}") from None


def _float(value: Any) -> float | None:
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None
