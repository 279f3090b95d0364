"""Results as CSV rows, appended one at a time: a grid can be stopped and resumed at any point."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ResultStore"]


@dataclass(frozen=True)
class ResultStore:
    """A CSV file of runs, keyed by the values of `key_columns` (a run already there is not rerun).

    Attributes:
        path: the CSV file (created, header first, on the first append).
        columns: its columns, in order.
        key_columns: the columns that identify a run.
    """

    path: Path
    columns: Sequence[str]
    key_columns: Sequence[str]

    def rows(self) -> list[dict[str, str]]:
        """The rows so far (none when the file does not exist)."""
        if not self.path.is_file():
            return []
        with open(self.path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    def key(self, row: dict[str, Any]) -> tuple[str, ...]:
        """The identity of a run."""
        return tuple(str(row[c]) for c in self.key_columns)

    def done(self) -> set[tuple[str, ...]]:
        """The keys of the runs already stored."""
        return {self.key(r) for r in self.rows()}

    def append(self, row: dict[str, Any]) -> None:
        """Append one row (writing the header first if the file is new), flushed to disk at once."""
        new = not self.path.is_file() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.columns))
            if new:
                writer.writeheader()
            writer.writerow(row)
            f.flush()
            os.fsync(f.fileno())
