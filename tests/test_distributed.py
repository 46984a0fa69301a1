"""``birder.distributed``: devices, and a real two-process gloo group on the CPU for the "rank 0 first" helpers.

The processes are started by hand with ``torchrun``'s environment variables, not by torchrun itself: torchrun
stops every worker as soon as one exits, which would hide a rank left waiting for one that failed.
"""

import os
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from birder.distributed import resolve_device
from birder.errors import BirderError

ROOT = Path(__file__).resolve().parents[1]
# Long enough to start two Python processes with torch on a loaded 2-core machine; far below the hang it guards
# against (a collective's timeout: 30 minutes for gloo, hours for birder-predict).
RANK_TIMEOUT_S = 45
CAUSE = "bad-input-seen-by-rank-0"

# Rank 0's function raises a ValueError (not a BirderError: a bug, an unexpected file), under a command line like
# the package's (a BirderError as one line, exit 2; anything else with a traceback). Rank 0 then lingers until the
# test creates RELEASE_FILE, as a process stuck in NCCL's tear-down would: rank 1 must end without waiting for it.
WORKER = textwrap.dedent(
    """
    import os, pathlib, sys, time
    from birder.distributed import compute_on_main, distributed_session, main_first
    from birder.errors import BirderError

    def work():
        if os.environ["RANK"] == "0":
            raise ValueError(os.environ["CAUSE"])
        return "done"

    def linger():
        release = pathlib.Path(os.environ["RELEASE_FILE"])
        deadline = time.monotonic() + float(os.environ["LINGER_S"])
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    helper = {"main_first": main_first, "compute_on_main": compute_on_main}[sys.argv[1]]
    try:
        with distributed_session("cpu") as info:
            try:
                helper(info, work)
            except ValueError:
                linger()
                raise
    except BirderError as err:
        print(f"worker: error: {err}", file=sys.stderr)
        sys.exit(2)
    """
)


@dataclass
class RankRun:
    returncode: int | None  # None: still running when the test gave up on it
    seconds: float
    output: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_two_ranks(code: str, args: list[str], extra_env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """``python -c code args`` as ranks 0 and 1 of a gloo group (output: stdout and stderr together)."""
    base_env = {
        **os.environ,
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        **(extra_env or {}),
    }
    return [
        subprocess.Popen(
            [sys.executable, "-c", code, *args],
            env={**base_env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]


def finish(process: subprocess.Popen, started: float) -> RankRun:
    """Wait for ``process`` until RANK_TIMEOUT_S after ``started``, then kill it."""
    try:
        (output, _) = process.communicate(timeout=max(0.1, started + RANK_TIMEOUT_S - time.monotonic()))
        return RankRun(process.returncode, time.monotonic() - started, output)
    except subprocess.TimeoutExpired:
        process.kill()
        (output, _) = process.communicate()
        return RankRun(None, time.monotonic() - started, output)


@pytest.mark.parametrize("helper", ["main_first", "compute_on_main"])
def test_an_error_on_rank_zero_ends_every_rank_and_is_reported_once(helper: str, tmp_path: Path) -> None:
    release = tmp_path / "release"
    extra_env = {"CAUSE": CAUSE, "RELEASE_FILE": str(release), "LINGER_S": str(RANK_TIMEOUT_S)}
    started = time.monotonic()
    (process0, process1) = start_two_ranks(WORKER, [helper], extra_env)
    rank1 = finish(process1, started)  # while rank 0 lingers
    release.touch()
    rank0 = finish(process0, started)

    assert rank1.returncode == 2, rank1  # ended on its own, with the one-line error, not killed at the timeout
    assert "rank 0 failed" in rank1.output and "Traceback" not in rank1.output, rank1.output
    assert CAUSE not in rank1.output, rank1.output
    assert rank0.returncode not in (0, None), rank0
    assert rank0.output.count(f"ValueError: {CAUSE}") == 1, rank0.output  # rank 0's traceback: the cause, once


def test_resolve_device_names_and_errors() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in ("cuda", "mps", "cpu")
    with pytest.raises(BirderError, match="unknown device 'bogus'"):
        resolve_device("bogus")
    with pytest.raises(BirderError, match="device 'cuda:x': expected cuda:N"):
        resolve_device("cuda:x")  # torch's own error for it is a traceback
    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:1"):
            with pytest.raises(BirderError, match="no CUDA GPU"):
                resolve_device(name)
