"""PruningSettings (settings.py) and the method registry (methods.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from shared import ce_loss
from torch import nn

from lightning_prospr import METHODS, PruningSettings, compute_masks
from lightning_prospr.methods import Method


def test_settings_are_frozen_and_say_every_default():
    settings = PruningSettings(0.9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.sparsity = 0.5  # type: ignore[misc]
    assert (
        settings.describe()
        == "ProsPr M=3, lr=0.1, full mode, 1 round, global allocation, guard: connected, floor 1"
    )
    assert (
        PruningSettings(0.9, method="synflow").describe()
        == "SynFlow, 100 rounds, global allocation, guard: connected, floor 1"
    )
    assert PruningSettings(0.9, momentum=0.9, mode="recompute", guard="off").describe() == (
        "ProsPr M=3, lr=0.1, momentum 0.9, recompute mode, 1 round, global allocation, guard: off"
    )
    assert PruningSettings(0.9, parameters=["a.weight"]).parameters == ("a.weight",)


@pytest.mark.parametrize(
    ("kwargs", "batches", "passes"),
    [
        ({}, 4, 4),  # M + 1 batches, M + 1 loss evaluations
        ({"mode": "recompute"}, 4, 7),  # + one rebuilt step per inner step
        ({"unrolls": 2, "rounds": 3}, 24, 24),
        ({"method": "snip", "unrolls": 2}, 2, 2),
        ({"method": "grasp", "grasp_batches": 3}, 3, 6),  # two passes per batch
        ({"method": "synflow"}, 1, 0),  # data-free: one batch for the input shape
        ({"method": "magnitude"}, 1, 0),
    ],
)
def test_what_a_run_draws_and_evaluates(kwargs, batches, passes):
    settings = PruningSettings(0.9, **kwargs)
    assert (settings.batches_per_run, settings.loss_passes) == (batches, passes)


def test_a_new_method_is_one_registry_entry(monkeypatch):
    """Adding a method: one `Method` in METHODS with its scorer; settings, rounds and the guard work."""
    monkeypatch.setitem(
        METHODS,
        "first-layer-first",
        Method(
            "first-layer-first",
            score=lambda run, within: {
                n: torch.full_like(run.model.get_parameter(n), float(-i)) for i, n in enumerate(run.names)
            },
            describe=lambda s: "first layer first",
            iterative=True,
        ),
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    settings = PruningSettings(0.5, method="first-layer-first", rounds=2, guard="off")
    assert settings.describe() == "first layer first, 2 rounds, global allocation, guard: off"
    masks = compute_masks(model, ce_loss, batches, settings).masks
    # 28 of the 56 weights removed: the second layer's 24 (the lower score), then the first 4 of layer 0
    assert int(masks["0.weight"].sum()) == 28 and int(masks["2.weight"].sum()) == 0
    with pytest.raises(ValueError, match=r"`lr` .* does not apply to method='first-layer-first'"):
        PruningSettings(0.5, method="first-layer-first", lr=0.3)
