"""Structured selection: whole output channels, chosen per channel group.

With `structured=True` a method scores each output channel of each pruned weight (one mask per
channel, shape `(out, 1, ..., 1)`). Channels that must be removed together (a channel group of
[`channels`][lightning_prospr.channels]: the convolutions added into one residual stream, a
depthwise convolution and the pointwise one before it) are scored together: a group's channel
scores the sum of its producers' channel scores, and the top-k runs over the groups' channels
(with the layer-wise `allocation`, each group a layer). With `head_sparsity`, the groups whose
channels are an attention module's heads are selected apart: each keeps its best-scored heads, the
same fraction in every module, and the top-k over the other groups meets `sparsity`. The masks are
expanded back to every producer's rows and to the biases and norm parameters of the removed
channels, so that a removed channel is dead, and the masked network is the network
[`shrink`][lightning_prospr.shrinking.shrink] builds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_prospr.channels import ChannelGroup
from lightning_prospr.guard import GuardReport, guard_masks
from lightning_prospr.methods import Run
from lightning_prospr.prunable import parameter_key
from lightning_prospr.selection import global_masks, select_masks

__all__ = ["ChannelSelection", "select_channels"]


@dataclass
class ChannelSelection:
    """The result of a structured selection.

    Attributes:
        masks: `{weight: bool mask}` of every producer, in the weight's shape.
        coupled: `{parameter: bool mask}` of the biases and norm parameters of removed channels.
        channel_masks: `{weight: bool per output channel}` of every producer.
        guard: what the per-group floor changed.
    """

    masks: dict[str, Tensor]
    coupled: dict[str, Tensor] = field(default_factory=dict)
    channel_masks: dict[str, Tensor] = field(default_factory=dict)
    guard: GuardReport = field(default_factory=GuardReport)


def _channel_shaped(mask: Tensor, dim: int) -> Tensor:
    """A weight-shaped mask as one entry per output channel (along `dim`): `(out, 1, ..., 1)` for
    `dim=0`; an output channel is kept while any of its weights is."""
    return mask.amax(dim=tuple(d for d in range(mask.dim()) if d != dim), keepdim=True)


def select_channels(
    run: Run,
    groups: list[ChannelGroup],
    within: Mapping[str, Tensor] | None,
    score_hook: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None,
    density_schedule: Callable[[float, int], list[float]],
) -> ChannelSelection:
    """Score the producers of `groups`, select channels per group in `run.settings.rounds_used`
    rounds, apply the per-group floor, and expand the group masks to every coupled tensor."""
    settings = run.settings
    apart = settings.head_sparsity is not None  # heads selected apart from the other groups
    heads = [g for g in groups if apart and g.attention]
    others = [g for g in groups if not (apart and g.attention)]
    if apart and not heads:
        raise ValueError(
            "`head_sparsity` applies to attention heads, and none of the pruned weights is the "
            "query, key and value projections of an attention module whose heads were found "
            "(see the shrinking guide for the modules recognized); leave head_sparsity=None."
        )
    if not others:
        raise ValueError(
            "every channel group of the pruned weights is an attention module's heads, so "
            "`sparsity` has no channels to count; prune the heads with sparsity alone and leave "
            "head_sparsity=None."
        )
    named = dict(run.model.named_parameters())
    shapes = {
        member.name: named[parameter_key(named, member.name)].shape
        for group in groups
        for member in (*group.producers, *group.dead_with)
    }
    roots = {group.root: shapes[group.root] for group in groups}

    def of_others(values: Mapping[str, Tensor] | Mapping[str, torch.Size]) -> dict[str, Any]:
        return {g.root: values[g.root] for g in others}

    dims = {member.name: member.dim for group in groups for member in group.producers}
    current = (
        {n: _channel_shaped(m.bool(), dims.get(n, 0)) for n, m in within.items() if n in run.names}
        if within
        else None
    )
    chosen: dict[str, Tensor] | None = None
    if current is not None:  # a channel already pruned in every producer stays pruned
        chosen = {g.root: _group_alive(g, current) for g in groups}
    scores: dict[str, Tensor] = {}
    rounds = settings.rounds_used
    head_targets = density_schedule(settings.head_sparsity or 0.0, rounds) if heads else [0.0] * rounds
    for target, head_target in zip(density_schedule(settings.sparsity, rounds), head_targets, strict=True):
        channel_scores = run.settings.method_spec.score(run, current)
        if score_hook is not None:
            channel_scores = score_hook(channel_scores)
        scores = {g.root: g.scores(channel_scores) for g in groups}
        selected = select_masks(
            of_others(scores),
            target,
            allocation=settings.allocation,
            within=None if chosen is None else of_others(chosen),
            shapes=of_others(roots),
        )
        for group in heads:
            selected[group.root] = _keep_heads(
                group.root, scores[group.root], head_target, None if chosen is None else chosen[group.root]
            )
        chosen = selected
        current = {
            n: m.to(named[parameter_key(named, n)].device)
            for n, m in _producer_masks(groups, chosen, shapes, dims).items()
        }
    assert chosen is not None
    guard = GuardReport()
    if settings.guard != "off":  # the heads keep at least one each, and their count, apart from it
        guarded, guard = guard_masks(
            of_others(scores),
            of_others(chosen),
            layer_floor=settings.layer_floor,
            per_layer=settings.allocation != "global",
        )
        chosen = {**chosen, **guarded}
    expanded: dict[str, Tensor] = {}
    for group in groups:  # a tensor in two groups (rows in one, columns in another) keeps both masks
        for name, mask in group.expand(chosen[group.root], shapes).items():
            expanded[name] = expanded[name] & mask if name in expanded else mask
    producers = {m.name for g in groups for m in g.producers}
    device = {n: named[parameter_key(named, n)].device for n in shapes}
    masks = {n: expanded[n].clone().to(device[n]) for n in run.names if n in producers}
    coupled = {n: m.clone().to(device[n]) for n, m in expanded.items() if n not in producers}
    channel_masks = {n: _channel_shaped(m, dims[n]).reshape(-1).clone() for n, m in masks.items()}
    return ChannelSelection(masks, coupled, channel_masks, guard)


def _keep_heads(root: str, scores: Tensor, sparsity: float, within: Tensor | None) -> Tensor:
    """`(heads,)` keep-mask of one attention module: `min(h - 1, round(sparsity * h))` of its `h`
    heads removed, the worst-scored first (heads already removed in `within` count, and stay
    removed), by [`global_masks`][lightning_prospr.selection.global_masks] over the module alone
    (its NaN check and tie-breaking: the earlier head is removed first)."""
    count = scores.numel()
    removed = min(count - 1, round(sparsity * count))
    if within is not None:
        removed = max(removed, int((~within.reshape(-1).bool()).sum()))
    if removed == count:  # `within` removed every head already
        return torch.zeros(count, dtype=torch.bool)
    return global_masks({root: scores}, removed / count, None if within is None else {root: within})[root]


def _group_alive(group: ChannelGroup, current: Mapping[str, Tensor]) -> Tensor:
    """`(size,)`: channels some producer still keeps."""
    alive = torch.zeros(group.size, dtype=torch.bool)
    for member in group.producers:
        if member.name in current:
            rows = current[member.name].reshape(-1).cpu()
            alive[member.root] |= rows[member.index]
        else:
            alive[member.root] = True
    return alive


def _producer_masks(
    groups: list[ChannelGroup],
    chosen: Mapping[str, Tensor],
    shapes: Mapping[str, torch.Size],
    dims: Mapping[str, int],
) -> dict[str, Tensor]:
    """The group masks as per-channel masks `(out, 1, ..., 1)` of every producer (`(1, out)` for a
    `Conv1D`; `dims`: each producer's output dimension), for the next round."""
    out: dict[str, Tensor] = {}
    for group in groups:
        for name, mask in group.expand(chosen[group.root], shapes).items():
            if name in dims:  # a producer, not a bias or norm parameter
                out[name] = _channel_shaped(mask, dims[name])
    return out
