"""Helpers the test files share (fixtures are in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
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


def run_ddp_script(script: str, folder: Path) -> list[dict[str, torch.Tensor]]:
    """Run `tests/<script>` (a `strategy="ddp"` fit with 2 CPU processes: under pytest the launcher
    would re-run pytest itself) in `folder`, and load the state each rank saved there."""
    path = Path(__file__).with_name(script)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path.parent), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(path), str(folder)], check=True, timeout=300, env=env, cwd=folder)
    return [torch.load(folder / f"rank{r}.pt") for r in range(2)]
