"""birder-review: results folders read as units, decisions in reviews.csv (durable, shared, undoable), the orders,
the API, and bad input in one line."""

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from review_support import CLASSES, copy_results, predict, read_csv, survey

from birder.errors import BirderError
from birder.review.folder import read_review_folder
from birder.review.plan import Item, Planner, PlanUnit, Truth, order_units
from birder.review.session import ReviewSession
from birder.review.store import COLUMNS, Label, ReviewStore
from birder.scripts.review import main as review_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from detect_support import save_tiny_detector

    tmp = tmp_path_factory.mktemp("review")
    (photos, model) = survey(tmp)
    detector = save_tiny_detector(tmp / "det.pt")
    return {
        "photos": photos,
        "model": model,
        "events": predict(photos, model, tmp / "events", "--events"),
        "plain": predict(photos, model, tmp / "plain"),
        "parquet": predict(photos, model, tmp / "parquet", "--format", "parquet", "--events"),
        "boxes": predict(photos, model, tmp / "boxes", "--detector", str(detector)),
    }


def open_copy(made: dict[str, Path], kind: str, tmp_path: Path, **options) -> ReviewSession:
    return ReviewSession.open(copy_results(made[kind], tmp_path), **options)


# ---------------------------------------------------------------------------------------------------------------------
# Reading a results folder
# ---------------------------------------------------------------------------------------------------------------------


def test_events_photos_and_boxes_become_units(made: dict[str, Path]) -> None:
    events = read_review_folder(made["events"])
    assert events.events and not events.detector and events.class_names == CLASSES
    assert [unit.kind for unit in events.units] == ["event"] * 7
    assert [len(unit.photos) for unit in events.units] == [2, 1, 1, 2, 1, 1, 1]
    assert [unit.camera.rsplit("/", 1)[1] for unit in events.units] == ["camA"] * 3 + ["camB"] * 2 + ["camC"] * 2
    event_rows = {row["event_id"]: row for row in read_csv(made["events"] / "events.csv")}
    for unit in events.units:
        assert unit.answer.label == event_rows[unit.unit_id]["prediction"]
        row = event_rows[unit.unit_id]
        assert unit.answer.top[0] == (row["top1_class"], float(row["top1_prob"]))

    plain = read_review_folder(made["plain"])
    assert [unit.kind for unit in plain.units] == ["photo"] * 9 and not plain.events
    parquet = read_review_folder(made["parquet"])
    assert [(u.unit_id, u.answer) for u in parquet.units] == [(u.unit_id, u.answer) for u in events.units]

    boxes = read_review_folder(made["boxes"])
    assert boxes.detector and len(boxes.units) == 9
    photo_rows = {row["path"]: row for row in read_csv(made["boxes"] / "photos.csv")}
    for unit in boxes.units:
        assert len(unit.boxes) == int(photo_rows[unit.unit_id]["detections"]) > 0
        assert unit.photos[0].size == (int(photo_rows[unit.unit_id]["width"]), int(photo_rows[unit.unit_id]["height"]))
        assert unit.sureness == min(box.answer.probability for box in unit.boxes)


def test_an_unfinished_run_is_read_from_its_journals(made: dict[str, Path], tmp_path: Path) -> None:
    results = copy_results(made["plain"], tmp_path)
    # What a run killed before its merge leaves: the rows in a journal, no final table
    (results / ".partial").mkdir()
    shutil.move(results / "results.csv", results / ".partial" / "results.r0.a0.csv")
    shutil.move(results / "run.json", results / ".partial" / "run.json")
    folder = read_review_folder(results)
    assert folder.partial and len(folder.units) == 9 and folder.model.endswith("tiny.pt")


