"""Global top-k selection: exact counts, determinism, tie-breaking, refusal of bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_prospr import global_masks
from lightning_prospr.selection import pruned_count


def random_scores(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.rand(40, 30, generator=gen),
        "b.weight": torch.rand(17, 3, 3, 3, generator=gen) * 5,
        "c.weight": torch.rand(1000, generator=gen) * 0.1,
    }


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99, 0.999])
def test_exact_number_removed(sparsity):
    scores = random_scores()
    total = sum(s.numel() for s in scores.values())  # 2659
    masks = global_masks(scores, sparsity)
    removed = sum(int((~m).sum()) for m in masks.values())
    assert removed == round(sparsity * total)
    assert all(m.dtype == torch.bool and m.shape == scores[n].shape for n, m in masks.items())


def test_keeps_exactly_the_largest_scores():
    scores = random_scores(1)
    masks = global_masks(scores, 0.9)
    kept = torch.cat([s[masks[n]] for n, s in scores.items()])
    dropped = torch.cat([s[~masks[n]] for n, s in scores.items()])
    assert kept.min() > dropped.max()


def test_deterministic_and_ties_broken_by_position():
    scores = {"x": torch.zeros(6), "y": torch.zeros(4)}
    first = global_masks(scores, 0.3)
    assert torch.equal(first["x"], torch.tensor([False, False, False, True, True, True]))
    assert bool(first["y"].all())
    for _ in range(3):
        again = global_masks(scores, 0.3)
        assert all(torch.equal(first[n], again[n]) for n in scores)


def test_zero_sparsity_keeps_everything():
    masks = global_masks(random_scores(), 0.0)
    assert all(bool(m.all()) for m in masks.values())


def test_rounding_is_documented_round_half_even():
    assert pruned_count(0.5, 5) == 2  # 2.5 -> 2
    assert pruned_count(0.7, 5) == 4  # 3.5 -> 4
    assert pruned_count(0.9, 10) == 9  # 9.000000000000002 -> 9


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_sparsity_is_refused(bad):
    with pytest.raises(ValueError, match="sparsity"):
        global_masks(random_scores(), bad)


def test_nan_scores_are_refused():
    scores = random_scores()
    scores["b.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"b\.weight.*NaN"):
        global_masks(scores, 0.5)


score_tensors = st.lists(
    st.lists(st.floats(0, 10, allow_nan=False, width=32), min_size=1, max_size=30), min_size=1, max_size=4
)


@settings(max_examples=60, deadline=None)
@given(values=score_tensors, low=st.floats(0, 0.99), high=st.floats(0, 0.99))
def test_property_counts_nesting_determinism(values, low, high):
    low, high = sorted((low, high))
    scores = {f"w{i}": torch.tensor(v) for i, v in enumerate(values)}
    total = sum(len(v) for v in values)
    masks_low = global_masks(scores, low)
    masks_high = global_masks(scores, high)
    assert sum(int((~m).sum()) for m in masks_low.values()) == pruned_count(low, total)
    assert sum(int((~m).sum()) for m in masks_high.values()) == pruned_count(high, total)
    for name in scores:  # a higher sparsity keeps a subset of what a lower one keeps
        assert not bool((masks_high[name] & ~masks_low[name]).any())
        assert torch.equal(masks_high[name], global_masks(scores, high)[name])
