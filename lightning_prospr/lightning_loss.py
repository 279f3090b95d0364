"""A LightningModule's loss for scoring: `training_step` (or `prospr_loss`) under the fit's precision."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException

__all__ = ["ModuleLoss", "logging_disabled"]


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def logging_disabled(pl_module: pl.LightningModule) -> Iterator[None]:
    """`self.log` raises in `on_fit_start`; silence it while `training_step` serves as a loss."""
    pl_module.log = _noop  # type: ignore[method-assign]
    pl_module.log_dict = _noop  # type: ignore[method-assign]
    try:
        yield
    finally:
        del pl_module.log
        del pl_module.log_dict


class ModuleLoss:
    """`loss(model, (batch_idx, batch))`: the module's `prospr_loss`, else its `training_step`,
    under the precision plugin's autocast. What it returns (a tensor or a dict with `"loss"`) is
    checked by the engine, which calls it by `source` in its messages.

    Args:
        trainer: the fit's trainer (its precision plugin).
        pl_module: the module; one with manual optimization must define `prospr_loss`.
        on_call: called before each evaluation (the progress bar).
    """

    hint = " or define `prospr_loss(self, batch, batch_idx)` on the module"

    def __init__(self, trainer: pl.Trainer, pl_module: pl.LightningModule, on_call: Any = None) -> None:
        self.custom = getattr(pl_module, "prospr_loss", None) is not None
        if not self.custom and not pl_module.automatic_optimization:
            raise MisconfigurationException(
                f"{type(pl_module).__name__} uses manual optimization (automatic_optimization = False), "
                "so its training_step cannot serve as the ProsPr loss: define "
                "`prospr_loss(self, batch, batch_idx) -> Tensor` on the module."
            )
        self.precision = trainer.precision_plugin
        self.on_call = on_call
        self.source = "prospr_loss" if self.custom else "training_step"

    def __call__(self, model: Any, item: tuple[int, Any]) -> Any:
        batch_idx, batch = item
        if self.on_call is not None:
            self.on_call()
        with self.precision.train_step_context():
            return (
                model.prospr_loss(batch, batch_idx) if self.custom else model.training_step(batch, batch_idx)
            )
