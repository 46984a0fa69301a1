"""One set of execution options and one error wrapper for every command (issue 23, Deliver 2).

Parsing only: ``--device cuda:1`` is checked when a run starts, so these tests need no GPU.
"""

import argparse
from pathlib import Path

import pytest

from birder.errors import BirderError
from birder.inference.predictor import PredictionError
from birder.run_options import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, RunOptions, run_command, run_options
from birder.scripts import calibrate, evaluate, evaluate_det, index, predict, prior, serve, train, train_det, train_mim
from birder.tools import cli as tools_cli
from birder.training.classification import TrainConfig
from birder.training.cli import config_from_args, run_cli

# Each command's parser and the arguments it needs besides the execution options
COMMANDS = {
    "birder-predict": (predict.build_parser, ["photos/"]),
    "birder-index": (index.build_parser, ["build", "photos/", "-o", "index/"]),
    "birder-calibrate": (calibrate.build_parser, ["--weights", "m.pt", "--val", "val/", "-o", "out.pt"]),
    "birder-eval": (evaluate.build_parser, ["--weights", "m.pt", "test/"]),
    "birder-serve": (serve.build_parser, ["--weights", "m.pt"]),
    "birder-eval-det": (evaluate_det.build_parser, ["--weights", "det.pt", "test.json"]),
    "birder-train": (train.build_parser, ["--output-dir", "runs/"]),
    "birder-train-det": (
        train_det.build_parser,
        ["--train-json", "a.json", "--val-json", "b.json", "--output-dir", "r"],
    ),
    "birder-train-mim": (train_mim.build_parser, ["--output-dir", "runs/"]),
}
FIVE = ("birder-predict", "birder-index", "birder-calibrate", "birder-eval", "birder-serve")


def _parse(command: str, extra: list[str]) -> argparse.Namespace:
    (build_parser, needed) = COMMANDS[command]
    return build_parser().parse_args([*needed, *extra])


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("workers", [["-j", "2"], ["--num-workers", "2"], ["--workers", "2"]])
def test_every_command_reads_device_and_workers_alike(command: str, workers: list[str]) -> None:
    options = run_options(_parse(command, ["--device", "cuda:1", *workers]))
    assert (options.device, options.num_workers) == ("cuda:1", 2)


def test_the_five_commands_agree_on_every_shared_option() -> None:
    shared = ["--device", "cuda:1", "-j", "2", "--no-progress"]
    found = {command: run_options(_parse(command, shared)) for command in FIVE}
    assert {(o.device, o.num_workers, o.progress) for o in found.values()} == {("cuda:1", 2, False)}
    # and without them, the same default device everywhere
    assert {run_options(_parse(command, [])).device for command in COMMANDS} == {"auto"}


