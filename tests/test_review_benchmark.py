"""The review benchmark runs end to end on a small survey, and plan order beats random order there."""

import json
from pathlib import Path

from benchmarks import review


def test_review_benchmark_quick(tmp_path: Path) -> None:
    output = tmp_path / "review.json"
    assert review.main(["--quick", "--seeds", "1", "--output", str(output)]) == 0
    report = json.loads(output.read_text())
    (run,) = report["runs"]
    assert 0.6 < run["top1"] < 0.95  # the simulated classifier is about as good as the issue asks
    left = run["left"]
    assert set(left) == {"plan", "least-sure", "species", "random"}
    assert all(list(figures) == ["0%", "5%", "10%", "20%"] for figures in left.values())
    assert len({figures["0%"] for figures in left.values()}) == 1  # the same survey for every order
    # More reviews never leave more wrong records in plan order, and plan beats random at every budget
    assert left["plan"]["0%"] >= left["plan"]["5%"] >= left["plan"]["10%"] >= left["plan"]["20%"]
    assert all(left["plan"][budget] < left["random"][budget] for budget in ("5%", "10%", "20%"))
    for order in ("after_plan", "after_random"):
        figures = run["model"][order]
        assert set(figures) == {"before", "temperature_refit", "fine_tuned", "reviewed_photos"}
        assert figures["temperature_refit"]["top1"] == figures["before"]["top1"]  # a temperature changes no argmax
    assert report["machine"] and isinstance(report["verdict"]["target_met"], bool)
