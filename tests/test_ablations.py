"""The mask sanity checks (ablations.py): layer-wise shuffle and re-initialization."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_prospr.ablations import reinitialize, shuffle_within_layers
from lightning_prospr.masking import apply_masks, effective_weight
from lightning_prospr.models import LeNet5


def lenet_masks(model: nn.Module, density: float = 0.1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        n: torch.rand(p.shape, generator=gen) < density
        for n, p in model.named_parameters()
        if n.endswith("weight")
    }


def test_shuffle_keeps_every_layers_count_and_moves_the_positions():
    masks = lenet_masks(LeNet5())
    shuffled = shuffle_within_layers(masks, seed=3)
    for n, m in masks.items():
        assert shuffled[n].shape == m.shape and shuffled[n].dtype == torch.bool
        assert int(shuffled[n].sum()) == int(m.sum())
    overlap = sum(int((shuffled[n] & m).sum()) for n, m in masks.items()) / sum(
        int(m.sum()) for m in masks.values()
    )
    assert overlap < 0.3  # a random permutation keeps about `density` of the positions
    again = shuffle_within_layers(masks, seed=3)
    assert all(torch.equal(again[n], shuffled[n]) for n in masks)
    other = shuffle_within_layers(masks, seed=4)
    assert any(not torch.equal(other[n], shuffled[n]) for n in masks)


def test_shuffle_of_structured_masks_moves_whole_channels():
    channels = {"w": torch.tensor([True, False, False, True, False, False])}
    masks = {"w": channels["w"].reshape(6, 1, 1, 1).expand(6, 2, 3, 3).clone()}
    out = shuffle_within_layers(masks, seed=0, channels=channels)["w"]
    per_channel = out.flatten(1)
    assert bool((per_channel.all(1) | ~per_channel.any(1)).all())  # every channel all or nothing
    assert int(per_channel.all(1).sum()) == 2


def test_reinitialize_redraws_the_weights_and_keeps_the_mask():
    torch.manual_seed(0)
    model = LeNet5()
    masks = lenet_masks(model)
    apply_masks(model, masks)
    before = {n: effective_weight(model, n).clone() for n in masks}
    state = torch.get_rng_state()
    reinitialize(model, list(masks), seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    for n, m in masks.items():
        after = effective_weight(model, n)
        assert bool((after[~m] == 0).all())  # pruned positions stay zero
        assert not torch.equal(after[m], before[n][m])  # kept positions re-drawn
        assert after[m].abs().max() <= before[n].abs().max() * 1.5 + 1e-6  # same initializer's range
    # the same seed draws the same weights
    twin = LeNet5()
    apply_masks(twin, masks)
    reinitialize(twin, list(masks), seed=7)
    assert all(torch.equal(effective_weight(twin, n), effective_weight(model, n)) for n in masks)


def test_reinitialize_refuses_a_module_without_reset_parameters_before_changing_anything():
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3, 3))

    model = nn.Sequential(nn.Linear(3, 3), Scale())
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"cannot re-initialize `1.weight`: its module Scale"):
        reinitialize(model, ["0.weight", "1.weight"])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
