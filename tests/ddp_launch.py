"""``strategy="ddp"`` (Lightning's subprocess launcher) on CPU with 2 processes, run as a script by
tests/test_ddp.py: Lightning starts rank 1 by running this same command again. Each rank saves the
masks it applied to ``<folder>/rank<r>.pt``."""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch
from test_ddp import DDPNet, SaveMasks

from lightning_prospr import ProsprPruningCallback

if __name__ == "__main__":
    folder = sys.argv[1]
    torch.manual_seed(0)
    model = DDPNet()
    pruning = ProsprPruningCallback(sparsity=0.8, steps=3, verbose=False)
    pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        limit_train_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[pruning, SaveMasks(pruning, folder)],
    ).fit(model)
