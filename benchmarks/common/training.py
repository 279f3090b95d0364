"""One fixed training recipe, in a plain PyTorch loop, and top-1 accuracy."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.data import Data, Split, augment_batch, load_data

__all__ = ["Recipe", "Worker", "evaluate", "start_worker", "train"]


@dataclass(frozen=True)
class Recipe:
    """The fixed training recipe: SGD with momentum and a schedule over ``epochs`` epochs.

    ``schedule="onecycle"``: :class:`~torch.optim.lr_scheduler.OneCycleLR` (peak ``lr``, linear
    warm-up over ``warmup`` of the steps from ``lr / 25``, linear decay, momentum fixed), stepped
    every batch. ``schedule="step"``: ``lr`` times 0.1 at each fraction in ``milestones`` of the
    epochs, stepped every epoch. ``precision="bf16"``: the forward pass and loss under bfloat16
    autocast (weights, gradients and optimizer in float32); evaluation is always float32.
    """

    epochs: int
    lr: float
    batch_size: int
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "onecycle"
    warmup: float = 0.25
    milestones: tuple[float, ...] = (0.5, 0.75)
    precision: str = "32"

    def describe(self) -> str:
        """A short string that identifies the recipe (part of a run's key in the CSV)."""
        sched = (
            f"onecycle(warmup={self.warmup})"
            if self.schedule == "onecycle"
            else "step(x0.1@" + ",".join(f"{m:g}" for m in self.milestones) + ")"
        )
        return (
            f"sgd lr={self.lr:g} m={self.momentum:g} wd={self.weight_decay:g} b={self.batch_size} "
            f"e={self.epochs} {sched}" + (f" {self.precision}" if self.precision != "32" else "")
        )


@dataclass(frozen=True)
class Worker:
    """What every run of a process shares: the data (loaded once per process), recipe, device."""

    data: Data
    recipe: Recipe
    device: torch.device
    max_steps: int | None


def start_worker(
    dataset: str,
    root: Path,
    limit: int | None,
    recipe: Recipe,
    device: str,
    threads: int,
    max_steps: int | None,
) -> Worker:
    """Load the data once per process and fix the thread count (a `common.runner` setup)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        torch.set_num_threads(max(1, threads))
    data = load_data(dataset, root, limit)
    if dev.type != "cpu":  # whole splits on the accelerator: batches and augmentation never leave it
        data = replace(data, train=data.train.to(dev), val=data.val.to(dev), test=data.test.to(dev))
    return Worker(data, recipe, dev, max_steps)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, device: torch.device, batch_size: int = 1000) -> float:
    """Top-1 accuracy (%) of ``model`` on ``split``, in eval mode."""
    model.eval()
    correct = 0
    for start in range(0, len(split), batch_size):
        x = split.x[start : start + batch_size].to(device)
        y = split.y[start : start + batch_size].to(device)
        correct += int((model(x).argmax(dim=1) == y).sum())
    return 100.0 * correct / max(1, len(split))


def train(
    model: nn.Module,
    data: Data,
    recipe: Recipe,
    seed: int,
    device: torch.device,
    max_steps: int | None = None,
) -> float:
    """Train ``model`` in place with ``recipe``; returns the final training loss.

    The final loss is the mean cross-entropy of the last ``min(100, steps)`` steps. Batches are a
    new permutation of the training split each epoch (from a generator seeded with ``seed``); the
    last incomplete batch is dropped. ``max_steps`` stops early (smoke tests).
    """
    optimizer = torch.optim.SGD(
        model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    per_epoch = len(data.train) // recipe.batch_size
    if per_epoch == 0:
        raise ValueError(
            f"the training split ({len(data.train)}) is smaller than a batch ({recipe.batch_size})."
        )
    total = per_epoch * recipe.epochs if max_steps is None else min(max_steps, per_epoch * recipe.epochs)
    scheduler: torch.optim.lr_scheduler.LRScheduler
    if recipe.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=recipe.lr,
            total_steps=total,
            pct_start=recipe.warmup,
            anneal_strategy="linear",
            cycle_momentum=False,
        )
    elif recipe.schedule == "step":
        milestones = sorted({max(1, round(f * recipe.epochs)) for f in recipe.milestones})
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    else:
        raise ValueError(f"unknown schedule {recipe.schedule!r}")
    generator = torch.Generator().manual_seed(seed)
    losses: list[Tensor] = []
    step = 0
    model.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(data.train), generator=generator).to(data.train.x.device)
        for b in range(per_epoch):
            idx = order[b * recipe.batch_size : (b + 1) * recipe.batch_size]
            x, y = data.train.x[idx], data.train.y[idx]
            if data.augment:
                x = augment_batch(x, generator)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.precision == "bf16"):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            if recipe.schedule == "onecycle":
                scheduler.step()
            losses.append(loss.detach())
            step += 1
            if max_steps is not None and step >= max_steps:
                break
        if recipe.schedule == "step":
            scheduler.step()
        if max_steps is not None and step >= max_steps:
            break
    return float(torch.stack(losses[-100:]).float().mean())
