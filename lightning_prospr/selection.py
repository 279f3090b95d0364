"""Scores -> keep-masks: top-k with exact counts and deterministic tie-breaking, over all layers
together ([`global_masks`][lightning_prospr.selection.global_masks]) or within each layer's budget
([`select_masks`][lightning_prospr.selection.select_masks] with an
[`allocation`][lightning_prospr.allocation])."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_prospr.allocation import ALLOCATIONS, layer_budgets

__all__ = ["global_masks", "pruned_count", "select_masks", "spread_ranks"]


def pruned_count(sparsity: float, total: int) -> int:
    """Number of weights removed: `round(sparsity * total)`.

    Python's `round()` is used, so an exact half rounds to the even neighbour (e.g. 0.5 of 5
    weights removes 2). The product is rounded first to 9 decimals so that binary noise such as
    `0.9 * 10 = 9.000000000000002` cannot tip a count.
    """
    return round(round(sparsity * total, 9))


def check_sparsity(sparsity: float, name: str = "sparsity") -> None:
    """Raise `ValueError` unless `sparsity` is a number in [0, 1)."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"`{name}` must be a float in [0, 1), got {type(sparsity).__name__}.")
    if not (0.0 <= sparsity < 1.0) or math.isnan(sparsity):
        raise ValueError(
            f"`{name}` is the fraction of weights removed and must be in [0, 1), got {sparsity!r}; "
            "for example 0.9 keeps 10% of the weights."
        )


