"""A generic classifier and torchvision data modules, shared by the CLI examples and the benchmarks.

Nothing here knows about pruning: ProsPr is switched on from the Trainer's callbacks.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, random_split
from torchmetrics.classification import MulticlassAccuracy

F = nn.functional


class Classifier(pl.LightningModule):
    """Cross-entropy classification of any ``net``, SGD with momentum, step decay at fractions of training.

    Args:
        net: the network (``class_path``/``init_args`` in a config, e.g.
            ``lightning_prospr.models.ResNet20``).
        num_classes: number of classes, for the accuracy metrics.
        lr, momentum, weight_decay, nesterov: SGD settings.
        milestones: fractions of ``max_epochs`` at which the learning rate is multiplied by ``gamma``
            (the paper's CIFAR recipe: 0.5 and 0.75 with gamma 0.1).
        gamma: learning-rate decay factor.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int = 10,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        milestones: list[float] | None = None,
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.milestones = [0.5, 0.75] if milestones is None else list(milestones)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(),
            lr=hp.lr,
            momentum=hp.momentum,
            weight_decay=hp.weight_decay,
            nesterov=hp.nesterov,
        )
        epochs = max(1, self.trainer.max_epochs or 1)
        steps = sorted({max(1, round(f * epochs)) for f in self.milestones})
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=steps, gamma=hp.gamma)
        return [optimizer], [scheduler]


class _SplitDataModule(pl.LightningDataModule):
    """Train/validation split of a training set (fixed seed) plus the official test set."""

    def __init__(self, batch_size: int, val_size: int, num_workers: int, seed: int) -> None:
        super().__init__()
        self.batch_size, self.val_size, self.num_workers, self.seed = batch_size, val_size, num_workers, seed

    def _datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        """(train with augmentation, train without augmentation, test)."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        train_aug, train_plain, test = self._datasets()
        n = len(train_plain)  # type: ignore[arg-type]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        val_idx, train_idx = order[: self.val_size].tolist(), order[self.val_size :].tolist()
        self.train_set = torch.utils.data.Subset(train_aug, train_idx)
        self.val_set = torch.utils.data.Subset(train_plain, val_idx) if self.val_size else None
        self.test_set = test

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, shuffle=False) if self.val_set is not None else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


class MNISTDataModule(_SplitDataModule):
    """MNIST from torchvision's layout under ``root`` (``root/MNIST/raw/*.gz``), never downloaded.

    The ``.gz`` files are copied to ``cache_dir`` (default ``~/.cache/lightning_prospr``) and extracted
    there by torchvision, which checks their MD5 sums and needs no network when they are present.
    """

    def __init__(
        self,
        root: str = "../shared/data",
        batch_size: int = 128,
        val_size: int = 5000,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(batch_size, val_size, num_workers, seed)
        self.root = root
        self.cache_dir = cache_dir

    def _datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        from torchvision import datasets, transforms

        raw = Path(self.root) / "MNIST" / "raw"
        if not raw.is_dir():
            raise FileNotFoundError(
                f"MNIST not found: {raw} does not exist; pass --data.root pointing at it."
            )
        cache = Path(self.cache_dir or Path.home() / ".cache" / "lightning_prospr")
        (cache / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
        for gz in raw.glob("*.gz"):
            target = cache / "MNIST" / "raw" / gz.name
            if not target.exists():
                shutil.copy(gz, target)
        tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
        train = datasets.MNIST(str(cache), train=True, download=True, transform=tf)
        test = datasets.MNIST(str(cache), train=False, download=True, transform=tf)
        return train, train, test


class CIFAR10DataModule(_SplitDataModule):
    """CIFAR-10 from ``root/cifar-10-batches-py`` (never downloaded); random crop and flip for training."""

    def __init__(
        self,
        root: str = "../shared/data",
        batch_size: int = 256,
        val_size: int = 5000,
        num_workers: int = 2,
        seed: int = 0,
        augment: bool = True,
    ) -> None:
        super().__init__(batch_size, val_size, num_workers, seed)
        self.root = root
        self.augment = augment

    def _datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        from torchvision import datasets, transforms

        if not (Path(self.root) / "cifar-10-batches-py").is_dir():
            raise FileNotFoundError(
                f"CIFAR-10 not found under {self.root!r} (cifar-10-batches-py); "
                "pass --data.root pointing at it."
            )
        norm = transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
        plain = transforms.Compose([transforms.ToTensor(), norm])
        aug = transforms.Compose(
            [
                transforms.RandomCrop(32, padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                norm,
            ]
        )
        train_aug = datasets.CIFAR10(
            self.root, train=True, download=False, transform=aug if self.augment else plain
        )
        train_plain = datasets.CIFAR10(self.root, train=True, download=False, transform=plain)
        test = datasets.CIFAR10(self.root, train=False, download=False, transform=plain)
        return train_aug, train_plain, test


__all__ = ["CIFAR10DataModule", "Classifier", "MNISTDataModule", "random_split"]
