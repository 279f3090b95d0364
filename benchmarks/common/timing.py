"""Seconds of one call: wall clock and the process's CPU time (all threads), a CUDA device synchronized.

The benchmarks report CPU time as well as wall time: on a shared machine the wall clock of one call
varies with the load, the process's CPU time much less. `torch.utils.benchmark.Timer` was considered
and does not fit: it measures wall time only, in its own thread setting, while the speed figures are
ratios of process CPU time under the thread count the run fixes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["sync", "timed"]


def sync(device: Any) -> None:
    """Wait for `device` (a CUDA device) to finish; nothing for the CPU or `None`."""
    if device is not None and device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: Any = None) -> tuple[float, float]:
    """`(wall seconds, CPU seconds of this process, all threads)` of one call of `fn`."""
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu_start