def test_the_options_reach_each_run(monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["--device", "cuda:1", "-j", "2", "-b", "3"]
    indexed = []

    def run_index(options, add: bool) -> None:  # what birder-index build would index, and how
        indexed.append(options)
        raise BirderError("stopped before indexing")

    monkeypatch.setattr("birder.search.build.run_index", run_index)
    with pytest.raises(BirderError, match="stopped before indexing"):
        index._build_or_add(_parse("birder-index", argv))
    assert (indexed[0].device, indexed[0].num_workers, indexed[0].batch_size) == ("cuda:1", 2, 3)
    predicted = predict.options_from_args(_parse("birder-predict", argv))
    execution = predicted.execution
    assert (execution.device, execution.num_workers, execution.batch_size) == ("cuda:1", 2, 3)
    calibrated = calibrate.options_from_args(_parse("birder-calibrate", argv))
    assert (calibrated.device, calibrated.workers, calibrated.batch_size) == ("cuda:1", 2, 3)
    scored = evaluate.scoring_options(_parse("birder-eval", argv))
    assert scored == {"batch_size": 3, "workers": 2, "device": "cuda:1", "progress_bar": True}
    settings = serve.settings_from_args(_parse("birder-serve", ["--device", "cuda:1", "-j", "2"]))
    assert settings.decode_workers == 2
    trained = config_from_args(TrainConfig, _parse("birder-train", [*argv, "--no-progress"]))
    assert (trained.device, trained.workers, trained.batch_size, trained.progress_bar) == ("cuda:1", 2, 3, False)


def test_the_defaults_stay_each_commands() -> None:
    assert run_options(_parse("birder-index", [])).num_workers is None  # the run picks min(4, CPU cores)
    assert serve.settings_from_args(_parse("birder-serve", [])).decode_workers >= 2
    assert _parse("birder-eval", []).batch_size == 64 and _parse("birder-eval-det", []).batch_size == 8
    assert config_from_args(TrainConfig, _parse("birder-train", [])).workers == 4


@pytest.mark.parametrize("command", ["birder-predict", "birder-eval", "birder-train", "birder-train-mim"])
def test_amp_has_one_meaning(command: str) -> None:
    assert _parse(command, []).amp is None
    assert _parse(command, ["--amp"]).amp == "auto"  # the older switch of birder-predict
    assert _parse(command, ["--amp", "bf16"]).amp == "bf16"  # the older choice of birder-eval and the trainers
    assert _parse(command, ["--amp", "fp16"]).amp == "fp16"
    with pytest.raises(SystemExit) as exit_info:
        _parse(command, ["--amp", "fp32"])
    assert exit_info.value.code == EXIT_USAGE


def test_amp_choices_resolve_as_before() -> None:
    import torch

    from birder.inference.optimize import autocast_dtype
    from birder.training.amp import amp_dtype

    # as the batch predictor always did for its switch: float16 on GPUs, bfloat16 on the CPU
    assert autocast_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert autocast_dtype("auto", torch.device("cuda", 1)) == torch.float16
    assert amp_dtype("bf16") == torch.bfloat16 and amp_dtype("fp16") == torch.float16 and amp_dtype(None) is None
    with pytest.raises(BirderError, match="unknown AMP dtype 'fp32'"):
        amp_dtype("fp32")


@pytest.mark.parametrize("bad", [["-j", "-1"], ["-j", "two"], ["-b", "0"]])
def test_bad_values_are_refused_while_parsing(bad: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parse("birder-predict", bad)
    assert exit_info.value.code == EXIT_USAGE
    assert "birder-predict: error: argument" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("parse", "argv", "message"),
    [
        (predict.build_parser, ["x.jpg", "--top-k", "0"], "argument --top-k: must be at least 1, got 0"),
        (predict.build_parser, ["x.jpg", "--min-prob", "1.5"], "argument --min-prob: must be between 0 and 1, got 1.5"),
        (index.build_parser, ["query", "-o", "ix", "-k", "0"], "argument -k: must be at least 1, got 0"),
        (index.build_parser, ["cluster", "-o", "ix", "--below-prob", "-0.1"], "must be between 0 and 1, got -0.1"),
        (
            prior.build_parser,
            ["lookup", "p.bpr", "--lat", "1", "--lon", "2", "--top", "0"],
            "must be at least 1, got 0",
        ),
        (
            prior.build_parser,
            ["lookup", "p.bpr", "--lat", "1", "--lon", "2", "--top", "ten"],
            "whole number, got 'ten'",
        ),
    ],
)
def test_counts_and_fractions_are_checked_alike_in_every_command(
    parse, argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    # one argparse type per kind of value (birder.run_options.positive_int, fraction) serves every command
    with pytest.raises(SystemExit) as exit_info:
        parse().parse_args(argv)
    assert exit_info.value.code == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_a_bad_device_is_one_line_when_the_run_starts() -> None:
    from birder.distributed import resolve_device

    with pytest.raises(BirderError, match="unknown device 'gpu'"):
        resolve_device(run_options(_parse("birder-predict", ["--device", "gpu"])).device)


def test_run_options_of_a_parser_without_some_options() -> None:
    args = _parse("birder-serve", [])
    assert run_options(args) == RunOptions(device="auto", num_workers=None, batch_size=None, dtype="auto")


# -- the wrapper ---------------------------------------------------------------------------------------------------


def _raise(exc: BaseException):
    def run() -> None:
        raise exc

    return run


@pytest.mark.parametrize(
    ("exc", "code", "line"),
    [
        (BirderError("no photos in 'x'"), EXIT_USAGE, "prog: error: no photos in 'x'"),
        (PredictionError("the model raised"), EXIT_FAILED, "prog: error: the model raised"),
        (PermissionError(13, "Permission denied"), EXIT_USAGE, "prog: error: [Errno 13] Permission denied"),
        (KeyboardInterrupt(), EXIT_INTERRUPTED, "prog: interrupted"),
    ],
)
def test_the_wrapper_exit_codes(exc: BaseException, code: int, line: str, capsys: pytest.CaptureFixture) -> None:
    assert run_command("prog", _raise(exc)) == code
    assert capsys.readouterr().err == line + "\n"


def test_the_wrapper_passes_a_returned_code_and_says_how_to_resume(capsys: pytest.CaptureFixture) -> None:
    assert run_command("prog", lambda: None) == 0
    assert run_command("prog", lambda: 3) == 3
    assert run_command("prog", _raise(KeyboardInterrupt()), resume_hint=True) == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "prog: interrupted; run the same command with --resume to continue\n"
    assert run_command("prog", _raise(BirderError("quiet")), quiet=True) == EXIT_USAGE
    assert capsys.readouterr().err == ""


def test_every_command_ends_a_user_error_the_same_way(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "missing.pt"
    ends = {
        "birder-prior info": prior.main(["info", str(tmp_path / "missing.bpr")]),
        "python -m birder.tools model-info": tools_cli.main(["model-info", str(missing)]),
        "birder-serve": serve.main(["--weights", str(missing)]),
        "birder-calibrate": calibrate.main(["--weights", str(missing), "--val", str(tmp_path), "-o", "x.pt"]),
        "birder-eval": evaluate.main(["--weights", str(missing), str(tmp_path), "--no-progress"]),
    }
    lines = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert set(ends.values()) == {EXIT_USAGE}
    for prog in ends:
        assert any(line.startswith(f"{prog}: error: ") for line in lines), (prog, lines)


def test_the_trainers_wrapper_is_the_same(capsys: pytest.CaptureFixture) -> None:
    assert run_cli("birder-train", _raise(BirderError("bad --init"))) == EXIT_USAGE
    assert run_cli("birder-train", _raise(KeyboardInterrupt())) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "birder-train: error: bad --init\n" in err
    assert "birder-train: interrupted; run the same command with --resume to continue\n" in err
