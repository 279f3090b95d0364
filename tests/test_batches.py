"""Batch drawing (batches.py): lazily, cycled when the source runs out."""

from __future__ import annotations

import pytest

from lightning_prospr.batches import BatchStream, cycled, take_batches


def test_take_batches_cycles_what_it_got():
    assert take_batches(iter([1, 2]), 5) == [1, 2, 1, 2, 1]
    assert take_batches(range(10), 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="`batches` is empty"):
        take_batches([], 2)
    assert cycled(["a"], 3) == ["a", "a", "a"]


def test_stream_draws_lazily_and_cycles_in_order():
    drawn = []

    def source():
        for i in range(3):
            drawn.append(i)
            yield i

    stream = BatchStream(source())
    assert stream.peek() == 0 and drawn == [0]
    assert stream.take(2) == [0, 1] and drawn == [0, 1]
    assert stream.take(4) == [2, 0, 1, 2]
    with pytest.raises(ValueError, match="`batches` is empty"):
        BatchStream([]).peek()