def test_a_folder_without_results_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(BirderError, match="no results table"):
        read_review_folder(tmp_path)
    with pytest.raises(BirderError, match="is not a folder"):
        read_review_folder(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------------------------------
# Decisions: durable, undoable, shared
# ---------------------------------------------------------------------------------------------------------------------


def test_decide_undo_and_reopen_continue(made: dict[str, Path], tmp_path: Path) -> None:
    session = open_copy(made, "events", tmp_path, order="least-sure")
    first = session.next_unit("tab")
    session.decide(first.unit_id, "anna", [{"label": first.answer.label}], count=2, comment="two\nbirds")
    second = session.next_unit("tab")
    assert second.unit_id != first.unit_id
    session.decide(second.unit_id, "anna", [{"label": "Species B"}])
    third = session.next_unit("tab")
    session.decide(third.unit_id, "anna", [{"label": "blank"}], count=3)
    assert session.undo("anna").unit_id == third.unit_id

    reopened = ReviewSession.open(session.folder.directory, order="least-sure")
    current = reopened.current()
    assert {unit: s.whole.label for (unit, s) in current.items()} == {
        first.unit_id: first.answer.label,
        second.unit_id: "Species B",
    }
    assert current[first.unit_id].count == 2 and current[first.unit_id].comment == "two birds"
    assert reopened.next_unit("new tab").unit_id == third.unit_id  # continues where the reviewer stopped
    rows = read_csv(session.store.path)
    assert [row["action"] for row in rows] == ["decide", "decide", "decide", "undo"]
    assert rows[2]["count"] == "0"  # blank: no individuals, whatever was typed
    assert rows[3]["undoes"] == rows[2]["decision_id"] and all(row["reviewer"] == "anna" for row in rows)


def test_last_write_per_unit_and_reviewer_wins_history_kept(made: dict[str, Path], tmp_path: Path) -> None:
    session = open_copy(made, "events", tmp_path)
    unit = session.folder.units[0].unit_id
    session.decide(unit, "anna", [{"label": "Species A"}])
    session.decide(unit, "ben", [{"label": "Species C"}])
    session.decide(unit, "anna", [{"label": "Species D"}])
    by_reviewer = session.store.state.current_by_reviewer()
    assert by_reviewer[(unit, "anna")].whole.label == "Species D"
    assert by_reviewer[(unit, "ben")].whole.label == "Species C"
    assert session.current()[unit].whole.label == "Species D"  # the unit's answer: the latest
    assert len(read_csv(session.store.path)) == 3
    # Ben's undo takes back Ben's decision only
    session.undo("ben")
    assert (unit, "ben") not in session.store.state.current_by_reviewer()
    assert session.current()[unit].whole.label == "Species D"


def test_a_retried_decision_is_written_once(made: dict[str, Path], tmp_path: Path) -> None:
    session = open_copy(made, "events", tmp_path)
    unit = session.folder.units[1].unit_id
    retry = {"decision_id": "d1"}
    threads = [
        threading.Thread(target=session.decide, args=(unit, "anna", [{"label": "Species E"}]), kwargs=retry)
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(read_csv(session.store.path)) == 1
    session.undo("anna", undo_id="u1")
    session.undo("anna", undo_id="u1")  # the same undo sent twice takes back one decision
    assert [row["action"] for row in read_csv(session.store.path)] == ["decide", "undo"]


def test_two_writers_appending_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    # Two stores on one file are two writers as two processes are: each its own file handle, the lock between
    # them the file lock (flock), not a lock of this process
    path = tmp_path / "reviews.csv"
    stores = {name: ReviewStore(path, "m") for name in ("anna", "ben")}

    def write(name: str) -> None:
        for number in range(40):
            stores[name].decide(unit=f"U{number % 7}", kind="photo", reviewer=name, labels=[Label(f"Species {number}")])

    threads = [threading.Thread(target=write, args=(name,)) for name in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows = read_csv(path)
    assert len(rows) == 80 and len({row["decision_id"] for row in rows}) == 80
    for name in ("anna", "ben"):
        assert [row["label"] for row in rows if row["reviewer"] == name] == [f"Species {i}" for i in range(40)]
        # Each store also read what the other wrote
        assert len(stores[name].refresh().order) == 80
    # Last write per unit and reviewer: unit U0 got numbers 0, 7, ..., 35 from each
    assert stores["anna"].state.current_by_reviewer()[("U0", "ben")].whole.label == "Species 35"


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one line each, nothing lost
# ---------------------------------------------------------------------------------------------------------------------


def test_a_reviews_file_cut_mid_line_keeps_every_decision(made: dict[str, Path], tmp_path: Path) -> None:
    session = open_copy(made, "events", tmp_path)
    (first, second) = (session.folder.units[0].unit_id, session.folder.units[1].unit_id)
    session.decide(first, "anna", [{"label": "Species A"}])
    session.decide(second, "anna", [{"label": "Species B"}])
    path = session.store.path
    with open(path, "a", encoding="utf-8") as handle:  # a kill in the middle of a write
        handle.write("f00d,2024-01-01T00:00:00Z,anna,m,E00")

    reopened = ReviewSession.open(session.folder.directory)
    assert len(reopened.store.notes) == 1 and "cut off mid-write" in reopened.store.notes[0]
    assert "\n" not in reopened.store.notes[0]
    assert (path.parent / "reviews.csv.torn").read_text() == "f00d,2024-01-01T00:00:00Z,anna,m,E00\n"  # kept
    assert {u: s.whole.label for (u, s) in reopened.current().items()} == {first: "Species A", second: "Species B"}
    reopened.decide(reopened.folder.units[2].unit_id, "anna", [{"label": "blank"}])
    assert [row["label"] for row in read_csv(path)] == ["Species A", "Species B", "blank"]


def test_reviews_of_another_model_are_refused_in_one_line(made: dict[str, Path], tmp_path: Path, capsys) -> None:
    session = open_copy(made, "events", tmp_path)
    session.decide(session.folder.units[0].unit_id, "anna", [{"label": "Species A"}])
    text = session.store.path.read_text().replace(session.folder.model, "/models/other.pt")
    session.store.path.write_text(text)
    with pytest.raises(BirderError, match=r"other\.pt") as raised:
        ReviewSession.open(session.folder.directory)
    assert "\n" not in str(raised.value) and "move reviews.csv away" in str(raised.value)
    assert review_main([str(session.folder.directory)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("birder-review: error:") and "\n" not in err
    assert session.store.path.read_text() == text  # nothing touched


def test_a_photo_moved_since_the_run_is_shown_missing_and_decidable(made: dict[str, Path], tmp_path: Path) -> None:
    photos = Path(shutil.copytree(made["photos"], tmp_path / "photos"))
    results = predict(photos, made["model"], tmp_path / "results", "--events")
    moved = photos / "camB" / "0003.jpg"
    moved.rename(tmp_path / "elsewhere.jpg")
    session = ReviewSession.open(results)
    assert session.folder.missing_photos == 1
    unit = next(u for u in session.folder.units if any(p.path == str(moved) for p in u.photos))
    view = session.view(unit, "anna")
    assert [photo["missing"] for photo in view["photos"]] == [True] and view["photos"][0]["size"] is None
    session.decide(unit.unit_id, "anna", [{"label": "Species C"}])
    assert session.current()[unit.unit_id].whole.label == "Species C"


def test_command_line_refuses_a_shared_host_without_token(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as raised:
        review_main([str(tmp_path), "--host", "0.0.0.0"])
    assert raised.value.code == 2 and "--token" in capsys.readouterr().err
    assert review_main([str(tmp_path / "nothing")]) == 2
    assert "not a folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Orders
# ---------------------------------------------------------------------------------------------------------------------


def unit(unit_id: str, camera: str, label: str | None, probability: float, alternatives=()) -> PlanUnit:
    top = tuple(alternatives) or ((label or "X", probability),)
    return PlanUnit(unit_id, camera, (Item(label, probability, top),), probability, label or "uncertain")


def test_plan_puts_a_doubtful_lone_record_before_a_doubtful_common_one() -> None:
    # cam1 has many sure answers of A and C, and one doubtful A (else C): whatever it is, cam1's list stays A, C.
    # cam2 has one doubtful B, its only B: reviewing it can remove a wrong record. Least-sure looks at cam1's first.
    units = [unit(f"a{i}", "cam1", "A", 0.99, [("A", 0.99), ("C", 0.01)]) for i in range(10)]
    units += [unit(f"c{i}", "cam1", "C", 0.99, [("C", 0.99), ("A", 0.01)]) for i in range(10)]
    units.append(unit("a-doubt", "cam1", "A", 0.55, [("A", 0.55), ("C", 0.44)]))
    units.append(unit("b-doubt", "cam2", "B", 0.6, [("B", 0.6), ("A", 0.39)]))
    units.append(unit("c-sure", "cam2", "A", 0.99, [("A", 0.99)]))
    plan = order_units(units, "plan", {})
    least_sure = order_units(units, "least-sure", {})
    assert units[least_sure[0]].unit_id == "a-doubt"
    assert units[plan[0]].unit_id == "b-doubt"
    assert plan.index(20) > plan.index(21)
    # Once a person said b-doubt was A, cam2 claims no B: nothing is left to gain there
    planner = Planner(units)
    planner.prepare({"b-doubt": Truth(("A",), frozenset({"A"}))})
    assert planner.expected_wrong()["B"] < 0.05


def test_the_error_model_learns_a_label_that_is_often_wrong() -> None:
    units = [unit(f"x{i}", "cam", "X", 0.8, [("X", 0.8), ("Y", 0.15)]) for i in range(10)]
    units += [unit(f"z{i}", "cam", "Z", 0.8, [("Z", 0.8), ("Y", 0.15)]) for i in range(10)]
    planner = Planner(units)
    truths = {f"x{i}": Truth(("Y",), frozenset({"Y"})) for i in range(6)}
    truths.update({f"z{i}": Truth(("Z",), frozenset({"Z"})) for i in range(4)})
    model = planner.fit(truths)
    (x_error, z_error) = (model.error(units[9].items[0]), model.error(units[19].items[0]))
    # Calibrated, both would be wrong 20 % of the time; X was wrong 6 times out of 6, Z right 4 out of 4
    assert x_error > 0.5 and z_error < 0.3 and x_error > 1.5 * z_error
    assert model.outcomes(units[9].items[0])[1][0] == "Y"  # what X usually was


def test_orders_are_permutations_of_the_pending_units(made: dict[str, Path], tmp_path: Path) -> None:
    session = open_copy(made, "events", tmp_path)
    units = session._plan_units
    for order in ("plan", "least-sure", "species", "random"):
        assert sorted(order_units(units, order, {})) == list(range(len(units)))
    sureness = [units[i].sureness for i in order_units(units, "least-sure", {})]
    assert sureness == sorted(sureness)
    labels = [units[i].label for i in order_units(units, "species", {})]
    assert labels == sorted(labels)
    assert order_units(units, "random", {}, seed=3) == order_units(units, "random", {}, seed=3)
    done = {units[0].unit_id: Truth(("Species A",), frozenset({"Species A"}))}
    assert 0 not in order_units(units, "plan", done)


def test_plan_gains_match_a_direct_recount() -> None:
    # The vectorised one-step gain equals the expected drop of the summed record terms, recomputed by hand
    rng = np.random.default_rng(0)
    names = ["A", "B", "C"]
    units = []
    for i in range(12):
        p = rng.dirichlet(np.ones(3))
        order = np.argsort(-p)
        top = tuple((names[j], float(p[j])) for j in order)
        units.append(unit(f"u{i}", f"cam{i % 2}", top[0][0], top[0][1], top))
    planner = Planner(units)
    planner.prepare({})
    gains = planner._single_gains()
    total = sum(planner.expected_wrong().values())
    for index in (0, 5):
        (slots, chances) = (planner._slot[index], planner._slot_p[index])
        expected_after = 0.0
        for slot, chance in zip(slots, chances, strict=True):
            if slot < 0 or chance == 0:
                continue
            other = Planner(units)
            other.prepare({units[index].unit_id: Truth((names[slot],), frozenset({names[slot]}))})
            expected_after += chance * sum(other.expected_wrong().values())
        none = 1.0 - chances[slots >= 0].sum()
        blank = Planner(units)
        blank.prepare({units[index].unit_id: Truth(("blank",), frozenset())})
        expected_after += none * sum(blank.expected_wrong().values())
        assert gains[index] == pytest.approx(total - expected_after, abs=0.05)


# ---------------------------------------------------------------------------------------------------------------------
# Boxes and the API
# ---------------------------------------------------------------------------------------------------------------------


def test_boxes_are_corrected_one_by_one(made: dict[str, Path], tmp_path: Path) -> None:
    session = open_copy(made, "boxes", tmp_path)
    photo = session.folder.units[0]
    (first, second, third) = [box.key for box in photo.boxes]
    session.decide(photo.unit_id, "anna", [{"box": first, "label": "Species E"}, {"box": second, "label": "blank"}])
    rows = read_csv(session.store.path)
    assert [(row["box"], row["label"], row["count"]) for row in rows] == [
        (first, "Species E", "1"),
        (second, "blank", "0"),
        (third, photo.boxes[2].answer.label, "1"),  # not corrected: the machine's answer, written out
    ]
    assert len({row["decision_id"] for row in rows}) == 1 and session.current()[photo.unit_id].count == 2
    with pytest.raises(BirderError, match="no box"):
        session.decide(photo.unit_id, "anna", [{"box": "0:9", "label": "Species A"}])


def test_api_serves_units_photos_decisions_and_search(made: dict[str, Path], tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from birder.review.app import create_review_app

    session = open_copy(made, "events", tmp_path, order="least-sure")
    client = TestClient(create_review_app(session, reviewer="anna", token="s3cret"))
    assert client.get("/api/session").status_code == 401
    assert client.get("/").status_code == 200  # the page itself holds nothing of the survey
    for asset in ("/static/review.css", "/static/base.css", "/static/favicon.svg"):  # its own and the shared ones
        assert client.get(asset).status_code == 200, asset
    assert "--accent:" in client.get("/static/base.css").text
    headers = {"X-Review-Token": "s3cret"}
    info = client.get("/api/session", headers=headers).json()
    assert info["unit_kind"] == "event" and info["units"] == 7 and info["reviewer"] == "anna"
    shown = client.get("/api/next?client=t1&token=s3cret").json()
    unit = shown["unit"]
    assert shown["progress"] == {"decided": 0, "total": 7} and shown["species_left"]
    image = client.get(f"/api/units/{unit['index']}/photos/0?token=s3cret")
    assert image.status_code == 200 and image.content[:2] == b"\xff\xd8"
    body = {"decision_id": "x1", "unit": unit["id"], "labels": [{"label": "Species C"}], "client": "t1"}
    saved = client.post("/api/decisions", json=body, headers=headers).json()
    assert saved["saved"] == "x1" and saved["unit"]["id"] != unit["id"] and saved["progress"]["decided"] == 1
    assert client.post("/api/decisions", json=body, headers=headers).status_code == 200  # a retry: written once
    assert len(read_csv(session.store.path)) == 1
    bad = client.post("/api/decisions", json={**body, "decision_id": "x2", "labels": "Species C"}, headers=headers)
    assert bad.status_code == 400 and "labels" in bad.json()["error"]
    undone = client.post("/api/undo", json={"undo_id": "u1"}, headers=headers).json()
    assert undone["unit"]["id"] == unit["id"] and undone["progress"]["decided"] == 0
    matches = client.get("/api/search?q=species c", headers=headers).json()["matches"]
    assert matches[0] == {"name": "Species C", "rank": "species"}
    assert client.get("/api/units/99", headers=headers).status_code == 400


def test_search_covers_the_taxonomy(made: dict[str, Path], tmp_path: Path) -> None:
    taxonomy = tmp_path / "taxonomy.csv"
    rows = [f"{name},Avis,Avidae,Aviformes" for name in CLASSES[:3]]
    rows += [f"{name},Parva,Parvidae,Aviformes" for name in CLASSES[3:]]
    taxonomy.write_text("species,genus,family,order\n" + "\n".join(rows) + "\n")
    session = open_copy(made, "events", tmp_path, taxonomy=taxonomy)
    assert session.names.search("avi") == [
        {"name": "Avis", "rank": "genus"},
        {"name": "Avidae", "rank": "family"},
        {"name": "Aviformes", "rank": "order"},
    ]
    assert session.names.rank("Parvidae") == "family" and session.names.outcome("Parva") == "other"


def test_reviews_file_has_the_documented_columns(made: dict[str, Path], tmp_path: Path) -> None:
    session = open_copy(made, "events", tmp_path)
    assert session.store.path.read_text().splitlines() == [",".join(COLUMNS)]
    docs = (ROOT / "docs" / "review.md").read_text()
    assert all(f"`{column}`" in docs for column in COLUMNS)
    assert json.loads(json.dumps(session.view(session.folder.units[0]))) == session.view(session.folder.units[0])


def test_a_reviews_file_cut_in_its_header_or_of_another_kind(tmp_path: Path) -> None:
    cut = tmp_path / "cut.csv"
    cut.write_bytes(b"decision_id,ti")  # killed while writing the header of a new file
    store = ReviewStore(cut, "m")
    assert len(store.notes) == 1 and cut.read_text() == ",".join(COLUMNS) + "\n"
    store.decide(unit="U", kind="photo", reviewer="anna", labels=[Label("Species A")])
    assert [row["label"] for row in read_csv(cut)] == ["Species A"]

    other = tmp_path / "labels.csv"
    other.write_text("path,label\na.jpg,Species A\n")
    with pytest.raises(BirderError, match="other columns than this program writes"):
        ReviewStore(other, "m")
    assert other.read_text() == "path,label\na.jpg,Species A\n"  # untouched
