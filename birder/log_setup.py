"""Logging set-up of the console scripts and trainers."""

import logging
import sys
from typing import TextIO


class CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not the stream it was at set-up: a command
    run in-process more than once (tests, notebooks) never writes to a stream that was replaced and closed."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def configure_logging(level: int | str, fmt: str, datefmt: str | None = None, force: bool = False) -> None:
    """``logging.basicConfig`` with a :class:`CurrentStderrHandler` (``force`` replaces earlier handlers)."""
    logging.basicConfig(level=level, format=fmt, datefmt=datefmt, handlers=[CurrentStderrHandler()], force=force)
