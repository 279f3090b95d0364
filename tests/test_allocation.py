"""Layer-wise allocation (allocation.py, selection.select_masks) against hand-computed budgets, and
through compute_masks with every method, rounds, the guard and structured pruning."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from shared import ce_loss
from torch import nn

from lightning_prospr import PruningSettings, compute_masks
from lightning_prospr.allocation import erk_densities, layer_budgets
from lightning_prospr.guard import guard_masks
from lightning_prospr.linearized import path_gradients
from lightning_prospr.models import LeNet5
from lightning_prospr.selection import pruned_count, select_masks

LENET5 = {
    "conv1.weight": (6, 1, 5, 5),
    "conv2.weight": (16, 6, 5, 5),
    "fc1.weight": (120, 400),
    "fc2.weight": (84, 120),
    "fc3.weight": (10, 84),
}


def test_erk_on_lenet5_at_99_percent_by_hand():
    """LeNet-5 has 61,470 weights; 99 % sparsity keeps 615. ERK's factor times the size is the sum of
    each shape's dimensions: 6+1+5+5 = 17, 16+6+5+5 = 32, 520, 204, 94; 867 in all. So
    eps = 615 / 867 and the shares are 12.06, 22.70, 368.86, 144.71, 66.68 (no layer is full).
    Floors 12 + 22 + 368 + 144 + 66 = 612; the 3 left go to the largest remainders: fc1 (.86),
    conv2 (.70), fc2 (.71) -> fc2 and fc1 and conv2."""
    total = sum(math.prod(s) for s in LENET5.values())
    assert total == 61_470
    kept = total - pruned_count(0.99, total)
    assert kept == 615
    assert layer_budgets(LENET5, kept, "erk") == {
        "conv1.weight": 12,
        "conv2.weight": 23,
        "fc1.weight": 369,
        "fc2.weight": 145,
        "fc3.weight": 66,
    }


def test_a_layer_denser_than_one_is_filled_and_the_rest_rescaled():
    """a: factor 4/4 = 1 (4 weights); b: 200/10,000 (10,000 weights). Keeping 404: eps = 404 / (4 +
    200) = 1.98 would give a 7.9 of its 4 weights, so a is kept whole and b gets the other 400."""
    shapes = {"a": (2, 2), "b": (100, 100)}
    assert layer_budgets(shapes, 404, "erk") == {"a": 4, "b": 400}
    assert erk_densities(shapes, 404 / 10_004) == pytest.approx({"a": 1.0, "b": 0.04})


def test_uniform_keeps_the_same_density_everywhere():
    assert layer_budgets({"a": (10, 10), "b": (30, 10), "c": (5,)}, 41, "uniform") == {
        "a": 10,
        "b": 30,
        "c": 1,
    }
    # with capacity: layer a has only 4 weights left, the others share its remainder
    assert layer_budgets({"a": (10, 10), "b": (10, 10)}, 20, "uniform", capacity={"a": 4, "b": 100}) == {
        "a": 4,
        "b": 16,
    }


def test_balanced_on_lenet5_at_99_8_percent_by_hand():
    """99.8 % of LeNet-5's 61,470 weights keeps 123. Equal counts would be 24.6 each, but conv1 has
    only 150 weights, so nothing is full: 24.6 x 5, floors 24 each (120), and the 3 left over go
    to the largest remainders, all .6 here, so to the first three layers."""
    total = sum(math.prod(s) for s in LENET5.values())
    kept = total - pruned_count(0.998, total)
    assert kept == 123
    assert layer_budgets(LENET5, kept, "balanced") == {
        "conv1.weight": 25,
        "conv2.weight": 25,
        "fc1.weight": 25,
        "fc2.weight": 24,
        "fc3.weight": 24,
    }
    # 5 % keeps 3,074: 614.8 each would overfill conv1 (150), which is kept whole; the other four
    # share 2,924, 731 each
    assert layer_budgets(LENET5, 3074, "balanced") == {
        "conv1.weight": 150,
        "conv2.weight": 731,
        "fc1.weight": 731,
        "fc2.weight": 731,
        "fc3.weight": 731,
    }


def test_balanced_allocation_through_compute_masks_with_rounds_and_the_guard():
    """ProsPr with rounds and the effective guard under the balanced allocation (the benchmark's
    LeNet-5 setting at 99.8 %): every layer ends with the hand-computed count (the guard pays for
    what it adds within the same layer), and some input-to-output path survives."""
    torch.manual_seed(0)
    model = LeNet5()
    batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(4)]
    settings_ = PruningSettings(0.998, allocation="balanced", rounds=3, guard="effective")
    result = compute_masks(model, ce_loss, batches, settings_)
    assert {n: int(m.sum()) for n, m in result.masks.items()} == {
        "conv1.weight": 25,
        "conv2.weight": 25,
        "fc1.weight": 25,
        "fc2.weight": 24,
        "fc3.weight": 24,
    }
    assert path_gradients(model, result.masks, ce_loss, batches[0]).total > 0


@settings(max_examples=60, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(1, 12), min_size=1, max_size=4), min_size=1, max_size=6),
    fraction=st.floats(0.0, 1.0),
    allocation=st.sampled_from(["erk", "uniform", "balanced"]),
)
def test_budgets_are_exact_and_within_capacity(shapes, fraction, allocation):
    named = {f"l{i}": tuple(s) for i, s in enumerate(shapes)}
    total = sum(math.prod(s) for s in named.values())
    kept = round(fraction * total)
    budgets = layer_budgets(named, kept, allocation)
    assert sum(budgets.values()) == kept
    assert all(0 <= budgets[n] <= math.prod(s) for n, s in named.items())


def test_select_masks_keeps_each_layers_best_within_its_budget():
    gen = torch.Generator().manual_seed(0)
    scores = {
        n: torch.rand(s, generator=gen) * (10.0 if n.startswith("fc1") else 1.0) for n, s in LENET5.items()
    }
    masks = select_masks(scores, 0.99, allocation="erk")
    expected = layer_budgets(LENET5, 615, "erk")
    assert {n: int(m.sum()) for n, m in masks.items()} == expected
    for n, m in masks.items():  # within a layer, the kept scores are the largest
        if 0 < int(m.sum()) < m.numel():
            assert scores[n][m].min() > scores[n][~m].max()
    # global top-k would have given fc1 (scores x 10) nearly everything
    plain = select_masks(scores, 0.99)
    assert int(plain["fc1.weight"].sum()) > 600


def test_select_masks_nests_inside_existing_masks():
    gen = torch.Generator().manual_seed(1)
    scores = {n: torch.rand(s, generator=gen) for n, s in LENET5.items()}
    first = select_masks(scores, 0.9, allocation="erk")
    fresh = {n: torch.rand(s, generator=gen) for n, s in LENET5.items()}
    second = select_masks(fresh, 0.99, allocation="erk", within=first)
    assert all(not bool((second[n] & ~first[n]).any()) for n in LENET5)
    assert sum(int(m.sum()) for m in second.values()) == 615
    with pytest.raises(ValueError, match="already pruned"):
        select_masks(fresh, 0.5, allocation="erk", within=first)
    with pytest.raises(ValueError, match="`allocation` must be one of"):
        select_masks(fresh, 0.5, allocation="erdos")


@pytest.mark.parametrize("method", ["prospr", "snip", "grasp", "synflow", "magnitude", "random"])
def test_every_method_keeps_the_erk_budget(method):
    torch.manual_seed(0)
    model = LeNet5()
    batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(4)]
    rounds = 5 if method == "synflow" else None
    result = compute_masks(
        model,
        ce_loss,
        batches,
        PruningSettings(0.99, method=method, allocation="erk", guard="off", rounds=rounds),
    )
    assert {n: int(m.sum()) for n, m in result.masks.items()} == layer_budgets(LENET5, 615, "erk")


def test_rounds_with_uniform_allocation_end_at_the_exact_per_layer_budget():
    torch.manual_seed(0)
    model = LeNet5()
    batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(4)]
    result = compute_masks(
        model, ce_loss, batches, PruningSettings(0.98, steps=1, allocation="uniform", rounds=3, guard="off")
    )
    counts = {n: int(m.sum()) for n, m in result.masks.items()}
    assert counts == layer_budgets(LENET5, 61_470 - pruned_count(0.98, 61_470), "uniform")
    assert all(abs(counts[n] / math.prod(s) - 0.02) < 1.0 / math.prod(s) for n, s in LENET5.items())


def test_structured_erk_allocates_channels():
    """Structured: each layer keeps channels by ERK on its weight shape, with the channels as units."""
    torch.manual_seed(0)
    model = LeNet5()
    batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(4)]
    result = compute_masks(
        model, ce_loss, batches, PruningSettings(0.75, method="snip", structured=True, allocation="erk")
    )
    shapes = {n: s for n, s in LENET5.items() if n != "fc3.weight"}  # the classifier keeps its outputs
    channels = {n: s[0] for n, s in shapes.items()}
    kept = sum(channels.values()) - pruned_count(0.75, sum(channels.values()))
    expected = layer_budgets(shapes, kept, "erk", units=channels)
    assert {n: int(m.sum()) for n, m in result.channel_masks.items()} == expected


def test_guard_pays_for_its_additions_in_the_same_layer():
    """A chain where the per-layer top-k keeps a first-layer weight that feeds no kept second-layer
    weight: the guard connects it and, with per_layer, takes the cost out of the same layers."""
    net = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 4, bias=False), nn.ReLU(),
                        nn.Linear(4, 2, bias=False))  # fmt: skip
    batch = (torch.randn(3, 4), torch.tensor([0, 1, 0]))
    second = torch.zeros(4, 4)
    second[:, 0] = 1.0  # best: column 0, which reads the dead unit 0
    scores = {
        "0.weight": torch.arange(16.0).reshape(4, 4),  # best: row 3 (only unit 3 gets input)
        "2.weight": second,
        "4.weight": torch.arange(8.0).reshape(2, 4),
    }
    masks = select_masks(scores, 0.75, allocation="uniform")
    before = {n: int(m.sum()) for n, m in masks.items()}
    assert path_gradients(net, masks, ce_loss, batch).total == 0  # disconnected
    guarded, report = guard_masks(scores, masks, model=net, loss_fn=ce_loss, batch=batch, per_layer=True)
    assert report.changed and report.connected
    assert {n: int(m.sum()) for n, m in guarded.items()} == before
    assert path_gradients(net, guarded, ce_loss, batch).total > 0


def test_settings_validate_allocation():
    with pytest.raises(ValueError, match="must be one of 'global', 'uniform', 'erk', 'balanced'"):
        PruningSettings(0.9, allocation="ERK")
    assert "erk allocation" in PruningSettings(0.9, allocation="erk").describe()
