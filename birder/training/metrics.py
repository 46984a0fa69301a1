"""Metrics files: small CSV tables (one row per epoch, or per epoch and class), rewritten atomically.

Rewriting the whole file on every append keeps it valid after a crash, and lets a resumed run drop the rows of
epochs it is about to redo, so its file ends up identical to an uninterrupted run's.
"""

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from birder.io.atomic import atomic_write_path


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"

    return str(value)


class MetricsCSV:
    def __init__(self, path: str | Path, fieldnames: Sequence[str]) -> None:
        self.path = Path(path)
        self.fieldnames = list(fieldnames)

    def rows(self) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []

        with open(self.path, newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))

    def append(self, *rows: Mapping[str, Any]) -> None:
        self._write(self.rows() + [{key: format_value(row[key]) for key in self.fieldnames} for row in rows])

    def truncate_after(self, epoch: int) -> None:
        """Keep only the rows of epochs up to ``epoch`` (0: start an empty file)."""
        self._write([row for row in self.rows() if int(row["epoch"]) <= epoch])

    def _write(self, rows: list[Mapping[str, str]]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.fieldnames, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        with atomic_write_path(self.path) as tmp_path:
            tmp_path.write_text(buffer.getvalue(), encoding="utf-8")
