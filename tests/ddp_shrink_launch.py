"""``strategy="ddp"`` on CPU with 2 processes and ``shrink=True``, run as a script by
tests/test_shrink_callback.py (Lightning starts rank 1 by running this same command again). Each
rank saves its module's state after training to ``<folder>/rank<r>.pt``."""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch
from test_shrink_callback import ConvNet

from lightning_prospr import ProsprPruningCallback


class Save(pl.Callback):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_end(self, trainer, pl_module):
        torch.save(pl_module.state_dict(), f"{self.folder}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    torch.manual_seed(0)
    pruning = ProsprPruningCallback(sparsity=0.5, method="snip", structured=True, shrink=True, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[pruning, Save(sys.argv[1])],
    )  # fmt: skip
    trainer.fit(ConvNet())
