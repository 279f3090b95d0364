"""Shrink inside a fit: remove the pruned channels, let the strategy rebuild around the small module,
and, when resuming, shrink the fresh dense module before the checkpoint's small tensors load."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from lightning_prospr.lightning_data import draw_batches, first_batch_on
from lightning_prospr.lightning_loss import ModuleLoss, logging_disabled
from lightning_prospr.rng import isolated_rng
from lightning_prospr.shrinking import shrink
from lightning_prospr.strategies import rebuild_after_shrink

__all__ = ["check_shrink_options", "shrink_before_load", "shrink_in_fit", "stop_shrink_before_load"]


def check_shrink_options(shrink: bool, structured: bool, make_permanent: bool) -> None:
    """The callback's options that `shrink=True` needs or excludes."""
    if shrink and not structured:
        raise ValueError(
            "`shrink=True` removes pruned channels, which only structured masks have: pass structured=True."
        )
    if shrink and make_permanent:
        raise ValueError(
            "`make_permanent` does not apply with shrink=True: a shrunk network carries no masks."
        )


def _shrink_module(
    trainer: pl.Trainer, pl_module: pl.LightningModule, channel_masks: dict[str, Tensor], batch: Any
) -> None:
    with isolated_rng(), logging_disabled(pl_module):
        shrink(pl_module, channel_masks, example_input=batch, loss_fn=ModuleLoss(trainer, pl_module))


def shrink_in_fit(
    trainer: pl.Trainer, pl_module: pl.LightningModule, channel_masks: dict[str, Tensor]
) -> tuple[int, int]:
    """Remove the pruned channels (traced on one training batch), then let the strategy make the
    optimizers (and the DDP wrapper) anew. Returns the parameter counts before and after."""
    with isolated_rng():
        batch = draw_batches(trainer, pl_module, 1)[0]
    before = sum(p.numel() for p in pl_module.parameters())
    _shrink_module(trainer, pl_module, channel_masks, batch)
    rebuild_after_shrink(trainer)
    return before, sum(p.numel() for p in pl_module.parameters())


def shrink_before_load(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    state_key: str,
    on_shrunk: Callable[[dict[str, Tensor]], None],
) -> None:
    """Resuming a shrunk run: Lightning hands the checkpoint to the module's `on_load_checkpoint`
    before it loads the (small) tensors into the (fresh, dense) module. Until
    [`stop_shrink_before_load`][lightning_prospr.lightning_shrink.stop_shrink_before_load], that hook
    first shrinks the module as the checkpoint's was (the callback state under `state_key` holds the
    channel masks), calls `on_shrunk(channel_masks)`, then runs the module's own hook."""
    own = pl_module.on_load_checkpoint

    def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("callbacks", {}).get(state_key, {})
        if "channel_masks" in state:
            channel_masks = {n: m.bool() for n, m in state["channel_masks"].items()}
            with isolated_rng(), logging_disabled(pl_module):
                batch = first_batch_on(trainer, pl_module, next(pl_module.parameters()).device)
            _shrink_module(trainer, pl_module, channel_masks, batch)
            on_shrunk(channel_masks)
        own(checkpoint)

    pl_module.on_load_checkpoint = on_load_checkpoint  # type: ignore[method-assign]


def stop_shrink_before_load(pl_module: pl.LightningModule) -> None:
    """Remove the hook of `shrink_before_load` (the module's own `on_load_checkpoint` is back)."""
    pl_module.__dict__.pop("on_load_checkpoint", None)
