"""``birder-eval`` (and the trainers) on the device option: the package's one resolver, user errors as one line."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_VIT_CONFIG
from test_training_data import make_image_folder, single_thread  # noqa: F401 (autouse)

import birder
from birder.model_registry import registry
from birder.scripts import evaluate as evaluate_script
from birder.scripts import train as train_script
from birder.scripts import train_mim as train_mim_script

ROOT = Path(__file__).resolve().parents[1]
BAD_DEVICES = ["bogus", "cuda:x"] + ([] if torch.cuda.is_available() else ["cuda", "cuda:0"])


@pytest.fixture(scope="module")
def checkpoint_and_images(tmp_path_factory) -> tuple[Path, Path]:
    """An untrained 4-class tiny ViT (its scores do not matter here) and 4 labeled images."""
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    net = registry.net_factory("vit_b16", 4, config={**TINY_VIT_CONFIG, "patch_size": 8}, size=(32, 32))
    info = birder.ModelInfo({f"class_{i}": i for i in range(4)}, None, {"mean": [0.0] * 3, "std": [1.0] * 3})
    return (birder.save_model(net, root / "tiny.pt", info), make_image_folder(root / "val", 1))


def test_device_auto_evaluates(checkpoint_and_images: tuple[Path, Path], capsys) -> None:
    (checkpoint, images) = checkpoint_and_images
    argv = [str(checkpoint), str(images), "--workers", "0", "--no-progress", "--device", "auto"]
    assert evaluate_script.main(argv) == 0
    assert "images: 4" in capsys.readouterr().out


@pytest.mark.parametrize("device", BAD_DEVICES)
def test_bad_device_is_a_one_line_error(device: str, checkpoint_and_images: tuple[Path, Path], capsys) -> None:
    (checkpoint, images) = checkpoint_and_images
    assert evaluate_script.main([str(checkpoint), str(images), "--workers", "0", "--device", device]) == 2
    assert_one_line_error(capsys.readouterr().err, "birder-eval", device)


@pytest.mark.parametrize("device", BAD_DEVICES)
def test_trainers_reject_a_bad_device_in_one_line(device: str, tmp_path: Path, capsys) -> None:
    images = make_image_folder(tmp_path / "photos", 1)
    common = ["--output-dir", str(tmp_path / "run"), "--workers", "0", "--no-progress", "--device", device]
    assert train_script.main(["--data-dir", str(tmp_path), "--network", "vit_b16", *common]) == 2
    assert_one_line_error(capsys.readouterr().err, "birder-train", device)
    assert train_mim_script.main(["--data-dir", str(images), *common]) == 2
    assert_one_line_error(capsys.readouterr().err, "birder-train-mim", device)
    assert not (tmp_path / "run").exists()


def test_console_script_prints_no_traceback(checkpoint_and_images: tuple[Path, Path]) -> None:
    (checkpoint, images) = checkpoint_and_images
    command = [sys.executable, "-m", "birder.scripts.evaluate", str(checkpoint), str(images), "--device", "bogus"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and done.stdout == ""
    assert_one_line_error(done.stderr, "birder-eval", "bogus")


def assert_one_line_error(stderr: str, prog: str, device: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith(f"{prog}: error: ") and f"'{device}'" in lines[0], lines[0]


def test_model_given_the_way_every_command_takes_it(checkpoint_and_images: tuple[Path, Path], capsys) -> None:
    """``--weights FILE DATA`` (as birder-predict and birder-serve take it) and the older ``FILE DATA`` agree."""
    (checkpoint, images) = checkpoint_and_images
    common = [str(images), "--workers", "0", "--no-progress"]
    assert evaluate_script.main(["--weights", str(checkpoint), *common]) == 0
    with_option = capsys.readouterr().out
    assert evaluate_script.main([str(checkpoint), *common]) == 0
    assert capsys.readouterr().out == with_option
    assert "top-1" in with_option

    with pytest.raises(SystemExit) as excinfo:  # a model twice, or none
        evaluate_script.main(["--weights", str(checkpoint), str(checkpoint), *common])
    assert excinfo.value.code == 2
    assert "give the model with -n NAME or --weights FILE" in capsys.readouterr().err
