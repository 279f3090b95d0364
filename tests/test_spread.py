"""`spread`: each layer's budget spread evenly over its output units (selection.spread_ranks),
against a round-robin written out in plain Python, and through compute_masks, rounds, the guard,
iterative SynFlow, Hugging Face's transposed Conv1D and the callback's validation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from shared import ce_loss

from lightning_prospr import PruningSettings, compute_masks
from lightning_prospr.allocation import layer_budgets
from lightning_prospr.effective import effective_masks
from lightning_prospr.models import LeNet5
from lightning_prospr.selection import select_masks, spread_ranks

LENET5_SIZES = {
    "conv1.weight": 150,
    "conv2.weight": 2400,
    "fc1.weight": 48000,
    "fc2.weight": 10080,
    "fc3.weight": 840,
}


def round_robin(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """The spread selection by its definition: tier t holds every unit's t-th best weight; tiers are
    taken whole in order, and the last one partly, by score (ties: the later position first)."""
    rows = scores.reshape(scores.shape[0], -1).tolist()
    order = [sorted(range(len(r)), key=lambda j, r=r: (r[j], j), reverse=True) for r in rows]
    keep = [[False] * len(r) for r in rows]
    left = budget
    for tier in range(len(rows[0])):
        candidates = [(rows[i][order[i][tier]], i * len(rows[0]) + order[i][tier]) for i in range(len(rows))]
        candidates = [c for c in candidates if c[0] != -math.inf]
        for _, flat in sorted(candidates, reverse=True)[:left]:
            keep[flat // len(rows[0])][flat % len(rows[0])] = True
        left -= min(left, len(candidates))
    return torch.tensor(keep).reshape(scores.shape)


@settings(max_examples=80, deadline=None)
@given(
    units=st.integers(1, 7),
    fan_in=st.integers(1, 9),
    kept=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
    ties=st.booleans(),
)
def test_spread_matches_the_round_robin_and_balances_units(units, fan_in, kept, seed, ties):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(units, fan_in, generator=gen)
    if ties:
        scores = (scores * 3).floor()  # many equal scores
    budget = max(1, round(kept * units * fan_in))
    masks = select_masks(
        {"w": scores}, 1 - budget / scores.numel(), allocation="uniform", spread_dims={"w": 0}
    )
    mask = masks["w"]
    assert int(mask.sum()) == budget
    assert torch.equal(mask, round_robin(scores, budget))
    per_unit = mask.sum(1)
    assert int(per_unit.max() - per_unit.min()) <= 1


def test_a_plain_top_k_empties_units_that_spread_keeps():
    """Scores that favour some output units (as ProsPr's do at extreme sparsity on ResNet-20): the
    plain per-layer top-k leaves units with no weight; spread gives each unit its share."""
    gen = torch.Generator().manual_seed(0)
    scale = torch.logspace(-3, 0, 16)[:, None]
    scores = {"w": torch.rand(16, 50, generator=gen) * scale}
    plain = select_masks(scores, 0.96, allocation="uniform")["w"].sum(1)
    spread = select_masks(scores, 0.96, allocation="uniform", spread_dims={"w": 0})["w"].sum(1)
    assert int((plain == 0).sum()) > 0
    assert spread.tolist() == [2] * 16
    assert int(plain.sum()) == int(spread.sum()) == 32


def test_spread_keeps_barred_and_required_weights_as_they_are():
    scores = torch.tensor([[5.0, 4.0, math.inf, math.inf], [3.0, -math.inf, 1.0, 0.5]])
    keys = spread_ranks(scores, 0)
    assert keys[0, 2] == keys[0, 3] == math.inf and keys[1, 1] == -math.inf
    masks = select_masks({"w": scores}, 0.5, allocation="uniform", spread_dims={"w": 0})
    # Both required weights stay (a plain tier-by-tier pick would give unit 0 only 2), then unit 1's best.
    assert masks["w"].int().tolist() == [[0, 0, 1, 1], [1, 0, 1, 0]]


def test_spread_runs_along_the_given_dimension():
    """Hugging Face's Conv1D stores `(in, out)`: its units are the columns."""
    scores = torch.tensor([[9.0, 1.0], [8.0, 2.0], [7.0, 3.0]])
    masks = select_masks({"w": scores}, 1 - 2 / 6, allocation="uniform", spread_dims={"w": 1})
    assert masks["w"].int().tolist() == [[1, 0], [0, 0], [0, 1]]  # each column its best


def test_spread_nests_inside_existing_masks():
    gen = torch.Generator().manual_seed(1)
    scores = {"w": torch.rand(6, 10, generator=gen)}
    first = select_masks(scores, 0.5, allocation="uniform", spread_dims={"w": 0})
    fresh = {"w": torch.rand(6, 10, generator=gen)}
    second = select_masks(fresh, 0.8, allocation="uniform", within=first, spread_dims={"w": 0})
    assert not bool((second["w"] & ~first["w"]).any())
    assert second["w"].sum(1).tolist() == [2] * 6


@pytest.mark.parametrize("method", ["prospr", "snip", "synflow", "magnitude"])
def test_spread_through_compute_masks_keeps_the_budgets_and_spreads_every_layer(method):
    torch.manual_seed(0)
    model = LeNet5()
    batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(4)]
    rounds = 3 if method in ("prospr", "synflow") else None
    settings_ = PruningSettings(
        0.99, method=method, allocation="balanced", rounds=rounds, guard="off", spread=True
    )
    result = compute_masks(model, ce_loss, batches, settings_)
    budgets = layer_budgets({n: (size,) for n, size in LENET5_SIZES.items()}, 615, "balanced")
    assert {n: int(m.sum()) for n, m in result.masks.items()} == budgets
    for name, mask in result.masks.items():
        per_unit = mask.reshape(mask.shape[0], -1).sum(1)
        assert int(per_unit.max() - per_unit.min()) <= 1, name
    assert "spread over output units" in settings_.describe()


def test_spread_with_the_effective_guard_keeps_the_budget_and_only_live_weights():
    """The effective guard re-selects with spread too. A unit that the next layer does not read is
    dead however many weights it has, so the guard moves them to live units: spread then holds over
    the units that stay alive (here LeNet-5's fc1, whose rows fc2 reads only in part)."""
    torch.manual_seed(0)
    model = LeNet5()
    batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(4)]
    settings_ = PruningSettings(0.99, allocation="erk", guard="effective", spread=True)
    result = compute_masks(model, ce_loss, batches, settings_)
    assert sum(int(m.sum()) for m in result.masks.values()) == 615
    live = effective_masks(model, result.masks, ce_loss, batches[0]).masks
    assert all(torch.equal(live[n], m) for n, m in result.masks.items())
    read_by_fc2 = result.masks["fc2.weight"].any(0)
    fc1 = result.masks["fc1.weight"].sum(1)
    assert bool((fc1[~read_by_fc2] == 0).all())
    assert int(fc1[read_by_fc2].max() - fc1[read_by_fc2].min()) <= 1


def test_settings_refuse_spread_where_it_does_not_apply():
    with pytest.raises(ValueError, match=r"`spread` .* pass allocation='uniform', 'erk' or 'balanced'"):
        PruningSettings(0.9, spread=True)
    with pytest.raises(ValueError, match="`spread`"):
        PruningSettings(0.9, allocation="erk", structured=True, spread=True)
    with pytest.raises(TypeError, match="`spread` must be True or False"):
        PruningSettings(0.9, allocation="erk", spread=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`spread` needs a per-layer allocation"):
        select_masks({"w": torch.rand(3, 3)}, 0.5, spread_dims={"w": 0})
