"""Effective sparsity: kept weights that no input-to-output path uses count as removed.

At extreme sparsity a mask keeps weights that are cut off: a unit that receives no kept weight
passes nothing on, so the kept weights that read it are dead; a unit whose output no kept weight
reads is dead too, and so are the weights into it. Vysogorets and Kempe (2021, "Connectivity
Matters: Neural Network Pruning Through the Lens of Effective Sparsity", arXiv 2107.02306) count
those weights as removed. The *effective sparsity* is

$$
s_\\text{eff} = 1 - \\frac{\\#\\{\\text{kept weights on an input-to-output path}\\}}{N} \\ \\ge s .
$$

A kept weight lies on a path exactly when the linearized network
([`linearized`][lightning_prospr.linearized]: weights $|\\theta| \\odot m$, biases 0, inputs 1)
has $\\partial R / \\partial q \\ne 0$ there, so one loss pass through it, with your own loss,
finds them all. Tensors that no path reaches even in the dense network (a weight the loss does not
use) cannot be judged and are counted as they are masked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prospr.linearized import Probe
from lightning_prospr.selection import select_masks
from lightning_prospr.stateless import LossFn

__all__ = ["EffectiveMasks", "effective_masks", "replace_dead_weights"]

#: Re-selections `replace_dead_weights` makes at most.
MAX_REPLACEMENTS = 200


@dataclass(frozen=True)
class EffectiveMasks:
    """The kept weights that lie on an input-to-output path.

    Attributes:
        masks: `{name: bool}`, `True` where a weight is kept *and* on a path.
        unchecked: tensors no path reaches even in the dense network; their `masks` are the
            nominal ones.
    """

    masks: dict[str, Tensor]
    unchecked: tuple[str, ...] = ()

    def kept(self, name: str) -> int:
        """Effective (on-path) kept weights of one tensor."""
        return int(self.masks[name].count_nonzero())

    @property
    def sparsity(self) -> float:
        """$1 - $ effective kept / all weights, over every tensor."""
        total = sum(m.numel() for m in self.masks.values())
        return 1.0 - sum(self.kept(n) for n in self.masks) / total if total else 0.0


@torch.no_grad()
def effective_masks(
    model: nn.Module, masks: Mapping[str, Tensor], loss_fn: LossFn, batch: Any
) -> EffectiveMasks:
    """The weights of `masks` that lie on a path from the batch to the loss.

    Args:
        model: the network (left exactly as it was; it needs no `forward`).
        masks: `{parameter name: bool keep-mask}`, each with its weight's shape.
        loss_fn: `loss_fn(model, batch) -> loss`, as for scoring.
        batch: one batch (its floating-point tensors are replaced by ones; one sample is used when
            the loss runs on one).

    Returns:
        An [`EffectiveMasks`][lightning_prospr.effective.EffectiveMasks].

    Raises:
        Exception: whatever the linearized loss pass raises (see
            [`path_gradients`][lightning_prospr.linearized.path_gradients]).

    Example:
        Hidden unit 1 of this 2-2-1 network receives no kept weight, so the kept weight that reads
        it carries nothing: 3 weights are kept, 2 of them effective.

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> loss_fn = lambda m, b: m(b).sum()
        >>> masks = {"0.weight": torch.tensor([[True, False], [False, False]]),
        ...          "2.weight": torch.tensor([[True, True]])}
        >>> eff = effective_masks(net, masks, loss_fn, torch.randn(4, 2))
        >>> eff.masks["2.weight"].tolist(), round(eff.sparsity, 4)
        ([[True, False]], 0.6667)
    """
    bools = {n: m.bool() for n, m in masks.items()}
    probe = Probe(model, loss_fn, batch)
    with torch.enable_grad():
        dense = probe.dense({n: torch.ones_like(m) for n, m in bools.items()})
        unchecked = tuple(n for n in bools if not bool((dense.grads[n] != 0).any()))
        paths = probe(bools)
    effective = {
        n: m.clone() if n in unchecked else m & (paths.grads[n] != 0).to(m.device) for n, m in bools.items()
    }
    return EffectiveMasks(effective, unchecked)


@torch.no_grad()
def replace_dead_weights(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    scores: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    sparsity: float,
    *,
    allocation: str = "global",
    within: Mapping[str, Tensor] | None = None,
    keep: Mapping[str, Tensor] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    spread_dims: Mapping[str, int] | None = None,
) -> tuple[dict[str, Tensor], int]:
    """Masks of the same size in which every kept weight lies on an input-to-output path.

    A kept weight that lies on no path is dead (see the module docstring): it costs a place in the
    budget and does nothing. This repeats, until no kept weight is dead: find the dead weights, bar
    them, and select the masks again from `scores` with everything barred so far at $-\\infty$ (so
    their places go to the best-scored weights still allowed, by the same `allocation`, within the
    same `within`). Live weights stay kept (removing a dead weight cannot cut a path), so each
    repetition only adds; it stops after `MAX_REPLACEMENTS` re-selections at most.

    Args:
        model: the network the masks were scored on.
        loss_fn: the loss they were scored with, `loss_fn(model, batch)`.
        batch: a batch for `loss_fn`.
        scores: `{name: score}` with each weight's shape (not per channel).
        masks: the keep-masks to repair, which remove `sparsity`.
        sparsity: the fraction removed, kept exactly.
        allocation: the layer densities, as for [`select_masks`][lightning_prospr.selection.select_masks].
        within: weights outside these masks stay removed.
        keep: weights that must stay (the layer-collapse guard's additions): never barred, ranked first.
        shapes: weight shapes, for `"erk"`.
        spread_dims: the output dimensions to spread each layer's budget over, as for `select_masks`.

    Returns:
        The masks and the number of kept weights replaced. Tensors that no path reaches even in the
        dense network are left to the scores (nothing there can be judged).
    """
    probe = Probe(model, loss_fn, batch)
    bools = {n: m.bool() for n, m in masks.items()}
    with torch.enable_grad():
        dense = probe.dense({n: torch.ones_like(m) for n, m in bools.items()})
    judged = [n for n in bools if bool((dense.grads[n] != 0).any())]
    ranked = {n: scores[n].detach().to(torch.float64).reshape(bools[n].shape) for n in bools}
    if keep:
        ranked = {
            n: r.masked_fill(keep[n].to(r.device), math.inf) if n in keep else r for n, r in ranked.items()
        }
    barred = {n: torch.zeros_like(m) for n, m in bools.items()}
    current = bools
    for _ in range(MAX_REPLACEMENTS):
        with torch.enable_grad():
            paths = probe(current)
        fresh = 0
        for n in judged:
            dead = current[n] & (paths.grads[n] == 0).to(current[n].device) & ~barred[n]
            fresh += int(dead.sum())
            barred[n] |= dead
        if fresh == 0:
            break
        current = select_masks(
            {n: r.masked_fill(barred[n], -math.inf) for n, r in ranked.items()},
            sparsity,
            allocation=allocation,
            within=within,
            shapes=shapes,
            spread_dims=spread_dims,
        )
    replaced = sum(int((bools[n] & ~current[n]).sum()) for n in bools)
    return current, replaced
