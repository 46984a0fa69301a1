"""The web page in a real headless browser: Debian's Chromium driven by Playwright for Python."""

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from serve_support import SPECIES, expected_outputs, make_photos, running_server, saved_and_loaded_tiny_model

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")

from birder.serve.app import create_app  # noqa: E402 (after the extras check)

CHROMIUM = Path("/usr/bin/chromium")
# What Chromium needs as root on these machines, without reaching any network (see .ci/run, which installs it).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 20_000

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() and shutil.which("chromium") is None,
    reason="Debian's chromium is not installed (/usr/bin/chromium); .ci/run installs it with apt-get",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, Path], dict[str, np.ndarray]]]:
    directory = tmp_path_factory.mktemp("browser")
    (net, model_info) = saved_and_loaded_tiny_model(directory)
    photos = make_photos(directory / "photos")
    probs = {name: expected_outputs(net, model_info, path)[0] for (name, path) in photos.items()}
    with running_server(create_app(net, model_info, name="tiny-birds")) as url:
        yield (url, photos, probs)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    executable = CHROMIUM if CHROMIUM.exists() else Path(shutil.which("chromium") or "")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(executable), headless=True, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def open_page(browser: object, url: str) -> tuple[object, list[str], list[str]]:
    """A fresh page on ``url``; also returns the URLs it requested and the errors it logged."""
    page = browser.new_page()  # type: ignore[attr-defined]
    requested: list[str] = []
    errors: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url, timeout=TIMEOUT_MS)
    return (page, requested, errors)


def test_uploading_a_photo_shows_its_top_species(browser: object, site: tuple) -> None:
    (url, photos, probs) = site
    (page, requested, errors) = open_page(browser, url)
    try:
        sync_api.expect(page.locator("#model-name")).to_have_text("tiny-birds", timeout=TIMEOUT_MS)
        # The shared palette (birder/static/base.css) colours the heading
        assert page.eval_on_selector("h1", "e => getComputedStyle(e).color") == "rgb(47, 111, 79)"

        page.set_input_files("#file-input", str(photos["robin.jpg"]))

        rows = page.locator("#predictions .prediction")
        sync_api.expect(rows).to_have_count(5, timeout=TIMEOUT_MS)
        order = np.argsort(-probs["robin.jpg"], kind="stable")
        species = rows.locator(".species").all_text_contents()
        assert species == [SPECIES[index] for index in order]
        percents = [float(text.rstrip("%")) for text in rows.locator(".probability").all_text_contents()]
        np.testing.assert_allclose(percents, probs["robin.jpg"][order] * 100, atol=0.051)
        # The bars are drawn: the top one is the widest.
        widths = [box["width"] for box in (fill.bounding_box() for fill in rows.locator(".bar-fill").all())]
        assert widths[0] == max(widths) > 0
        assert page.locator("#preview").get_attribute("src").startswith("blob:")
        assert page.locator("#error").is_hidden()
    finally:
        page.close()

    # Everything came from this server: no CDN, no other host.
    assert requested and all(link.startswith((url, "blob:", "data:")) for link in requested), requested
    assert errors == []


def test_a_bad_file_shows_the_servers_reason(browser: object, site: tuple, tmp_path: Path) -> None:
    (url, _, _) = site
    not_a_photo = tmp_path / "notes.jpg"
    not_a_photo.write_text("this is not an image")
    (page, _, _) = open_page(browser, url)
    try:
        page.set_input_files("#file-input", str(not_a_photo))
        error = page.locator("#error")
        sync_api.expect(error).to_be_visible(timeout=TIMEOUT_MS)
        sync_api.expect(error).to_contain_text("not a recognised image format")
        assert page.locator("#predictions .prediction").count() == 0
    finally:
        page.close()


