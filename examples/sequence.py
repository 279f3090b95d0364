"""ProsPr on a sequence model: nothing in the callback is vision-specific.

A small Transformer encoder (``lightning_prospr.models.TinyTransformerEncoder``: embeddings,
self-attention, feed-forward layers) learns a synthetic token task that needs the whole sequence:
is the first half's sum of token ids larger than the second half's? The data are generated on the
fly from a seed, so the example runs anywhere. Full-mode ProsPr differentiates twice through the
attention layers (the engine switches attention to its math backend for that).

    python examples/sequence.py                # 90% of the Linear weights removed
    python examples/sequence.py --sparsity 0.95
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_prospr import ProsprPruningCallback
from lightning_prospr.models import TinyTransformerEncoder


def half_sums(count: int, length: int, vocab: int, seed: int) -> TensorDataset:
    """Random token sequences labelled 1 when the first half's ids sum higher than the second's."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (count, length), generator=gen)
    half = length // 2
    labels = (tokens[:, :half].sum(1) > tokens[:, half:].sum(1)).long()
    return TensorDataset(tokens, labels)


class SequenceClassifier(pl.LightningModule):
    """Cross-entropy on a TinyTransformerEncoder; AdamW. It knows nothing about pruning."""

    def __init__(self, vocab: int = 32, length: int = 16, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = TinyTransformerEncoder(
            vocab, d_model=32, nhead=4, num_layers=2, num_classes=2, max_len=length
        )
        self.test_acc = MulticlassAccuracy(num_classes=2, average="micro")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)

    def training_step(self, batch, batch_idx):
        tokens, labels = batch
        loss = nn.functional.cross_entropy(self(tokens), labels)
        self.log("train_loss", loss)
        return loss

    def test_step(self, batch, batch_idx):
        tokens, labels = batch
        self.test_acc(self(tokens), labels)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", default="lightning_logs")
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    train = DataLoader(half_sums(4096, 16, 32, seed=args.seed), batch_size=64, shuffle=True)
    test = DataLoader(half_sums(1024, 16, 32, seed=args.seed + 1), batch_size=256)
    pruning = ProsprPruningCallback(sparsity=args.sparsity)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="auto",
        devices=1,
        callbacks=[pruning],
        default_root_dir=args.log_dir,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = SequenceClassifier()
    trainer.fit(model, train_dataloaders=train)
    test_acc = trainer.test(model, dataloaders=test, verbose=False)[0]["test_acc"]
    assert pruning.report is not None
    print(f"test accuracy {100 * test_acc:.2f} % at {100 * pruning.report.sparsity:.2f} % sparsity")
    return {"test_acc": test_acc, "sparsity": pruning.report.sparsity}


if __name__ == "__main__":
    main()
