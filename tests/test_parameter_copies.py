"""Scoring holds at most one extra copy of the parameters per unrolled step.

Measured, not inferred: the live CPU tensors during ``prospr_scores`` are summed from
``torch.profiler``'s allocation and free events (the benchmark's ``_live_peak_mib``, itself tested
against a known allocation pattern in ``test_benchmark_speed.py``). The model is an MLP whose
parameters (6 MiB) dwarf its activations (batch 8: 32 KiB per layer), so each extra inner step can
only add parameter-sized tensors: the iterate ``w_{t+1}`` and whatever else the engine keeps. An
engine that kept, say, each step's gradient as well would add two copies per step and fail.
"""

from __future__ import annotations

import pytest
import torch
from benchmark_scripts import load_script
from shared import ce_loss
from torch import nn

from lightning_prospr import prospr_scores, snip_scores

F = nn.functional


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"momentum": 0.9, "weight_decay": 1e-4},
        {"mode": "recompute"},
        {"mode": "recompute", "momentum": 0.9},
        {"mode": "first_order"},
    ],
    ids=["full", "full-momentum", "recompute", "recompute-momentum", "first-order"],
)
def test_each_inner_step_adds_at_most_one_copy_of_the_parameters(options: dict[str, object]) -> None:
    live_peak_mib = load_script("speed")._live_peak_mib
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(512, 1024), nn.BatchNorm1d(1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU()
    )
    model.append(nn.Linear(1024, 10))
    copy_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    batch = (torch.randn(8, 512), torch.randint(0, 10, (8,)))

    def score(m: int) -> object:  # M = 0 is SNIP, the same engine with no inner step
        if m == 0:
            return snip_scores(model, ce_loss, [batch])
        return prospr_scores(model, ce_loss, [batch], steps=m, **options)

    peaks = [live_peak_mib(lambda m=m: score(m)) / copy_mib for m in range(6)]

    # The profiler sees the scores themselves (one weight-sized tensor each): the measurement is live.
    assert peaks[0] > 0.5, peaks
    # From M = 2 on (M = 1 adds the fixed cost of having any inner step), one step more costs at
    # most one copy of the parameters.
    for m in range(2, 5):
        assert peaks[m + 1] - peaks[m] <= 1.05, (m, peaks)
