"""LightningCLI entry point: any Classifier + data module, ProsPr switched on from the command line.

    python examples/cli.py fit --config examples/configs/digits.yaml
    python examples/cli.py fit --config examples/configs/mnist_lenet5.yaml --data.root ../shared/data
    python examples/cli.py fit --config examples/configs/cifar10_resnet20.yaml --data.root ../shared/data

or with flags only:

    python examples/cli.py fit --data DigitsDataModule --model.net digits.DigitsNet \\
        --trainer.callbacks+=lightning_prospr.ProsprPruningCallback --trainer.callbacks.sparsity=0.98
"""

from __future__ import annotations

import lightning.pytorch as pl
from classification import CIFAR10DataModule, Classifier, MNISTDataModule  # noqa: F401 (CLI names)
from digits import DigitsDataModule, DigitsNet  # noqa: F401 (CLI names)
from lightning.pytorch.cli import LightningCLI

import lightning_prospr  # noqa: F401 (so the short name ProsprPruningCallback resolves too)


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(
        Classifier,
        pl.LightningDataModule,
        subclass_mode_data=True,
        args=args,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
