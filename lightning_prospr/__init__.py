"""Prune any LightningModule at initialization with ProsPr meta-gradients.

The pipeline, one module each: batches ([`batches`][lightning_prospr.batches]) -> which weights
([`prunable`][lightning_prospr.prunable]) -> scores ([`scores`][lightning_prospr.scores] on the
inner loop of [`unroll`][lightning_prospr.unroll]; the baselines of
[`baselines`][lightning_prospr.baselines]; by name in [`methods`][lightning_prospr.methods]) ->
masks ([`selection`][lightning_prospr.selection], [`guard`][lightning_prospr.guard]) -> applied
masks ([`masking`][lightning_prospr.masking]) and the report ([`report`][lightning_prospr.report]).
[`compute_masks`][lightning_prospr.pipeline.compute_masks] runs them with one
[`PruningSettings`][lightning_prospr.settings.PruningSettings];
[`ProsprPruningCallback`][lightning_prospr.callback.ProsprPruningCallback] is the Lightning adapter
around it. Importing the package does not import Lightning: the callback is loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_prospr import compat
from lightning_prospr.compat import CompatibilityError
from lightning_prospr.errors import NotTwiceDifferentiableError, UnrollError
from lightning_prospr.masking import apply_masks, current_masks, make_permanent
from lightning_prospr.methods import METHODS
from lightning_prospr.pipeline import MaskResult, compute_masks
from lightning_prospr.prunable import default_parameter_names, prunable_parameters
from lightning_prospr.report import SparsityReport
from lightning_prospr.scores import prospr_scores, snip_scores
from lightning_prospr.selection import global_masks
from lightning_prospr.settings import PruningSettings
from lightning_prospr.shrinking import ShrinkError, shrink

if TYPE_CHECKING:
    from lightning_prospr.callback import ProsprPruningCallback

__version__ = "0.2.0"

compat.check_torch()  # every private torch name the engine uses is where it was, or a clear error

__all__ = [
    "METHODS",
    "CompatibilityError",
    "MaskResult",
    "NotTwiceDifferentiableError",
    "ProsprPruningCallback",
    "PruningSettings",
    "ShrinkError",
    "SparsityReport",
    "UnrollError",
    "__version__",
    "apply_masks",
    "compute_masks",
    "current_masks",
    "default_parameter_names",
    "global_masks",
    "make_permanent",
    "prospr_scores",
    "prunable_parameters",
    "shrink",
    "snip_scores",
]


def __getattr__(name: str) -> Any:
    """`ProsprPruningCallback` is imported on first use, so that the engine does not need Lightning."""
    if name == "ProsprPruningCallback":
        from lightning_prospr.callback import ProsprPruningCallback

        return ProsprPruningCallback
    raise AttributeError(f"module 'lightning_prospr' has no attribute {name!r}")