def global_masks(
    scores: Mapping[str, Tensor], sparsity: float, within: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Keep the highest scores over all tensors together, removing exactly `round(sparsity * N)`.

    Args:
        scores: `{name: scores}` as returned by [`prospr_scores()`][lightning_prospr.prospr_scores]; higher
            means more important. NaN scores are refused.
        sparsity: the fraction of all `N` scored weights to remove, in [0, 1).
        within: optional existing keep-masks (`{name: bool tensor}`, for some or all names).
            Weights outside them stay removed and count towards `sparsity`, so the new masks nest
            inside the old ones (a model pruned before, or an earlier round of an iterative schedule).

    Ties are broken deterministically: among equal scores, the weight that comes first in the
    concatenation of the flattened tensors (in the mapping's order) is removed first.

    Returns:
        `{name: bool tensor}`, `True` where the weight is kept, each on its score's device.
    """
    check_sparsity(sparsity)
    if not scores:
        raise ValueError("`scores` is empty: there is nothing to select from.")
    flat = torch.cat([s.detach().reshape(-1).to(torch.float64) for s in scores.values()])
    if torch.isnan(flat).any():
        bad = [n for n, s in scores.items() if torch.isnan(s).any()]
        raise ValueError(f"scores of {bad} contain NaN; refusing to select masks from them.")
    removed = pruned_count(sparsity, flat.numel())
    if within:
        allowed = torch.cat(
            [
                within[n].reshape(-1).to(flat.device, torch.bool)
                if n in within
                else torch.ones_like(s.reshape(-1), dtype=torch.bool, device=flat.device)
                for n, s in scores.items()
            ]
        )
        already = int((~allowed).sum())
        if already > removed:
            raise ValueError(
                f"{already} of {flat.numel()} weights ({100 * already / flat.numel():.2f} %) are already "
                f"pruned, more than `sparsity`={sparsity} removes; ask for a sparsity of at least "
                f"{already / flat.numel():.4f}."
            )
        flat = flat.masked_fill(~allowed, -math.inf)
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if removed:
        order = torch.sort(flat, stable=True).indices
        keep[order[:removed]] = False
    masks = {}
    offset = 0
    for name, s in scores.items():
        masks[name] = keep[offset : offset + s.numel()].reshape(s.shape).to(s.device)
        offset += s.numel()
    return masks


def select_masks(
    scores: Mapping[str, Tensor],
    sparsity: float,
    *,
    allocation: str = "global",
    within: Mapping[str, Tensor] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    spread_dims: Mapping[str, int] | None = None,
) -> dict[str, Tensor]:
    """Keep-masks that remove exactly `round(sparsity * N)` of the `N` scored units, with the
    layer densities of `allocation`.

    Args:
        scores: `{name: scores}`, higher = more important (one per weight, or one per output
            channel of shape `(out, 1, ..., 1)` for structured pruning).
        sparsity: the fraction of all scored units to remove, in [0, 1).
        allocation: `"global"` ([`global_masks`][lightning_prospr.selection.global_masks]: one
            top-k over all layers), `"uniform"`, `"erk"` or `"balanced"`
            ([`layer_budgets`][lightning_prospr.allocation.layer_budgets]: each layer keeps its
            budget, chosen by its own scores).
        within: existing keep-masks; weights outside them stay removed and count towards
            `sparsity` (a layer's budget is capped at what it still has).
        shapes: the weight shapes, for `"erk"`; by default the scores' shapes (pass them when the
            scores are per channel).
        spread_dims: `{name: dimension}`: spread each named layer's budget evenly over the slices
            along that dimension, its output units
            ([`spread_ranks`][lightning_prospr.selection.spread_ranks]); needs a per-layer
            `allocation`. Scores of $+\\infty$ (weights that must stay) are kept first all the same.

    Ties are broken as in `global_masks`: the earlier position in the layer is removed first.
    """
    if allocation == "global":
        if spread_dims:
            raise ValueError(
                "`spread` needs a per-layer allocation ('uniform', 'erk' or 'balanced'): it orders "
                "weights by their rank within their output unit, which is not comparable across layers."
            )
        return global_masks(scores, sparsity, within)
    if allocation not in ALLOCATIONS:
        raise ValueError(
            f"`allocation` must be one of {', '.join(map(repr, ALLOCATIONS))}, got {allocation!r}."
        )
    check_sparsity(sparsity)
    if not scores:
        raise ValueError("`scores` is empty: there is nothing to select from.")
    flat = {n: s.detach().reshape(-1).to(torch.float64) for n, s in scores.items()}
    bad = [n for n, f in flat.items() if torch.isnan(f).any()]
    if bad:
        raise ValueError(f"scores of {bad} contain NaN; refusing to select masks from them.")
    allowed = {
        n: within[n].reshape(-1).to(f.device, torch.bool)
        if within and n in within
        else torch.ones_like(f, dtype=torch.bool)
        for n, f in flat.items()
    }
    total = sum(f.numel() for f in flat.values())
    kept = total - pruned_count(sparsity, total)
    capacity = {n: int(a.sum()) for n, a in allowed.items()}
    if kept > sum(capacity.values()):
        already = total - sum(capacity.values())
        raise ValueError(
            f"{already} of {total} weights ({100 * already / total:.2f} %) are already pruned, more "
            f"than `sparsity`={sparsity} removes; ask for a sparsity of at least {already / total:.4f}."
        )
    shapes = shapes or {n: tuple(s.shape) for n, s in scores.items()}
    budgets = layer_budgets(
        {n: shapes[n] for n in flat},
        kept,
        allocation,
        units={n: f.numel() for n, f in flat.items()},
        capacity=capacity,
    )
    masks = {}
    for name, s in scores.items():
        ranked = flat[name].masked_fill(~allowed[name], -math.inf)
        if spread_dims and name in spread_dims:
            ranked = spread_ranks(ranked.reshape(s.shape), spread_dims[name]).reshape(-1)
        keep = torch.zeros_like(allowed[name])
        if budgets[name]:
            keep[torch.sort(ranked, stable=True).indices[-budgets[name] :]] = True
        masks[name] = keep.reshape(s.shape).to(s.device)
    return masks


def spread_ranks(scores: Tensor, dim: int) -> Tensor:
    r"""Keys whose top-$k$ spreads $k$ evenly over the slices of `scores` along `dim`.

    For a layer with $u$ output units (the slices along `dim`: a Linear or Conv weight's rows) a
    top-$k$ of the returned keys keeps $\lfloor k/u \rfloor$ or $\lceil k/u \rceil$ weights of
    every unit, each unit's best-scored ones. A weight of score rank $r$ within its unit (0 = best)
    and rank $q$ within the whole layer (ascending, $0 \le q < n$) gets the key $q - r\,n$: all
    units' best weights come first, then all their second-best, and so on, and within one such
    tier the higher score wins. So the extra weights of the units that keep $\lceil k/u \rceil$
    go to the units whose next weight scores highest. Scores of $\pm\infty$ keep their value (a
    weight barred or required stays so); ties are broken as in `global_masks`.

    Random pruning spreads a layer's weights about evenly over its units by chance; a score-based
    top-$k$ may not, and at extreme sparsity it can leave whole output channels without a weight
    (the results page's ResNet-20 at 98 %).

    Example:
        >>> import torch
        >>> keys = spread_ranks(torch.tensor([[9.0, 8.0, 7.0], [1.0, 2.0, 0.5]]), 0)
        >>> keep = torch.zeros(6, dtype=torch.bool)
        >>> keep[keys.reshape(-1).argsort()[-3:]] = True
        >>> keep.reshape(2, 3).int().tolist()  # a plain top-3 would keep only the first row
        [[1, 1, 0], [0, 1, 0]]
    """
    values = scores.detach().to(torch.float64)
    rows = values.movedim(dim, 0).reshape(values.shape[dim], -1)
    n = rows.numel()
    within = torch.empty_like(rows)
    ascending = torch.sort(rows, dim=1, stable=True).indices
    positions = torch.arange(rows.shape[1], dtype=torch.float64, device=rows.device).expand_as(rows)
    within.scatter_(1, ascending, positions)
    rank = rows.shape[1] - 1 - within  # 0 = the unit's best
    layer = torch.empty(n, dtype=torch.float64, device=rows.device)
    layer[torch.sort(rows.reshape(-1), stable=True).indices] = torch.arange(
        n, dtype=torch.float64, device=rows.device
    )
    keys = layer.reshape(rows.shape) - rank * n
    keys = torch.where(torch.isinf(rows), rows, keys)
    moved = list(values.movedim(dim, 0).shape)
    return keys.reshape(moved).movedim(0, dim)
