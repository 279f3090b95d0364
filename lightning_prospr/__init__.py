"""Prune any LightningModule at initialization with ProsPr meta-gradients.

The pipeline, one module each: batches -> :mod:`~lightning_prospr.prunable` (which weights) ->
:mod:`~lightning_prospr.unroll` (the differentiable inner loop) -> :mod:`~lightning_prospr.scores`
(saliency) -> :mod:`~lightning_prospr.selection` (masks) -> :mod:`~lightning_prospr.masking`
(``torch.nn.utils.prune``) -> :mod:`~lightning_prospr.report`. :class:`ProsprPruningCallback` is
the Lightning adapter around them.
"""

from lightning_prospr import compat
from lightning_prospr.callback import ProsprPruningCallback
from lightning_prospr.compat import CompatibilityError
from lightning_prospr.errors import NotTwiceDifferentiableError, UnrollError
from lightning_prospr.masking import apply_masks, current_masks, make_permanent
from lightning_prospr.prunable import default_parameter_names, prunable_parameters
from lightning_prospr.report import SparsityReport
from lightning_prospr.scores import prospr_scores
from lightning_prospr.selection import global_masks

__version__ = "0.1.0"

compat.check_torch()  # every private torch name the engine uses is where it was, or a clear error

__all__ = [
    "CompatibilityError",
    "NotTwiceDifferentiableError",
    "ProsprPruningCallback",
    "SparsityReport",
    "UnrollError",
    "__version__",
    "apply_masks",
    "current_masks",
    "default_parameter_names",
    "global_masks",
    "make_permanent",
    "prospr_scores",
    "prunable_parameters",
]
