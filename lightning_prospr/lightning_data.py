"""Where the callback's scoring batches come from: the fit's own train dataloader, split by rank and
moved to the device as the fit loop moves batches."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_prospr.batches import cycled
from lightning_prospr.compat import before_batch_transfer, train_data_source
from lightning_prospr.pipeline import example_input_of

__all__ = ["draw_batches", "example_input", "first_batch_on"]


def _train_dataloader(trainer: pl.Trainer) -> Any:
    """The train dataloader(s) of whichever source this fit uses (datamodule, module or `fit` arg)."""
    source = train_data_source(trainer)
    if source is None or not source.is_defined():
        raise MisconfigurationException(
            "ProsprPruningCallback found no train dataloader: pass `train_dataloaders` or a "
            "`datamodule` to `Trainer.fit`, or define `train_dataloader` on the module."
        )
    return source.dataloader()


def _iter_batches(loader: Any) -> Iterable[Any]:
    """Batches of a loader, or of a collection of loaders combined the way the fit loop does."""
    if isinstance(loader, (Mapping, list, tuple)):
        combined = CombinedLoader(loader, mode="max_size_cycle")
        return (batch for batch, _, _ in combined)
    return loader


def draw_batches(trainer: pl.Trainer, pl_module: pl.LightningModule, count: int) -> list[tuple[int, Any]]:
    """`count` batches for this rank, as `(index, batch)` on the device: rank r of W takes batches
    r, r + W, ... of the loader (cycled when it has fewer), each through `convert_input`,
    `on_before_batch_transfer` and the strategy's `batch_to_device`, like the fit loop's."""
    loader = _train_dataloader(trainer)
    rank, world = trainer.global_rank, trainer.world_size
    raw = list(itertools.islice(_iter_batches(loader), rank, rank + world * count, world))
    if not raw:
        raise MisconfigurationException(
            f"The train dataloader gave no batch for ProsPr scoring on rank {rank}; it needs "
            f"at least {world} batch(es) ({count} per rank wanted; fewer are cycled)."
        )
    moved = []
    for i, batch in enumerate(cycled(raw, count)):
        batch = trainer.precision_plugin.convert_input(batch)
        batch = before_batch_transfer(pl_module, batch)
        batch = trainer.strategy.batch_to_device(batch, dataloader_idx=0)
        moved.append((i, batch))
    return moved


def first_batch_on(trainer: pl.Trainer, pl_module: pl.LightningModule, device: Any) -> tuple[int, Any]:
    """The loader's first batch as `(0, batch)` on `device` (where the module is before the
    strategy moves it: the resume of a shrunk run traces the module in `setup`)."""
    from lightning.pytorch.utilities import move_data_to_device

    batch = next(iter(_iter_batches(_train_dataloader(trainer))))
    batch = trainer.precision_plugin.convert_input(batch)
    return 0, move_data_to_device(before_batch_transfer(pl_module, batch), device)


def example_input(pl_module: pl.LightningModule, batch: Any) -> Tensor | None:
    """The model's input for the data-free SynFlow: `example_input_array`, else the batch's first tensor."""
    example = getattr(pl_module, "example_input_array", None)
    if isinstance(example, Tensor):
        return example.to(pl_module.device)
    return example_input_of(batch)
