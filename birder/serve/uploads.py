"""Requests to images: reading an upload in any encoding, refusing oversized bodies (and bodies the server has
no room for), decoding untrusted bytes.

Everything here turns a client's mistake (or an overload) into an :class:`ApiError` (status and one-line message),
which the app renders as ``{"error": "..."}``. Decoding itself is the library's :func:`~birder.io.images.load_image`.
"""

import binascii
import io
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from PIL import Image, UnidentifiedImageError

from birder.errors import ImageDecodeError, one_line
from birder.io.images import load_image

try:
    from fastapi import Request
    from fastapi.responses import JSONResponse
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(f"birder-serve needs the 'serve' extra: pip install 'birder[serve]' ({err})") from err

# Field names looked for first in a multipart form (any file field is taken otherwise).
_IMAGE_FIELDS = ("image", "file", "photo")
_MAX_NAME_CHARS = 100

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class ApiError(Exception):
    """A refused request: becomes ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str, *, close: bool = False) -> JSONResponse:
    headers = {"connection": "close"} if close else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class BodySizeLimit:
    """ASGI middleware: refuses request bodies over ``max_bytes`` with 413, before they are read into memory.

    A declared ``Content-Length`` over the limit is refused at once; a body without one (chunked) is counted
    as it arrives and refused when it crosses the limit.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"upload too large: the limit is {self.max_bytes} bytes ({self.max_bytes / 2**20:.1f} MiB)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await error_response(413, self._message())(scope, receive, send)
            return

        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise ApiError(413, self._message())
            return message

        await self.app(scope, counting_receive, send)


class InflightBytes:
    """Request bytes admitted and not yet answered, held under ``limit``.

    Only the event loop touches it (the ASGI middleware), so it needs no lock.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the in-flight bound must be at least 1 byte, got {limit}")
        self.limit = limit
        self.held = 0
        # Requests refused from their declared size, before any handler saw them (the others are counted there).
        self.refused_early = 0

    def try_hold(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def release(self, size: int) -> None:
        self.held -= size

    def busy_message(self) -> str:
        return (
            f"server busy: {self.held / 2**20:.1f} MiB of uploads already in flight "
            f"(limit {self.limit / 2**20:.1f} MiB); retry later"
        )


class InflightLimit:
    """ASGI middleware: refuses a request with 503 when its body would take the bytes in flight over the bound.

    The body sizes that memory must hold at once are bounded here, before anything is read: a declared
    ``Content-Length`` is held for the whole request and refused at once when it does not fit (the body is left
    unread); a body without one (chunked) is held chunk by chunk as it arrives and refused when a chunk does
    not fit. Everything held is released when the response is done.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], inflight: InflightBytes) -> None:
        self.app = app
        self.inflight = inflight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        declared = _content_length(scope)
        if declared is not None and not self.inflight.try_hold(declared):
            self.inflight.refused_early += 1
            await error_response(503, self.inflight.busy_message())(scope, receive, send)
            return
        held = declared or 0

        async def counting_receive() -> Message:
            nonlocal held
            message = await receive()
            if declared is None and message["type"] == "http.request":
                size = len(message.get("body", b""))
                if not self.inflight.try_hold(size):
                    raise ApiError(503, self.inflight.busy_message())
                held += size
            return message

        try:
            await self.app(scope, counting_receive, send)
        finally:
            self.inflight.release(held)


def _content_length(scope: Scope) -> int | None:
    """The declared body size of a request, or None when it has none (a chunked body)."""
    declared = dict(scope.get("headers") or []).get(b"content-length")
    return int(declared) if declared is not None and declared.isdigit() else None


def short_text(text: str) -> str:
    """One short line of user-supplied text (a file name) fit to quote in an error message."""
    text = "".join(char if char.isprintable() else "?" for char in text)
    return text if len(text) <= _MAX_NAME_CHARS else text[: _MAX_NAME_CHARS - 3] + "..."


