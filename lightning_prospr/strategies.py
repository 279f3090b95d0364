"""Which Lightning strategies the callback supports, and how ranks agree on one set of masks."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_prospr.compat import ddp_start_method

__all__ = ["agree_on_masks", "check_strategy", "rebuild_after_shrink", "sum_over_ranks"]


def check_strategy(strategy: Any, shrink: bool = False) -> None:
    """Refuse, before any work, the strategies that shard the parameters (FSDP, DeepSpeed,
    ModelParallel): scoring substitutes whole parameters into the module, which a sharded module
    does not hold, and FSDP cannot differentiate twice (full and recompute mode). With `shrink`,
    refuse the spawn and fork launchers too: they load the trained weights back into the main
    process's module, which is still the dense one."""
    from lightning.pytorch.strategies import (
        DDPStrategy,
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
    )

    if shrink and isinstance(strategy, DDPStrategy) and ddp_start_method(strategy) != "popen":
        raise MisconfigurationException(
            "shrink=True with the spawn launcher (strategy='ddp_spawn', 'ddp_fork', 'ddp_notebook') is not "
            "supported: the launcher loads the trained, shrunk weights back into the main process's dense "
            "module. Use strategy='ddp'."
        )

    if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
        raise MisconfigurationException(
            f"ProsprPruningCallback does not support {type(strategy).__name__}: it shards the parameters, "
            "and scoring needs each rank to hold whole ones (FSDP also cannot differentiate twice, which "
            "full and recompute mode do). Supported: a single device and DDP (strategy='ddp', "
            "'ddp_spawn', 'ddp_fork', ...), in every mode: train the pruned model with one of them."
        )


def sum_over_ranks(trainer: pl.Trainer) -> Any:
    """The score hook: each rank's scores summed over all ranks (the identity on one device)."""

    def hook(scores: dict[str, Tensor]) -> dict[str, Tensor]:
        if trainer.world_size == 1:
            return scores
        return {n: trainer.strategy.reduce(v, reduce_op="sum") for n, v in scores.items()}

    return hook


def agree_on_masks(trainer: pl.Trainer, masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rank 0's masks on every rank, so that they agree exactly even where float sums differ."""
    return trainer.strategy.broadcast(masks, src=0) if trainer.world_size > 1 else masks


def rebuild_after_shrink(trainer: pl.Trainer) -> None:
    """The module's parameters were replaced by smaller ones: DDP wraps it again (its reducer holds
    the old ones), and the strategy makes the optimizers and schedulers again, which runs the
    module's `configure_optimizers` on the shrunk module."""
    from torch.nn.parallel import DistributedDataParallel

    strategy = trainer.strategy
    if isinstance(strategy.model, DistributedDataParallel):
        configure = getattr(strategy, "configure_ddp", None)
        if configure is None:
            raise MisconfigurationException(
                f"{type(strategy).__name__} wraps the module in DistributedDataParallel but has no "
                "configure_ddp() to wrap the shrunk module again; use strategy='ddp' with shrink=True."
            )
        strategy.model = strategy.model.module
        configure()
    strategy.setup_optimizers(trainer)
    strategy.setup_precision_plugin()
