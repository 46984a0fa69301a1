"""Training-state checkpoints (``<...>_states.pt``) for exact resume.

A state file holds everything a run needs to continue as if never stopped: the raw model weights (and their EMA),
the optimizer, scheduler and gradient-scaler states, the epoch and optimizer-step counters, the position within
the epoch with its running loss, and every rank's random-number-generator states. Files are written atomically,
so a crash while saving leaves the previous file intact.

An ``--fsdp`` run's file keeps all but the weights, EMA weights and optimizer state, which stay sharded in a
``torch.distributed.checkpoint`` folder beside it that the file names (``sharded``; :mod:`birder.training.fsdp`).
"""

import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from birder.errors import CheckpointError, one_line
from birder.io.atomic import atomic_write_path

logger = logging.getLogger(__name__)

STATE_FORMAT = "birder-training-state"
STATE_VERSION = 1
STATES_SUFFIX = "_states.pt"


def capture_rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch CPU and CUDA generator states, as plain values and tensors."""
    (np_kind, np_keys, np_pos, np_has_gauss, np_gauss) = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        # The NumPy key array is stored as a tensor: checkpoints are read with weights_only=True.
        "numpy": (np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()

    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    (np_kind, np_keys, np_pos, np_has_gauss, np_gauss) = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    # random.setstate wants tuples all the way down; a round trip through some serializers gives lists.
    return tuple(_as_tuples(item) for item in value) if isinstance(value, list | tuple) else value


def save_training_state(path: str | Path, state: Mapping[str, Any]) -> Path:
    path = Path(path)
    with atomic_write_path(path) as tmp_path:
        torch.save({"format": STATE_FORMAT, "version": STATE_VERSION, **state}, tmp_path)

    return path


def load_training_state(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """Read a state file (tensors on the CPU); any problem is a one-line :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such training-state file")

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch.load raises many types for damaged files; all mean the same to the user
        raise CheckpointError(f"{path}: truncated or not a training-state file ({one_line(err)})") from None

    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a birder training-state file (resume from a '*{STATES_SUFFIX}' file)")

    return state


def find_latest_state(output_dir: str | Path, stem: str) -> Path | None:
    """The most advanced ``<stem>_*_states.pt`` in ``output_dir`` (by optimizer step, completed epochs first)."""
    candidates = []
    for path in Path(output_dir).glob(f"{stem}_*{STATES_SUFFIX}"):
        try:
            state = load_training_state(path, mmap=True)  # mmap: only the counters are read, not the tensors
        except CheckpointError as err:
            logger.warning("ignoring %s", err)
            continue
        candidates.append(((state["global_step"], state["epoch_complete"], state["epoch"]), path))

    return max(candidates)[1] if candidates else None
