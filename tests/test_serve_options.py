"""birder-serve's limits: each a count or an amount above 0, refused as it is parsed (one line, exit code 2) like
every command's counts (birder.run_options), and each reaching the service's settings."""

import argparse

import pytest

from birder.run_options import EXIT_USAGE, positive_number
from birder.scripts import serve

MIB = 2**20
# Every limit of the service: the option, its default and the ServeSettings field it sets (in that field's unit)
LIMITS = {
    "--max-batch-size": (32, "max_batch_size", 1),
    "--max-upload-mb": (20.0, "max_upload_bytes", MIB),
    "--max-inflight-mb": (256.0, "max_inflight_bytes", MIB),
    "--max-pixels": (50_000_000, "max_pixels", 1),
    "--max-explanations": (8, "max_explanations", 1),
    "--timeout": (30.0, "timeout_s", 1),
    "--top-k": (5, "default_top_k", 1),
}
FLOAT_LIMITS = ("--max-upload-mb", "--max-inflight-mb", "--timeout")


def _refusal(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        serve.main(["--weights", "m.pt", *argv])
    assert exit_info.value.code == EXIT_USAGE
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "Traceback" not in error
    return error


@pytest.mark.parametrize("option", LIMITS)
@pytest.mark.parametrize("value", ["0", "-3"])
def test_a_limit_of_zero_or_less_is_refused_naming_the_option(
    option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    error = _refusal([option, value], capsys)
    assert f"argument {option}:" in error and f"got {value}" in error


@pytest.mark.parametrize("option", FLOAT_LIMITS)
def test_a_limit_that_is_not_a_number_is_refused(option: str, capsys: pytest.CaptureFixture[str]) -> None:
    # NaN compares false with everything: a "<= 0" check let it through to the server's settings
    assert f"argument {option}: must be above 0, got nan" in _refusal([option, "nan"], capsys)
    assert f"argument {option}: must be a number, got 'lots'" in _refusal([option, "lots"], capsys)


def test_every_limit_keeps_its_default_and_reaches_the_settings() -> None:
    parser = serve.build_parser()
    help_text = " ".join(parser.format_help().split())
    defaults = parser.parse_args(["--weights", "m.pt"])
    for option, (default, field, unit) in LIMITS.items():
        assert option in help_text
        assert getattr(defaults, option[2:].replace("-", "_")) == default
        # 2 or 2.0, whichever the option takes; uploads and in-flight bytes at least as large as each other
        given = parser.parse_args(["--weights", "m.pt", "--max-upload-mb", "2", "--max-inflight-mb", "2", option, "2"])
        assert getattr(serve.settings_from_args(given), field) == 2 * unit


def test_positive_number_reads_sizes_and_times() -> None:
    assert positive_number("0.5") == 0.5
    assert positive_number("1e3") == 1000.0
    for bad in ("0", "-1", "nan", "-inf"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be above 0"):
            positive_number(bad)
