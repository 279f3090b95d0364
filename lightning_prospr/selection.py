"""Scores -> keep-masks: global top-k with exact counts and deterministic tie-breaking."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["global_masks", "pruned_count"]


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
