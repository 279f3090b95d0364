"""Prune a small CNN at initialization with ProsPr, then train it: no download, CPU, under a minute.

Data: scikit-learn's handwritten digits (1,797 8x8 images, 10 classes), which ship inside the
scikit-learn package. Run::

    python examples/digits.py                 # 90% sparsity, ProsPr M=3
    python examples/digits.py --sparsity 0.98 --method snip   # SNIP at 98%
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_prospr import ProsprPruningCallback


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's 8x8 digits as 1x8x8 float images in [0, 1]; a fixed stratified split."""

    def __init__(self, batch_size: int = 64, test_fraction: float = 0.2, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.test_fraction = test_fraction
        self.seed = seed

    def setup(self, stage: str) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(data.target, dtype=torch.long)
        idx_train, idx_test = train_test_split(
            torch.arange(len(y)).numpy(), test_size=self.test_fraction, random_state=self.seed, stratify=y
        )
        self.train_set = TensorDataset(x[idx_train], y[idx_train])
        self.test_set = TensorDataset(x[idx_test], y[idx_test])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256)


class DigitsNet(nn.Sequential):
    """Two conv blocks with BatchNorm and a two-layer classifier for 1x8x8 inputs; 52k prunable weights."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 32),
            nn.ReLU(),
            nn.Linear(32, num_classes),
        )


class DigitsCNN(pl.LightningModule):
    """A plain LightningModule around :class:`DigitsNet`: nothing in it knows about pruning."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = DigitsNet()
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=5e-4)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.max_epochs)
        return [optimizer], [scheduler]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sparsity", type=float, default=0.9, help="fraction of weights removed")
    parser.add_argument("--method", default="prospr", help="prospr, or a baseline: snip, grasp, synflow, ...")
    parser.add_argument("--steps", type=int, default=3, help="ProsPr inner steps M")
    parser.add_argument("--mode", default="full", help="ProsPr: full, first_order or recompute")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", default="lightning_logs")
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed, verbose=False)
    pruning = ProsprPruningCallback(
        sparsity=args.sparsity, method=args.method, steps=args.steps, mode=args.mode
    )
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="auto",
        devices=1,
        callbacks=[pruning],
        logger=CSVLogger(args.log_dir, name="digits"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    model, data = DigitsCNN(), DigitsDataModule(seed=args.seed)
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    test_acc = trainer.test(model, datamodule=data, verbose=False)[0]["test_acc"]
    assert pruning.report is not None
    result = {
        "test_acc": test_acc,
        "sparsity": pruning.report.sparsity,
        "scoring_seconds": pruning.report.seconds,
        "total_seconds": time.perf_counter() - start,
    }
    print(
        f"test accuracy {100 * test_acc:.2f} % at {100 * result['sparsity']:.2f} % sparsity "
        f"(scoring {result['scoring_seconds']:.2f} s, total {result['total_seconds']:.1f} s)"
    )
    return result


if __name__ == "__main__":
    main()
