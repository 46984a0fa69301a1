"""One way in (issue 23, Deliver 1): a model loaded for inference is one object, and every command loads it so."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_vit
from detect_support import DETECTOR_SIZE, DETECTOR_STATS, save_tiny_detector
from PIL import Image
from serve_support import SPECIES, TINY_SIZE, tiny_model_info
from test_dtype_choice import AMX, AVX2_ONLY
from test_predict import make_photo_folder

import birder
from birder.data.transforms import classification_transform
from birder.errors import BirderError, CheckpointError
from birder.inference import model as model_module
from birder.inference import optimize
from birder.inference.detection import detection_transform
from birder.inference.model import AS_LOADED, InferenceModel, load_for_inference
from birder.inference.optimize import DTYPE_ENV
from birder.io.calibration import Calibration
from birder.io.checkpoint import get_size_from_signature, names_by_index


@pytest.fixture
def classifier_file(tmp_path: Path) -> Path:
    net = make_tiny_vit(num_classes=len(SPECIES), size=TINY_SIZE, seed=3)
    net.calibration = Calibration(temperature=2.5, unknown_method="msp", unknown_thresholds={"msp": 0.4})
    return birder.save_model(net, tmp_path / "tiny.safetensors", tiny_model_info())


@pytest.fixture
def photo() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, size=(70, 90, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_a_classifier_file_comes_with_everything_to_run_it(classifier_file: Path, photo: Image.Image) -> None:
    loaded = load_for_inference(weights=classifier_file, device="cpu")
    (net, info) = birder.load_model(classifier_file, inference=True)

    assert loaded.kind == "classifier" and loaded.source == str(classifier_file)
    assert loaded.info == info and loaded.class_names == SPECIES and loaded.size == TINY_SIZE
    assert loaded.device == torch.device("cpu") and loaded.dtype == AS_LOADED
    assert loaded.calibration == Calibration(temperature=2.5, unknown_method="msp", unknown_thresholds={"msp": 0.4})
    assert not loaded.net.training and not any(p.requires_grad for p in loaded.net.parameters())
    assert all(p.dtype == torch.float32 for p in loaded.net.parameters())
    assert torch.equal(loaded.net.state_dict()["classifier.weight"], net.state_dict()["classifier.weight"])
    # The transform the commands built from the model's info, each for itself, before
    old = classification_transform(get_size_from_signature(info.signature), info.rgb_stats)
    assert torch.equal(loaded.transform(photo), old(photo))


def test_a_detector_file_comes_with_its_own_preprocessing(tmp_path: Path, photo: Image.Image) -> None:
    path = save_tiny_detector(tmp_path / "det.pt", classes=("bird", "mammal"))
    loaded = load_for_inference(weights=path, detector=True, device="cpu")

    assert loaded.kind == "detector" and loaded.class_names == ["bird", "mammal"]
    assert loaded.size == DETECTOR_SIZE and loaded.calibration is None and loaded.dtype == AS_LOADED
    assert not loaded.net.training
    assert torch.equal(loaded.transform(photo), detection_transform(DETECTOR_SIZE, DETECTOR_STATS)(photo))
    assert loaded.with_dtype("bfloat16") is loaded  # a detector runs in float32: box operations


def test_wrong_kinds_and_missing_files_are_one_line(tmp_path: Path, classifier_file: Path) -> None:
    detector = save_tiny_detector(tmp_path / "det.pt")
    with pytest.raises(CheckpointError, match="a detector file"):
        load_for_inference(weights=detector, device="cpu")
    with pytest.raises(CheckpointError, match="not a detector file"):
        load_for_inference(weights=classifier_file, detector=True, device="cpu")
    with pytest.raises(BirderError, match="--detector FILE"):
        load_for_inference("vit_l16_mim-eu-common", detector=True)
    with pytest.raises(BirderError, match="unknown device 'gpu'"):
        load_for_inference(weights=classifier_file, device="gpu")


@pytest.mark.parametrize(("flags", "expected"), [(AMX, "bfloat16"), (AVX2_ONLY, "float32")])
def test_the_dtype_choice_travels_with_the_model(
    classifier_file: Path, monkeypatch: pytest.MonkeyPatch, flags: set[str], expected: str
) -> None:
    monkeypatch.delenv(DTYPE_ENV, raising=False)
    monkeypatch.setattr(optimize, "cpu_flags", lambda: frozenset(flags))
    loaded = load_for_inference(weights=classifier_file, device="cpu", dtype="auto")
    assert loaded.dtype.dtype == expected and loaded.dtype.reason.startswith("auto:")
    assert {p.dtype for p in loaded.net.parameters()} == {getattr(torch, expected)}
    # as choose_dtype decides for other machines' flags, without touching this one's
    unloaded = load_for_inference(weights=classifier_file, device="cpu")
    assert unloaded.with_dtype("auto", flags=AVX2_ONLY).dtype.dtype == "float32"
    assert unloaded.with_dtype("auto", flags=AMX).dtype.dtype == "bfloat16"


def test_the_class_list_helper() -> None:
    assert names_by_index({"wren": 2, "robin": 0, "tit": 1}) == ["robin", "tit", "wren"]
    assert names_by_index(tiny_model_info().class_to_idx) == SPECIES


# -- every command goes through it ---------------------------------------------------------------------------------

SPY_MESSAGE = "loaded through load_for_inference"


class _Spy:
    def __init__(self) -> None:
        self.calls: list[tuple[tuple, dict]] = []

    def __call__(self, *args, **kwargs) -> InferenceModel:
        self.calls.append((args, kwargs))
        raise BirderError(SPY_MESSAGE)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> _Spy:
    spy = _Spy()
    # Modules that import it by name (patched first: a module imported for the first time by its patch would bind
    # the spy, if its source were patched already, and keep it after the test), then the lazy imports that read it
    # from its module
    for module in ("runs.steps", "runs.calibrate", "search.build", "training.evaluation", "training.distillation"):
        monkeypatch.setattr(f"birder.{module}.load_for_inference", spy)
    monkeypatch.setattr(model_module, "load_for_inference", spy)
    return spy


def test_every_command_loads_through_it(
    spy: _Spy, classifier_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from birder.scripts import calibrate, evaluate, index, predict, serve

    def served(*args, **kwargs) -> None:  # a server that loaded otherwise ends here instead of serving
        raise BirderError("served")

    monkeypatch.setattr("uvicorn.run", served)
    photos = make_photo_folder(tmp_path / "photos")
    weights = ["--weights", str(classifier_file)]
    quiet = ["-j", "0", "--no-progress", "--device", "cpu"]
    codes = {
        "birder-predict": predict.main([*weights, str(photos), *quiet, "--output-dir", str(tmp_path / "out")]),
        "birder-index": index.main(["build", str(photos), *weights, "-o", str(tmp_path / "index"), *quiet]),
        "birder-calibrate": calibrate.main([*weights, "--val", str(photos), "-o", str(tmp_path / "c.pt"), *quiet]),
        "birder-eval": evaluate.main([*weights, str(photos), *quiet]),
        "birder-serve": serve.main([*weights, "--device", "cpu"]),
    }
    assert codes == dict.fromkeys(codes, 2)
    assert capsys.readouterr().err.count(SPY_MESSAGE) == len(codes)
    assert all(kwargs.get("device") in ("cpu", torch.device("cpu")) for (_, kwargs) in spy.calls)
    assert [args[1] for (args, _) in spy.calls] == [str(classifier_file)] * len(codes)


def test_the_detector_and_the_teacher_load_through_it(spy: _Spy, tmp_path: Path) -> None:
    from birder.runs.detect import load_detection_step
    from birder.runs.predict_options import DetectionOptions
    from birder.training.distillation import DistillSettings, load_teacher

    detector = tmp_path / "det.pt"
    with pytest.raises(BirderError, match=SPY_MESSAGE):
        load_detection_step(DetectionOptions(detector=str(detector)), torch.device("cpu"))
    teacher = tmp_path / "teacher.pt"
    with pytest.raises(BirderError, match=SPY_MESSAGE):
        info = tiny_model_info()
        settings = DistillSettings(teacher=str(teacher))
        load_teacher(settings, class_to_idx=info.class_to_idx, size=TINY_SIZE, rgb_stats=info.rgb_stats, device="cpu")
    assert [str(kwargs["weights"]) for (_, kwargs) in spy.calls] == [str(detector), str(teacher)]
    assert spy.calls[0][1]["detector"] is True