# ---------------------------------------------------------------------------------------------------------------------
# The answer line: "genus X" with its probability, or "unknown"
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def answer_sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, dict[str, Path]]]:
    """Two servers of one tiny model: one whose unclear species fall back to their genus (every species in one),
    one whose unknown test calls every photo unknown."""
    from birder.inference.decision import build_policy

    directory = tmp_path_factory.mktemp("browser-answers")
    (net, model_info) = saved_and_loaded_tiny_model(directory)
    photos = make_photos(directory / "photos")
    taxonomy = directory / "taxonomy.csv"
    taxonomy.write_text("species,genus,family,order\n" + "".join(f"{name},Avis,Avidae,Aviformes\n" for name in SPECIES))
    fallback = build_policy(net, SPECIES, min_prob=0.99, taxonomy=taxonomy)
    unknown = build_policy(net, SPECIES, unknown_method="msp", unknown_threshold=0.0)
    with (
        running_server(create_app(net, model_info, name="genus", policy=fallback)) as genus_url,
        running_server(create_app(net, model_info, name="unknown", policy=unknown)) as unknown_url,
    ):
        yield (genus_url, unknown_url, photos)


def test_the_page_shows_the_decided_answer(browser: object, answer_sites: tuple) -> None:
    (genus_url, unknown_url, photos) = answer_sites
    for url, expected_label, expected_probability in (
        (genus_url, "genus Avis", "100.0%"),
        (unknown_url, "unknown", ""),
    ):
        (page, _, errors) = open_page(browser, url)
        try:
            page.set_input_files("#file-input", str(photos["wren.png"]))
            answer = page.locator("#answer")
            sync_api.expect(answer).to_be_visible(timeout=TIMEOUT_MS)
            sync_api.expect(answer.locator(".answer-label")).to_have_text(expected_label, timeout=TIMEOUT_MS)
            assert answer.locator(".answer-probability").all_text_contents() == (
                [expected_probability] if expected_probability else []
            )
            sync_api.expect(page.locator("#predictions .prediction")).to_have_count(5, timeout=TIMEOUT_MS)
        finally:
            page.close()
        assert errors == []


# ---------------------------------------------------------------------------------------------------------------------
# Boxes over the photo (birder-serve --detector); a server without a detector is never asked for them
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detect_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, Path]]]:
    from detect_support import tiny_detector

    from birder.serve.detect import ServedDetector

    directory = tmp_path_factory.mktemp("browser-detect")
    (net, model_info) = saved_and_loaded_tiny_model(directory)
    photos = make_photos(directory / "photos")
    (det, det_info) = tiny_detector()
    with running_server(create_app(net, model_info, name="boxes", detector=ServedDetector(det, det_info))) as url:
        yield (url, photos)


def test_the_page_draws_the_detected_boxes(browser: object, detect_site: tuple, site: tuple) -> None:
    from detect_support import BOXES_PER_PHOTO

    (url, photos) = detect_site
    (page, requested, errors) = open_page(browser, url)
    try:
        page.set_input_files("#file-input", str(photos["robin.jpg"]))
        boxes = page.locator("#det-boxes .det-box")
        sync_api.expect(boxes).to_have_count(BOXES_PER_PHOTO, timeout=TIMEOUT_MS)
        sync_api.expect(page.locator("#detections li")).to_have_count(BOXES_PER_PHOTO, timeout=TIMEOUT_MS)
        labels = boxes.locator(".det-label").all_text_contents()
        assert all(label.split()[0] in " ".join(SPECIES) and label.endswith("%") for label in labels), labels
        # Each box lies on the photo as shown
        shown = page.locator("#preview").bounding_box()
        for box in (outline.bounding_box() for outline in boxes.all()):
            assert box["width"] > 0 and box["height"] > 0
            assert shown["x"] - 1 <= box["x"] and box["x"] + box["width"] <= shown["x"] + shown["width"] + 1
        sync_api.expect(page.locator("#predictions .prediction")).to_have_count(5, timeout=TIMEOUT_MS)
    finally:
        page.close()
    assert any(link.endswith("/v1/detect") for link in requested) and errors == []

    (plain_url, plain_photos, _) = site
    (page, requested, errors) = open_page(browser, plain_url)
    try:
        page.set_input_files("#file-input", str(plain_photos["robin.jpg"]))
        sync_api.expect(page.locator("#predictions .prediction")).to_have_count(5, timeout=TIMEOUT_MS)
        assert page.locator("#detections-panel").is_hidden() and page.locator("#det-boxes .det-box").count() == 0
    finally:
        page.close()
    assert not any("/v1/detect" in link for link in requested) and errors == []
