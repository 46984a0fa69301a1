"""What the OpenAPI schema (``GET /openapi.json``) says of the routes that read a photo.

Those routes read the request themselves (:func:`~birder.serve.uploads.read_image_request`: a multipart form, JSON
with the photo in base64, or the photo's bytes as the body), so FastAPI cannot describe them from their signature:
these pieces do, for clients, and for the Schemathesis run of the test suite (tests/test_serve_schemathesis.py),
which sends what the schema allows (and what it does not) to every route. Every refusal is ``{"error": "<one line>"}``.
"""

from typing import Any

ERROR_SCHEMA = {
    "type": "object",
    "properties": {"error": {"type": "string", "description": "what was wrong, in one line"}},
    "required": ["error"],
}

_ERROR_REASONS = {
    "400": "a malformed request or a bad field (the field is named)",
    "404": "nothing there",
    "409": "the model cannot do this (no classes, or not a ViT for explanations)",
    "410": "a photo of the index can no longer be read",
    "413": "an upload or an image too large (bytes, pixels, or memory to decode it)",
    "415": "an unknown content type",
    "422": "a file that is not a readable image",
    "503": "overloaded: retry later",
    "504": "the request took longer than the server's --timeout",
}

# Form fields, JSON keys or query parameters: each route's own (the query wins over the body)
LAT = {"type": "number", "minimum": -90, "maximum": 90, "description": "latitude in degrees (needs lon)"}
LON = {"type": "number", "minimum": -180, "maximum": 180, "description": "longitude in degrees (needs lat)"}
DATE = {"type": "string", "format": "date", "description": "the day the photo was taken (YYYY-MM-DD)"}
TOP_K = {"type": "integer", "minimum": 1, "description": "species returned (default: the server's --top-k)"}


def error_responses(*statuses: int) -> dict[str, Any]:
    """The ``responses`` of the refusals a route may answer with."""
    return {
        str(status): {
            "description": _ERROR_REASONS[str(status)],
            "content": {"application/json": {"schema": ERROR_SCHEMA}},
        }
        for status in statuses
    }


def query_parameters(fields: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"name": name, "in": "query", "required": False, "schema": schema} for (name, schema) in fields.items()]


def photo_request(fields: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The ``requestBody`` of a route that reads one photo: a form (file field ``image``), JSON, or the bytes."""
    fields = fields or {}
    form = {
        "type": "object",
        "properties": {"image": {"type": "string", "format": "binary"}, **fields},
        "required": ["image"],
    }
    json_body = {
        "type": "object",
        "properties": {
            "image": {"type": "string", "format": "byte", "description": "the photo's file, base64-encoded"},
            "filename": {"type": "string"},
            **fields,
        },
        "required": ["image"],
    }
    raw = {"schema": {"type": "string", "format": "binary"}}
    return {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": form},
            "application/json": {"schema": json_body},
            "image/jpeg": raw,
            "image/png": raw,
            "application/octet-stream": raw,
        },
    }


def photo_route(
    fields: dict[str, dict[str, Any]] | None = None,
    statuses: tuple[int, ...] = (400, 413, 415, 422, 503, 504),
) -> dict[str, Any]:
    """``openapi_extra`` of a route reading one photo, with ``fields`` in its body or its query."""
    fields = fields or {}
    return {
        "parameters": query_parameters(fields),
        "requestBody": photo_request(fields),
        "responses": error_responses(*statuses),
    }
