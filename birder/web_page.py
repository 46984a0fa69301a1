"""The one way birder serves a web page (birder-serve's photo page, birder-review's review screen).

A page is the head every birder page shares (``birder/static/head.html``: character set, viewport, the icon and
``base.css``, the palette and type) followed by its app's own ``static/<page>.html``, which goes on with the page's
title, stylesheet and script, closes the head and holds the body. The app's static files, then the shared ones,
are served under ``/static``; the page loads nothing from anywhere else, and its Content-Security-Policy makes the
browser hold to that.

fastapi is imported only when a page is added (it is the ``serve`` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

SHARED_STATIC_DIR = Path(__file__).parent / "static"
PAGE_CSP = "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'"


def page_html(static_dir: Path, page: str) -> str:
    """The whole document of ``static_dir / page``: the shared head, then the page's file."""
    head = (SHARED_STATIC_DIR / "head.html").read_text(encoding="utf-8")
    return head + (static_dir / page).read_text(encoding="utf-8")


def add_page(app: FastAPI, static_dir: Path, page: str) -> None:
    """Serve ``static_dir / page`` (after the shared head) at ``/``, and ``static_dir``'s files, then the shared
    ones, under ``/static``."""
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles

    document = page_html(static_dir, page)

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(document, headers={"Content-Security-Policy": PAGE_CSP})

    # The shared files are found through the package, as StaticFiles finds package data
    app.mount("/static", StaticFiles(directory=static_dir, packages=[("birder", "static")]), name="static")
