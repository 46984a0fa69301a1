"""The review page in a real headless browser (Debian's Chromium driven by Playwright for Python): accept, correct
by typing a species, mark a blank, undo, reload; reviews.csv holds exactly those decisions and the export carries
them."""

import shutil
from pathlib import Path

import pytest
from review_support import predict, read_csv, survey

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")

from serve_support import running_server  # noqa: E402 (after the extras check)
from test_serve_browser import CHROMIUM, TIMEOUT_MS, browser  # noqa: E402, F401 (browser: the shared fixture)

from birder.review.app import create_review_app  # noqa: E402
from birder.review.session import ReviewSession  # noqa: E402
from birder.tools.cli import main as tools_main  # noqa: E402

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() and shutil.which("chromium") is None,
    reason="Debian's chromium is not installed (/usr/bin/chromium); .ci/run installs it with apt-get",
)


@pytest.fixture
def results(tmp_path: Path) -> Path:
    (photos, model) = survey(tmp_path)
    return predict(photos, model, tmp_path / "results", "--events")


def unit_shown(page: object) -> str:
    locator = page.locator("#unit-id")  # type: ignore[attr-defined]
    sync_api.expect(locator).not_to_have_text("", timeout=TIMEOUT_MS)
    return locator.text_content()


def wait_for_next(page: object, previous: str) -> str:
    sync_api.expect(page.locator("#unit-id")).not_to_have_text(previous, timeout=TIMEOUT_MS)  # type: ignore[attr-defined]
    return unit_shown(page)


def test_accept_correct_blank_undo_reload(
    browser: object,  # noqa: F811 (the fixture)
    results: Path,
    tmp_path: Path,
) -> None:
    session = ReviewSession.open(results, order="least-sure")
    answers = {unit.unit_id: unit.answer.label for unit in session.folder.units}
    with running_server(create_review_app(session, reviewer="anna")) as url:
        page = browser.new_page()  # type: ignore[attr-defined]
        requested: list[str] = []
        errors: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        try:
            page.goto(url, timeout=TIMEOUT_MS)
            sync_api.expect(page.locator("#reviewer")).to_have_text("anna", timeout=TIMEOUT_MS)
            # The shared palette (birder/static/base.css) and the page's own (review.css) both apply
            assert page.eval_on_selector("h1", "e => getComputedStyle(e).color") == "rgb(47, 111, 79)"
            box_colour = "getComputedStyle(document.documentElement).getPropertyValue('--box').trim()"
            assert page.evaluate(box_colour) == "#ffcf33"
            first = unit_shown(page)
            sync_api.expect(page.locator("#photos img.photo").first).to_be_visible(timeout=TIMEOUT_MS)
            assert page.locator("#alternatives .alternative").count() == 5
            sync_api.expect(page.locator("#answer .answer-label")).to_have_text(answers[first])

            page.keyboard.press("Enter")  # accept the machine's answer
            second = wait_for_next(page, first)

            # Correct by typing: the first letter opens the search, Enter takes the first match
            corrected = next(name for name in ("Species B", "Species E") if name != answers[second])
            page.keyboard.type(corrected.lower())
            sync_api.expect(page.locator("#search-results .match").first).to_have_text(corrected, timeout=TIMEOUT_MS)
            page.keyboard.press("Enter")
            third = wait_for_next(page, second)

            page.keyboard.press("b")  # blank
            fourth = wait_for_next(page, third)
            assert len({first, second, third, fourth}) == 4

            page.keyboard.press("z")  # undo: the blank is taken back and its unit shown again
            sync_api.expect(page.locator("#unit-id")).to_have_text(third, timeout=TIMEOUT_MS)
            sync_api.expect(page.locator("#progress")).to_have_text("2 of 7 decided", timeout=TIMEOUT_MS)

            page.reload()
            sync_api.expect(page.locator("#progress")).to_have_text("2 of 7 decided", timeout=TIMEOUT_MS)
            assert unit_shown(page) not in (first, second)
        finally:
            page.close()
    # Everything came from this server
    assert requested and all(link.startswith((url, "blob:", "data:")) for link in requested), requested
    assert errors == []

    rows = read_csv(results / "reviews.csv")
    assert [(row["action"], row["unit"], row["label"]) for row in rows] == [
        ("decide", first, answers[first]),
        ("decide", second, corrected),
        ("decide", third, "blank"),
        ("undo", third, ""),
    ]
    assert rows[3]["undoes"] == rows[2]["decision_id"]
    assert all(row["reviewer"] == "anna" and float(row["seconds"]) >= 0 for row in rows[:3])  # the time shown
    current = ReviewSession.open(results).current()
    assert {unit: submission.whole.label for (unit, submission) in current.items()} == {
        first: answers[first],
        second: corrected,
    }

    argv = ["export", str(results), "--export", "camtrap-dp", "--timezone", "+02:00", "--output-dir", str(tmp_path)]
    assert tools_main(argv) == 0
    human = [r for r in read_csv(tmp_path / "camtrap-dp/observations.csv") if r["classificationMethod"] == "human"]
    assert {(r["eventID"], r["scientificName"], r["classifiedBy"]) for r in human} == {
        (first, answers[first], "anna"),
        (second, corrected, "anna"),
    }


def test_boxes_are_corrected_one_by_one_from_the_keyboard(
    browser: object,  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    from detect_support import save_tiny_detector

    (photos, model) = survey(tmp_path)
    results = predict(photos, model, tmp_path / "results", "--detector", str(save_tiny_detector(tmp_path / "d.pt")))
    session = ReviewSession.open(results, order="species")
    with running_server(create_review_app(session, reviewer="ben")) as url:
        page = browser.new_page()  # type: ignore[attr-defined]
        try:
            page.goto(url, timeout=TIMEOUT_MS)
            first = unit_shown(page)
            boxes = page.locator("#photos .box")
            sync_api.expect(boxes).to_have_count(3, timeout=TIMEOUT_MS)
            for outline in boxes.all():  # drawn on the photo
                area = outline.bounding_box()
                assert area is not None and area["width"] > 0 and area["height"] > 0
            page.keyboard.press("Tab")  # the second box
            sync_api.expect(page.locator("#box-list li.selected")).to_contain_text("box 0:1")
            page.keyboard.press("b")  # it is no animal; the selection moves on to the third
            sync_api.expect(page.locator("#box-list li.selected")).to_contain_text("box 0:2")
            page.keyboard.press("2")  # the third box: its second alternative
            page.keyboard.press("Enter")  # save all three
            wait_for_next(page, first)
        finally:
            page.close()
    unit = session.folder.unit(first)
    rows = read_csv(results / "reviews.csv")
    assert [(row["box"], row["label"]) for row in rows] == [
        ("0:0", unit.boxes[0].answer.label),
        ("0:1", "blank"),
        ("0:2", unit.boxes[2].answer.top[1][0]),
    ]
    assert {row["decision_id"] for row in rows} == {rows[0]["decision_id"]} and rows[0]["reviewer"] == "ben"
