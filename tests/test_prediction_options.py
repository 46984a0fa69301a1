"""``birder-predict``'s options in typed groups (issue 23, Deliver 3): each argument lands in its group.

Parsing only (no model, no photos, no GPU): ``--device cuda:1`` is checked when a run starts.
"""

import dataclasses
import re
from pathlib import Path

import pytest

from birder.errors import BirderError
from birder.geo.predict import GeoOptions
from birder.inference.decision import DecisionOptions
from birder.run_options import RunOptions
from birder.runs import detect, predict, steps
from birder.runs.predict_options import (
    DetectionOptions,
    ExecutionOptions,
    ModelOptions,
    OutputOptions,
    PredictionOptions,
)
from birder.scripts.predict import build_parser, options_from_args

RUNS = Path(steps.__file__).parent


def _options(*argv: str) -> PredictionOptions:
    return options_from_args(build_parser().parse_args(["photos/", *argv]))


def test_each_argument_lands_in_its_group() -> None:
    options = _options(
        *("--device", "cuda:1", "-j", "2", "-b", "8", "--amp", "bf16", "--chunk-size", "16", "--no-progress"),
        *("--det-threshold", "0.3", "--detector", "f.pt", "--crop-margin", "0.2", "--draw", "boxes/"),
        *("-n", "vit_l16_mim-eu-common", "--size", "224", "--tta"),
        *("--top-k", "3", "--min-prob", "0.4", "--output-dir", "out", "--resume"),
        *("--thresholds", "global", "--unknown-method", "msp", "--unknown-threshold", "0.7"),
        *("--lat", "48.2", "--lon", "16.4", "--export", "md-json"),
    )
    assert options.inputs == ["photos/"] and options.manifest is None and options.shard is None
    assert options.execution == ExecutionOptions(
        device="cuda:1", num_workers=2, batch_size=8, amp="bf16", progress=False, chunk_size=16
    )
    assert isinstance(options.execution, RunOptions)  # the execution options every command shares
    assert options.detection == DetectionOptions(
        detector="f.pt", det_threshold=0.3, crop_margin=0.2, draw="boxes/", exports=("md-json",)
    )
    assert options.model == ModelOptions(name="vit_l16_mim-eu-common", size=[224], tta=True)
    assert options.output == OutputOptions(output_dir=Path("out"), top_k=3, min_prob=0.4, resume=True)
    assert options.decision == DecisionOptions(thresholds="global", unknown_method="msp", unknown_threshold=0.7)
    # md-json is the detection run's export, not birder.geo's
    assert (options.geo.lat, options.geo.lon, options.geo.exports) == (48.2, 16.4, ())


def test_the_defaults_are_the_groups_own() -> None:
    options = _options()
    assert options.detection is None  # no detector: whole photos, no detection group
    assert (options.model, options.output) == (ModelOptions(), OutputOptions())
    assert (options.decision, options.geo) == (DecisionOptions(), GeoOptions())
    # The command's defaults and a library caller's are the same
    assert options.execution == ExecutionOptions()
    assert options == PredictionOptions(inputs=["photos/"])


def test_geo_exports_stay_in_the_geo_group() -> None:
    options = _options("--export", "camtrap-dp", "--export", "coco-ct", "--timezone", "+02:00", "--events")
    assert options.geo.exports == ("camtrap-dp", "coco-ct") and options.geo.events
    assert options.geo.camtrap.timezone == "+02:00"


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--export", "md-json"], "--export md-json"),
        (["--fallback-whole-image"], "--fallback-whole-image"),
        (["--save-crops", "crops/"], "--save-crops"),
        (["--draw", "boxes/"], "--draw"),
    ],
)
def test_detection_options_without_a_detector_are_one_line(argv: list[str], option: str) -> None:
    with pytest.raises(BirderError, match=f"^{re.escape(option)} is about detected boxes: it needs --detector"):
        _options(*argv)


def test_the_options_choose_the_kind_of_run() -> None:
    assert isinstance(predict.run_steps(_options()), predict.ClassificationSteps)
    chosen = predict.run_steps(_options("--detector", "f.pt", "--det-threshold", "0.3"))
    assert isinstance(chosen, detect.DetectionSteps) and chosen.options.det_threshold == 0.3


def test_groups_are_frozen_values() -> None:
    options = _options("--detector", "f.pt")
    assert options.detection is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.detection.det_threshold = 0.9  # type: ignore[misc]
    replaced = dataclasses.replace(options.detection, det_threshold=0.9)
    assert (replaced.det_threshold, options.detection.det_threshold) == (0.9, 0.5)


def test_no_run_module_imports_another_inside_a_function() -> None:
    """The kinds of run import the frame's parts (runs/steps.py) at the top; predict.py imports detect.py at the
    top too, so no import hides a cycle inside a function."""
    sibling = re.compile(r"^\s+(from birder\.runs[\w.]* import|import birder\.runs)", re.MULTILINE)
    for module in ("predict", "detect", "steps", "predict_options"):
        source = (RUNS / f"{module}.py").read_text(encoding="utf-8")
        assert not sibling.findall(source), module
    private = re.compile(r"from birder\.runs\.\w+ import[^)]*?\b_\w+", re.DOTALL)
    assert not private.findall((RUNS / "detect.py").read_text(encoding="utf-8"))
