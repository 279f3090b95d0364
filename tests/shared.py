"""Helpers the test files share (fixtures are in conftest.py)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

F = nn.functional


def ce_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Cross-entropy of `model(batch[0])` against `batch[1]`: the loss of most tests."""
    return F.cross_entropy(model(batch[0]), batch[1])


def quiet_trainer(callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or summary (`kwargs` override)."""
    options: dict[str, Any] = dict(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    options.update(kwargs)
    return pl.Trainer(**options)
