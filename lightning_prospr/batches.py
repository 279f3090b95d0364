"""Batches for scoring: drawn lazily from any iterable, cycled when it runs out.

Every scorer and the callback take their batches through here, so "a list with one batch reuses it
for every step" and "a loader with enough batches gives each step a new one" mean the same thing
everywhere.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

__all__ = ["BatchStream", "cycled", "take_batches"]

T = TypeVar("T")

_EMPTY = "`batches` is empty: give at least one batch (a list with one batch reuses it for every inner step)."


def cycled(items: Sequence[T], count: int) -> list[T]:
    """`count` items: `items` in order, then again from the start, as often as needed.

    Example:
        >>> cycled(["a", "b"], 5)
        ['a', 'b', 'a', 'b', 'a']
    """
    if not items:
        raise ValueError(_EMPTY)
    return [items[i % len(items)] for i in range(count)]


def take_batches(batches: Iterable[Any], count: int) -> list[Any]:
    """Draw `count` batches; when the iterable runs out, cycle over what it gave.

    So `[batch]` means "reuse one batch for every step", and a loader with at least `count`
    batches gives a new batch to every step. An empty iterable raises `ValueError`.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    return cycled(list(itertools.islice(iter(batches), count)), count)


class BatchStream:
    """Hands out batches lazily, for a run that takes them a few at a time (rounds, unrolls).

    When the source runs out, it cycles over the batches it gave, in order.
    """

    def __init__(self, batches: Iterable[Any]) -> None:
        self._source: Iterator[Any] = iter(batches)
        self._seen: list[Any] = []
        self._handed = 0
        self._cycled = 0

    def peek(self) -> Any:
        """The first batch, without handing it out."""
        if not self._seen:
            self._seen.extend(itertools.islice(self._source, 1))
            if not self._seen:
                raise ValueError(_EMPTY)
        return self._seen[0]

    def _next(self) -> Any:
        if self._handed < len(self._seen):
            self._handed += 1
            return self._seen[self._handed - 1]
        for item in itertools.islice(self._source, 1):
            self._seen.append(item)
            self._handed += 1
            return item
        self.peek()  # raises when there never was a batch
        self._cycled += 1
        return self._seen[(self._cycled - 1) % len(self._seen)]

    def take(self, count: int) -> list[Any]:
        """The next `count` batches."""
        return [self._next() for _ in range(count)]
