"""Structured masks -> a smaller dense network: the pruned channels removed, before training.

A structured mask only zeroes channels; the tensors keep their size and training costs what the
dense network costs. [`shrink`][lightning_prospr.shrinking.shrink] removes the pruned output channels
physically, with everything coupled to them (the channel groups of
[`channels`][lightning_prospr.channels]: residual partners, norms, biases, the input columns of the
next layers), so that every convolution and matrix product is smaller. The shrunk network computes
what the masked one computes (checked on the example batch before `shrink` returns).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from lightning_prospr.channels import (
    CHECK_TOLERANCE,
    ChannelGroup,
    build_graph,
    channel_groups,
    predictions,
    remove_channels,
    rollback,
)
from lightning_prospr.channels import _agree as agree
from lightning_prospr.channels import _masked_tensors as masked_tensors
from lightning_prospr.stateless import LossFn

__all__ = ["ShrinkError", "shrink"]


class ShrinkError(ValueError):
    """The channels cannot be removed as asked; the model is unchanged."""


def _forward(model: nn.Module, x: Any) -> Any:
    return model(*x) if isinstance(x, tuple) else model(x)


def shrink(
    model: nn.Module,
    channel_masks: Mapping[str, Tensor],
    example_input: Any = None,
    *,
    loss_fn: LossFn | None = None,
) -> nn.Module:
    """Remove the output channels that `channel_masks` prune from `model`, in place, and return it.

    Args:
        model: a network with plain weights (no `torch.nn.utils.prune` re-parametrization: shrink
            the dense model, not the masked one).
        channel_masks: `{weight name: bool per output channel}`, `True` = kept, as
            [`compute_masks`][lightning_prospr.pipeline.compute_masks] returns them in
            `MaskResult.channel_masks` for `structured=True`. Coupled weights must agree.
        example_input: an input for `model(example_input)` (a tuple is unpacked), traced to find
            the coupled channels; by default the model's `example_input_array`. With `loss_fn`, a
            batch for `loss_fn(model, batch)` instead.
        loss_fn: trace and check through this loss pass instead of `model(example_input)` (for a
            model without `forward`, such as a LightningModule that only has `training_step`).

    Returns:
        `model`, with fewer channels: new, smaller `Parameter`s (optimizers made before must be
        made again) and BatchNorm statistics of the kept channels.

    Raises:
        ShrinkError: before any change, when a masked weight is in no channel group (the reason
            names the layer: a coupling torch-pruning cannot follow, or one with an unpruned
            weight), when coupled weights' masks disagree, when a group would keep no channel, or
            when removing the channels would not give what the masks give.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> keep = torch.tensor([True, False] * 4)
        >>> _ = shrink(net, {"0.weight": keep}, torch.randn(2, 3, 8, 8))
        >>> net[0].out_channels, net[1].num_features, net[3].in_channels
        (4, 4, 4)
    """
    batch, loss = _loss_pass(model, example_input, loss_fn)
    pruned = [name for name, m in channel_masks.items() if not bool(m.bool().all())]
    if not pruned:
        return model
    _check_plain(model, pruned)
    found = channel_groups(model, loss, batch, pruned, closed=False)
    for name in pruned:
        if name in found.excluded:
            raise ShrinkError(
                f"cannot shrink `{name}`: {found.excluded[name]}. Leave it out of the structured masks."
            )
    removed = _removed_channels(found.groups, channel_masks)
    reference = predictions(model, loss, batch, masked_tensors(model, removed))
    with rollback(model) as undo:
        try:
            remove_channels(build_graph(model, loss, batch), model, removed)
            error = agree(reference, predictions(model, loss, batch))
        except Exception:
            undo()
            raise
        if error > CHECK_TOLERANCE:
            undo()
            raise ShrinkError(
                f"removing the channels changed what the network computes (relative difference {error:.2g}) "
                "compared with masking them; the model is unchanged."
            )
    return model


def _loss_pass(model: nn.Module, example_input: Any, loss_fn: LossFn | None) -> tuple[Any, LossFn]:
    if example_input is None:
        example_input = getattr(model, "example_input_array", None)
    if example_input is None:
        raise ShrinkError(
            "shrink needs an example input to trace which channels are coupled: pass `example_input` (or "
            "set the module's `example_input_array`)."
        )
    return example_input, loss_fn if loss_fn is not None else _forward


def _check_plain(model: nn.Module, names: list[str]) -> None:
    for name in names:
        module = model.get_submodule(name.rpartition(".")[0])
        if prune.is_pruned(module):
            raise ShrinkError(
                f"`{name.rpartition('.')[0]}` carries torch.nn.utils.prune masks: shrink the dense model (or "
                "bake the masks in first with lightning_prospr.make_permanent)."
            )


def _removed_channels(
    groups: list[ChannelGroup], channel_masks: Mapping[str, Tensor]
) -> dict[ChannelGroup, list[int]]:
    """Each group's removed channels, from the masks of its producers (which must agree)."""
    removed: dict[ChannelGroup, list[int]] = {}
    for group in groups:
        keep: Tensor | None = None
        for member in group.producers:
            if member.name not in channel_masks:
                continue
            mask = channel_masks[member.name].reshape(-1).cpu().bool()
            mine = torch.ones(group.size, dtype=torch.bool)
            mine[member.root] = mask[member.index]
            if not torch.equal(mine[member.root], mask[member.index]):
                raise ShrinkError(
                    f"the mask of `{member.name}` splits an attention head of `{group.attention}`: keep or "
                    f"remove each head's {group.rows} rows together, as compute_masks(structured=True) does."
                )
            if keep is not None and not torch.equal(keep, mine):
                others = ", ".join(m.name for m in group.producers)
                raise ShrinkError(
                    f"the channel masks of coupled weights disagree ({others} share their output channels): "
                    "give them the same mask, as compute_masks(structured=True) does."
                )
            keep = mine
        if keep is None or bool(keep.all()):
            continue
        if not bool(keep.any()):
            raise ShrinkError(f"the masks remove every channel of `{group.root}`'s group; keep at least one.")
        removed[group] = (~keep).nonzero().reshape(-1).tolist()
    return removed
