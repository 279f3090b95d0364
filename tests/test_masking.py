"""masks <-> torch.nn.utils.prune (masking.py): apply, read back, take off, plain state dicts."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from lightning_prospr import apply_masks, current_masks, make_permanent
from lightning_prospr.masking import effective_weight, plain_state_dict, remove_masks


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        n: torch.rand(p.shape, generator=gen) > 0.5
        for n, p in model.named_parameters()
        if n.endswith("weight")
    }


def test_apply_then_read_back_then_take_off_keeps_the_parameter_objects():
    model = net()
    params = {n: p for n, p in model.named_parameters()}
    masks = masks_of(model)
    apply_masks(model, masks)
    assert all(torch.equal(current_masks(model)[n], m) for n, m in masks.items())
    for name, mask in masks.items():
        assert torch.count_nonzero(effective_weight(model, name)[~mask]) == 0
        assert model.get_parameter(f"{name}_orig") is params[name]  # optimizers keep training it
    remove_masks(model, list(masks), bake=False)
    assert current_masks(model) == {}
    assert all(model.get_parameter(n) is p for n, p in params.items())
    assert all(bool((model.get_parameter(n) != 0).any()) for n in masks)  # values not baked in


def test_make_permanent_bakes_the_zeros_in():
    model = net()
    masks = masks_of(model)
    apply_masks(model, masks)
    assert sorted(make_permanent(model)) == sorted(masks)
    assert current_masks(model) == {}
    for name, mask in masks.items():
        assert torch.count_nonzero(model.get_parameter(name)[~mask]) == 0


def test_plain_state_dict_loads_into_an_unpruned_model():
    model = net()
    masks = masks_of(model)
    apply_masks(model, masks)
    handles = plain_state_dict(model, list(masks))
    state = model.state_dict()
    assert not any(k.endswith(("_orig", "_mask")) for k in state)
    plain = net()
    plain.load_state_dict(state)
    x = torch.randn(5, 4)
    assert torch.allclose(plain(x), model(x))
    model.load_state_dict(state)  # and back into the pruned one, masks kept
    assert all(torch.equal(current_masks(model)[n], m) for n, m in masks.items())
    for handle in handles:
        handle.remove()
    assert any(k.endswith("_mask") for k in model.state_dict())


def test_a_mask_of_another_shape_is_refused():
    model = net()
    with pytest.raises(ValueError, match=r"mask for '0.weight' has shape \(3, 3\)"):
        apply_masks(model, {"0.weight": torch.ones(3, 3, dtype=torch.bool)})


def test_masks_compose_with_an_existing_pruning():
    model = net()
    extra = masks_of(model)["0.weight"]
    prune.random_unstructured(model[0], "weight", amount=0.5)
    before = current_masks(model)["0.weight"]
    apply_masks(model, {"0.weight": extra})
    assert torch.equal(current_masks(model)["0.weight"], before & extra)


def test_masks_hold_where_a_parent_reads_the_weight_without_calling_the_child():
    """nn.MultiheadAttention hands out_proj.weight to a functional kernel; the mask must apply."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    reference = copy.deepcopy(attention)
    mask = torch.rand(8, 8) > 0.5
    apply_masks(attention, {"out_proj.weight": mask})
    optimizer = torch.optim.SGD(attention.parameters(), lr=0.5)
    x = torch.randn(3, 4, 8)
    for _ in range(3):  # several steps: a stale weight would fail on the second backward
        optimizer.zero_grad()
        attention(x, x, x)[0].pow(2).sum().backward()
        optimizer.step()
    plain_state_dict(attention, ["out_proj.weight"])
    with torch.no_grad():
        reference.load_state_dict(attention.state_dict())  # plain (masked) weights
        reference.eval(), attention.eval()
        assert torch.equal(reference.out_proj.weight == 0, ~mask)
        assert torch.allclose(attention(x, x, x)[0], reference(x, x, x)[0])
