"""Scoring gives the CPU memory it freed back to the operating system (glibc's heap keeps it)."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
from typing import Any

import pytest
import torch
from torch import nn

import lightning_prospr.baselines as baselines_module
import lightning_prospr.scores as scores_module
from lightning_prospr import prospr_scores
from lightning_prospr.baselines import grasp_scores

#: Run in a fresh interpreter, so that the heap starts from a known state.
_FRAGMENT_AND_RELEASE = """
import os, torch
from lightning_prospr.cpu_memory import release_freed_memory

def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

# Freeing an mmapped 8 MiB block raises glibc's mmap threshold, so the 4 MiB blocks below come from
# the heap; freeing them (all but the last, which pins the heap's top) leaves them in the heap.
first = torch.ones(2 * 2**20)
del first
blocks = [torch.ones(2**20) for _ in range(50)]
last = blocks.pop()
before = resident_mib()
blocks.clear()
kept = resident_mib()
released = release_freed_memory()
print(released, before, kept, resident_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.parametrize("allocator", [None, "tcmalloc_minimal"], ids=["glibc", "tcmalloc"])
def test_freed_heap_blocks_are_returned_to_the_system(allocator: str | None) -> None:
    """glibc's malloc and tcmalloc keep 196 MiB of freed 4 MiB blocks until they are told to return them."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if allocator is not None:
        library = ctypes.util.find_library(allocator)
        if library is None:
            pytest.skip(f"lib{allocator} is not installed")
        env["LD_PRELOAD"] = library
    proc = subprocess.run(
        [sys.executable, "-c", _FRAGMENT_AND_RELEASE], capture_output=True, text=True, env=env, check=True
    )
    released, before, kept, after = proc.stdout.split()
    if released != "True":
        pytest.skip("no known allocator to release memory from (not glibc)")
    assert float(kept) > float(before) - 20  # free() alone did not give the 196 MiB back...
    assert float(after) < float(kept) - 150  # ...malloc_trim did


@pytest.mark.parametrize(
    ("module", "scorer"),
    [(scores_module, lambda *a: prospr_scores(*a, steps=2)), (baselines_module, grasp_scores)],
    ids=["prospr", "grasp"],
)
def test_second_order_scoring_on_cpu_releases_freed_memory(
    monkeypatch: pytest.MonkeyPatch, module: Any, scorer: Any
) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(module, "release_freed_memory", lambda: calls.append(True) or True)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
    scorer(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), [batch])
    assert calls == [True]