def open_upload(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """The header of an uploaded file, its pixels not decoded yet, or an :class:`ApiError`: a file that is not an
    image, or one of more than ``max_pixels`` pixels."""
    shown = short_text(name)
    if not data:
        raise ApiError(422, f"cannot read image '{shown}': empty file (0 bytes)")
    try:
        opened = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ApiError(422, f"cannot read image '{shown}': not a recognised image format") from None
    except Image.DecompressionBombError:
        raise ApiError(413, f"image '{shown}' has too many pixels (a decompression bomb?)") from None
    except Exception as err:  # any parser failure on untrusted bytes is the client's bad file
        raise ApiError(
            422, f"cannot read image '{shown}': truncated or corrupt image: {short_text(one_line(err))}"
        ) from None

    (width, height) = opened.size
    if width * height > max_pixels:
        raise ApiError(
            413, f"image '{shown}' is {width}x{height} = {width * height} pixels; the server's limit is {max_pixels}"
        )
    return opened


def decode_opened(opened: Image.Image, name: str) -> Image.Image:
    """The pixels of an image :func:`open_upload` opened, as 8-bit RGB through :func:`load_image`."""
    try:
        return load_image(opened)
    except ImageDecodeError as err:
        # load_image names an in-memory image generically; the client knows it by its file name
        raise ApiError(422, str(err).replace("'<in-memory image>'", f"'{short_text(name)}'", 1)) from None


def decode_upload(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Bytes of an uploaded file -> 8-bit RGB image through :func:`load_image`, or an :class:`ApiError`.

    The pixel count is checked on the header, before anything is decompressed.
    """
    return decode_opened(open_upload(data, name, max_pixels), name)


async def read_image_request(request: Request) -> tuple[bytes, str, dict[str, str]]:
    """The image bytes, its name and the other (string) fields of a request, whatever its encoding."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _read_multipart(request)
    if content_type == "application/json":
        return await _read_json(request)
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        return (await _read_body(request), "upload", {})

    raise ApiError(
        415,
        f"unsupported content type '{short_text(content_type) or 'none'}': send multipart/form-data with a file field "
        '\'image\', JSON {"image": "<base64>"}, or the image bytes with an image/* content type',
    )


async def _read_body(request: Request) -> bytes:
    """The request body, held once: Starlette's ``body()`` keeps its chunks until it has joined them (twice the
    size at the peak), which the in-flight bound would have to allow for."""
    buffer = io.BytesIO()
    async for chunk in request.stream():
        buffer.write(chunk)
    return buffer.getvalue()  # the buffer's own bytes, not a copy


async def _read_multipart(request: Request) -> tuple[bytes, str, dict[str, str]]:
    try:
        form = await request.form(max_files=4, max_fields=32)
    except ApiError:
        raise
    except Exception as err:  # python-multipart's and Starlette's parser errors
        detail = getattr(err, "detail", None) or str(err) or type(err).__name__
        raise ApiError(400, f"malformed multipart form: {short_text(str(detail))}") from None

    files = {key: value for key, value in form.multi_items() if hasattr(value, "read")}
    fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
    upload = next((files[key] for key in _IMAGE_FIELDS if key in files), None)
    if upload is None and files:
        upload = next(iter(files.values()))
    if upload is None:
        raise ApiError(400, "no image in the form: send the photo as a file field named 'image'")
    data = await upload.read()
    await form.close()
    return (data, upload.filename or "upload", fields)


async def _read_json(request: Request) -> tuple[bytes, str, dict[str, str]]:
    try:
        # The body is let go once parsed, and the photo's text once encoded: a JSON upload holds at most twice its
        # size at any moment (what the server's memory bound counts: birder.serve.memory)
        body = json.loads(await _read_body(request))
    except (ValueError, RecursionError) as err:  # not JSON, not UTF-8, nested too deep, an integer too long
        raise ApiError(400, f"request body is not valid JSON: {short_text(one_line(err))}") from None
    if not isinstance(body, dict) or not isinstance(body.get("image"), str):
        raise ApiError(400, 'JSON requests need a string field "image" holding the base64-encoded photo')

    encoded = body.pop("image")
    if encoded.startswith("data:") and "," in encoded:  # a data URL, as browsers make them
        encoded = encoded.split(",", 1)[1]
    try:
        text = encoded.encode("ascii")
    except UnicodeEncodeError:
        raise ApiError(400, 'field "image" is not valid base64') from None
    del encoded
    data = _base64_decode(text)
    del text

    fields = {key: _field_text(value) for key, value in body.items() if value is not None}
    return (data, short_text(fields.pop("filename", "") or "upload"), fields)


def _base64_decode(text: bytes) -> bytes:
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error:
        pass
    try:  # base64 wrapped over lines, as many encoders write it
        return binascii.a2b_base64(text.translate(None, b" \t\r\n\v\f"), strict_mode=True)
    except binascii.Error:
        raise ApiError(400, 'field "image" is not valid base64') from None


def _field_text(value: Any) -> str:
    """A JSON field's value as the text a form field would carry: numbers as written (``48.2``, ``16``), strings
    as they are, anything else as JSON (so that a field's parser names it in its error: ``true``, ``[1, 2]``)."""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def parse_top_k(raw: str | None, default: int, num_classes: int) -> int:
    if raw is None or raw == "":
        return min(default, num_classes)
    try:
        top_k = int(raw)
    except ValueError:
        raise ApiError(400, f"top_k must be a whole number, got '{short_text(raw)}'") from None
    if top_k < 1:
        raise ApiError(400, f"top_k must be at least 1, got {top_k}")
    return min(top_k, num_classes)  # asking for more than there are is not an error
