"""Which Lightning strategies the callback supports, and how ranks agree on one set of masks."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

__all__ = ["agree_on_masks", "check_strategy", "sum_over_ranks"]


def check_strategy(strategy: Any) -> None:
    """Refuse, before any work, the strategies that shard the parameters (FSDP, DeepSpeed,
    ModelParallel): scoring substitutes whole parameters into the module, which a sharded module
    does not hold, and FSDP cannot differentiate twice (full and recompute mode)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

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
