"""birder's two web pages (birder-serve's, birder-review's) are served one way: the head every page shares, then the
page's own file, as one well-formed document under a Content-Security-Policy, with the page's files and the shared
ones under /static."""

from html.parser import HTMLParser
from pathlib import Path

import pytest
from serve_support import saved_and_loaded_tiny_model

pytest.importorskip("fastapi")

from fastapi import FastAPI
from fastapi.testclient import TestClient

from birder.review import app as review_app
from birder.serve import app as serve_app
from birder.web_page import add_page, page_html

# (the app's static folder, its page, the page's title, stylesheet and script)
PAGES = {
    "serve": (serve_app.STATIC_DIR, "index.html", "birder: which bird is it?", "/static/style.css", "/static/app.js"),
    "review": (review_app.STATIC_DIR, "review.html", "birder-review", "/static/review.css", "/static/review.js"),
}


class _Outline(HTMLParser):
    """The elements of a document in order (name, attributes, in the head or not), and its title."""

    def __init__(self) -> None:
        super().__init__()
        self.opened: list[str] = []
        self.closed: list[str] = []
        self.head: list[tuple[str, dict[str, str | None]]] = []
        self.title = ""
        self._in_head = self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.opened.append(tag)
        self._in_head |= tag == "head"
        self._in_title = tag == "title"
        if self._in_head:
            self.head.append((tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        self.closed.append(tag)
        self._in_head &= tag != "head"
        self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data


@pytest.mark.parametrize("name", PAGES)
def test_each_page_is_one_document_with_the_shared_head_first(name: str) -> None:
    (static_dir, page, title, style, script) = PAGES[name]
    app = FastAPI()
    add_page(app, static_dir, page)
    client = TestClient(app)
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert response.headers["content-security-policy"].startswith("default-src 'self';")
    document = response.text
    assert document == page_html(static_dir, page)
    assert document.lower().startswith("<!doctype html>")
    assert '<meta charset="utf-8">' in document[:1024]  # where browsers look for the encoding

    outline = _Outline()
    outline.feed(document)
    for element in ("html", "head", "body"):
        assert outline.opened.count(element) == outline.closed.count(element) == 1, element
    assert outline.opened.index("head") < outline.opened.index("body")
    assert outline.title == title
    links = [attrs["href"] for (tag, attrs) in outline.head if tag == "link"]
    # The shared palette first, the page's own style after it (so it can override it)
    assert links == ["/static/favicon.svg", "/static/base.css", style]
    assert [attrs["src"] for (tag, attrs) in outline.head if tag == "script"] == [script]
    # Everything the head names is served: the page's own files and the shared ones
    for asset in [*links, script]:
        assert client.get(asset).status_code == 200, asset


def test_birder_serve_serves_its_page_this_way(tmp_path: Path) -> None:
    (net, model_info) = saved_and_loaded_tiny_model(tmp_path)
    client = TestClient(serve_app.create_app(net, model_info))
    assert client.get("/").text == page_html(serve_app.STATIC_DIR, "index.html")
