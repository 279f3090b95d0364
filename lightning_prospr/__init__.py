"""Prune any LightningModule at initialization with ProsPr meta-gradients.

The pipeline, one module each: batches -> :mod:`~lightning_prospr.unroll` (the differentiable inner
loop) -> :mod:`~lightning_prospr.scores` (saliency) -> :mod:`~lightning_prospr.selection` (masks)
-> :mod:`~lightning_prospr.masking` (``torch.nn.utils.prune``) -> :mod:`~lightning_prospr.report`.
:class:`ProsprPruningCallback` is the Lightning adapter around them.
"""

from lightning_prospr import compat
from lightning_prospr.callback import ProsprPruningCallback
from lightning_prospr.masking import apply_masks, current_masks, make_permanent
from lightning_prospr.report import SparsityReport
from lightning_prospr.scores import default_parameter_names, prospr_scores
from lightning_prospr.selection import global_masks
from lightning_prospr.unroll import UnrollError

__version__ = "0.1.0"

compat.check_torch()  # every private torch name the engine uses is where it was, or a clear error

__all__ = [
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
]
