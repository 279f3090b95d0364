"""Random-number state: saved before scoring and put back after it, also when scoring fails."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["TorchRngState", "forked_torch_rng", "isolated_rng"]


def _numpy_random() -> Any:
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        return None
    return numpy.random


@contextmanager
def isolated_rng() -> Iterator[None]:
    """Python's, NumPy's and torch's global random states (CPU and every CUDA device) restored on
    exit, also when the body raises.

    Drawing batches needs this as well as scoring: every DataLoader iterator draws its base seed
    from the global torch RNG, and dropout draws from it in every loss evaluation. (Lightning's
    `isolate_rng` does not restore the states when the body raises.)
    """
    python = random.getstate()
    numpy = _numpy_random()
    numpy_state = numpy.get_state() if numpy is not None else None
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(python)
        if numpy is not None:
            numpy.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def _cuda_devices(device: torch.device) -> list[torch.device]:
    return [device] if device.type == "cuda" else []


class TorchRngState:
    """torch's global RNG state on the CPU and, for a CUDA `device`, on that device: taken at
    construction, put back by `restore()` (as often as needed, to replay the same draws)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


@contextmanager
def forked_torch_rng(device: torch.device) -> Iterator[None]:
    """torch's RNG (CPU, and `device` if it is a CUDA device) restored on exit, also on an error;
    `torch.random.fork_rng()` for the devices a scorer uses."""
    with torch.random.fork_rng(devices=_cuda_devices(device)):
        yield
