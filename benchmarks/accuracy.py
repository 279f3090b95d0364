"""Accuracy of pruned networks: model x data set x method x sparsity x seed, one fixed training recipe.

Run from the repository root::

    python benchmarks/accuracy.py --study --jobs 2         # ProsPr settings on the validation split
    python benchmarks/accuracy.py --study-rounds --jobs 2 --prospr-steps 1 --prospr-batches reuse
                                                           # rounds of prospr-iter, same split
    python benchmarks/accuracy.py --jobs 2 --prospr-steps 1 --prospr-batches reuse --prospr-rounds 100
                                                           # the MNIST grid (CPU, 246 runs, ~35 min)
    python benchmarks/accuracy.py --grid cifar10           # ResNet-20 and VGG-16-BN, 200 epochs (GPU)
    python benchmarks/accuracy.py --quick --out-dir /tmp/q # smoke test (seconds)

Each run builds the model with ``torch.manual_seed(seed)`` (so every method of a seed prunes the same
initial weights), scores it with :func:`lightning_prospr.pipeline.compute_masks` on batches of the
training split (loss = cross-entropy, ``example_input`` = the batch's images, the default
layer-collapse guard), registers the masks with :func:`lightning_prospr.masking.apply_masks`,
trains with one fixed recipe in a plain PyTorch loop, checks that the effective weights
(``weight_orig * weight_mask``) of the pruned positions are exactly zero, and evaluates on the
official test set (and on the validation split).

Methods: ``dense`` (no pruning), ``random``, ``magnitude``, ``snip``, ``grasp``, ``synflow``
(iterative, 100 rounds), ``prospr`` (full meta-gradients, one shot as in the paper), ``prospr-fo``
(first order) and ``prospr-iter`` (full ProsPr in ``--prospr-rounds`` rounds on an exponential
density schedule, re-scoring the masked network each round, like iterative SynFlow). Every Linear
and Conv weight is scored and pruned (the default parameter set), the classifier included.

Data (never downloaded, read from ``--data-root``, default ``../shared/data`` from the repository):

* MNIST: the four original ``MNIST/raw/*.gz`` files, parsed directly into tensors once and
  normalized as ``ToTensor()`` + ``Normalize((0.1307,), (0.3081,))`` would.
* CIFAR-10: ``cifar-10-batches-py``, normalized with the usual per-channel mean and std; training
  batches get a random 32x32 crop of the 4-pixel zero-padded image and a random horizontal flip.

Both keep the **last 5,000 training images as a validation split**; training and scoring use the
other 55,000 (MNIST) or 45,000 (CIFAR-10), hyperparameter choices (``--study``) look only at the
validation split, and the reported accuracy is on the official 10,000-image test set.

Recipes (``--epochs``, ``--lr``, ``--batch-size``, ``--weight-decay`` override them):

* ``mnist``: SGD, momentum 0.9, no weight decay, batch 128, 2 epochs, one-cycle learning rate
  (:class:`torch.optim.lr_scheduler.OneCycleLR`: linear warm-up from 0.004 to 0.1 over the first
  25 % of the steps, then linear decay to 4e-7, momentum fixed).
* ``cifar10``: the paper's, SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 256, 200 epochs,
  learning rate x 0.1 at 50 % and 75 % of the epochs.

Outputs, in ``--out-dir``: ``results.csv`` (one row per run; the grid is resumable: runs already in
it, with the same recipe and scoring settings, are skipped), ``results.md`` (mean ± std over seeds,
rows = method, columns = sparsity, one table per model) and ``accuracy_vs_sparsity.png`` (test
accuracy against density ``1 - sparsity`` on a log axis, one line per method with error bars, the
dense accuracy as a horizontal band mean ± std). ``--study`` writes ``study.csv`` and ``study.md``.
``--render`` only re-renders the table and plot from the CSV.

The ProsPr defaults here (``M=3``, lr 0.1, a new batch per step) are the paper's; the MNIST grid
reported in ``docs/results.md`` used ``M=1``, lr 0.1 and one reused batch, the setting picked by
``--study`` on the validation split, and 100 rounds for ``prospr-iter``, picked by
``--study-rounds``.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import os
import pickle
import platform
import shlex
import statistics
import sys
import time
import types
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = ROOT.parent / "shared" / "data"

METHODS = ("dense", "random", "magnitude", "snip", "grasp", "synflow", "prospr", "prospr-fo", "prospr-iter")
#: The ProsPr variants (they share the ``--prospr-*`` scoring settings).
PROSPR_METHODS = ("prospr", "prospr-fo", "prospr-iter")
SPARSITIES = (0.9, 0.98, 0.99, 0.995, 0.998)
MODELS = ("lenet300100", "lenet5", "resnet20", "vgg16bn")
DATASET_OF = {"lenet300100": "mnist", "lenet5": "mnist", "resnet20": "cifar10", "vgg16bn": "cifar10"}
GRIDS = {"mnist": ("lenet300100", "lenet5"), "cifar10": ("resnet20", "vgg16bn")}
MODEL_LABELS = {
    "lenet300100": "LeNet-300-100",
    "lenet5": "LeNet-5",
    "resnet20": "ResNet-20",
    "vgg16bn": "VGG-16-BN",
}
DATASET_LABELS = {"mnist": "MNIST", "cifar10": "CIFAR-10"}
VAL_SIZE = 5000

#: Columns of ``results.csv``, in order.
CSV_COLUMNS = (
    "model",
    "dataset",
    "method",
    "sparsity",
    "seed",
    "test_acc",
    "val_acc",
    "final_train_loss",
    "score_seconds",
    "train_seconds",
    "layer_density",
    "guard_changes",
    "actual_sparsity",
    "zeros_ok",
    "recipe",
    "scoring",
    "threads",
    "torch",
)
#: Columns that identify a run (a row with the same values is not run again).
KEY_COLUMNS = ("model", "dataset", "method", "sparsity", "seed", "recipe", "scoring")


# --------------------------------------------------------------------------------------------------
# The package, without its ``__init__`` (which imports Lightning: seconds per process, not needed).
# --------------------------------------------------------------------------------------------------


def _import_package() -> tuple[Any, Any, Any]:
    """``(pipeline, masking, models)`` modules of this checkout, skipping the package ``__init__``."""
    if "lightning_prospr" not in sys.modules:
        package = types.ModuleType("lightning_prospr")
        package.__path__ = [str(ROOT / "lightning_prospr")]
        sys.modules["lightning_prospr"] = package
    from lightning_prospr import masking, models, pipeline

    return pipeline, masking, models


# --------------------------------------------------------------------------------------------------
# Data: whole splits as tensors.
# --------------------------------------------------------------------------------------------------


@dataclass
class Split:
    """Images ``x`` (float32, normalized, NCHW) and labels ``y`` (int64) of one split."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.y.numel())

    def head(self, n: int) -> Split:
        return Split(self.x[:n], self.y[:n])

    def to(self, device: torch.device) -> Split:
        return Split(self.x.to(device), self.y.to(device))


@dataclass
class Data:
    """Train (without the validation images), validation and test splits of one data set."""

    name: str
    train: Split
    val: Split
    test: Split
    augment: bool = False


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped: big-endian dims, then uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_mnist(root: Path) -> Data:
    """MNIST from ``root/MNIST/raw/*.gz``; pixels as ``ToTensor()`` then ``Normalize(0.1307, 0.3081)``."""
    raw = root / "MNIST" / "raw"
    if not raw.is_dir():
        raise FileNotFoundError(f"MNIST not found: {raw} does not exist; pass --data-root pointing at it.")

    def split(prefix: str) -> Split:
        images = torch.from_numpy(_read_idx(raw / f"{prefix}-images-idx3-ubyte.gz").copy())
        labels = torch.from_numpy(_read_idx(raw / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))
        x = (images.float().div_(255.0).sub_(0.1307).div_(0.3081)).unsqueeze(1)
        return Split(x.contiguous(), labels)

    train, test = split("train"), split("t10k")
    n = len(train) - VAL_SIZE
    return Data(
        "mnist", Split(train.x[:n], train.y[:n]), Split(train.x[n:], train.y[n:]), test, augment=False
    )


CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def load_cifar10(root: Path) -> Data:
    """CIFAR-10 from ``root/cifar-10-batches-py``, normalized per channel; training batches augmented."""
    folder = root / "cifar-10-batches-py"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"CIFAR-10 not found: {folder} does not exist; pass --data-root pointing at it."
        )

    def read(names: Sequence[str]) -> Split:
        xs, ys = [], []
        for name in names:
            with open(folder / name, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(entry["labels"], dtype=np.int64))
        x = torch.from_numpy(np.concatenate(xs)).float().div_(255.0)
        mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
        return Split(((x - mean) / std).contiguous(), torch.from_numpy(np.concatenate(ys)))

    train = read([f"data_batch_{i}" for i in range(1, 6)])
    test = read(["test_batch"])
    n = len(train) - VAL_SIZE
    return Data(
        "cifar10", Split(train.x[:n], train.y[:n]), Split(train.x[n:], train.y[n:]), test, augment=True
    )


def load_data(name: str, root: Path, limit: int | None = None) -> Data:
    """The data set ``name`` (``"mnist"`` or ``"cifar10"``); ``limit`` truncates every split (smoke tests)."""
    data = load_mnist(root) if name == "mnist" else load_cifar10(root)
    if limit is not None:
        data = replace(
            data, train=data.train.head(limit), val=data.val.head(limit), test=data.test.head(limit)
        )
    return data


def augment_batch(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random 32x32 crop of the 4-pixel zero-padded images and random horizontal flip, per image.

    The padding is 0 in normalized units, i.e. the data set's mean colour (torchvision pads the raw
    image with black before normalizing; the difference is immaterial for the recipe).
    """
    n, c, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 9, (n,), generator=generator).to(x.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = dx[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


# --------------------------------------------------------------------------------------------------
# Recipe, scoring settings, one run.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """The fixed training recipe: SGD with momentum and a schedule over ``epochs`` epochs.

    ``schedule="onecycle"``: :class:`~torch.optim.lr_scheduler.OneCycleLR` (peak ``lr``, linear
    warm-up over ``warmup`` of the steps from ``lr / 25``, linear decay, momentum fixed), stepped
    every batch. ``schedule="step"``: ``lr`` times 0.1 at each fraction in ``milestones`` of the
    epochs, stepped every epoch.
    """

    epochs: int
    lr: float
    batch_size: int
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "onecycle"
    warmup: float = 0.25
    milestones: tuple[float, ...] = (0.5, 0.75)

    def describe(self) -> str:
        """A short string that identifies the recipe (part of a run's key in the CSV)."""
        sched = (
            f"onecycle(warmup={self.warmup})"
            if self.schedule == "onecycle"
            else "step(x0.1@" + ",".join(f"{m:g}" for m in self.milestones) + ")"
        )
        return (
            f"sgd lr={self.lr:g} m={self.momentum:g} wd={self.weight_decay:g} b={self.batch_size} "
            f"e={self.epochs} {sched}"
        )


RECIPES = {
    "mnist": Recipe(epochs=2, lr=0.1, batch_size=128, momentum=0.9, weight_decay=0.0, schedule="onecycle"),
    "cifar10": Recipe(epochs=200, lr=0.1, batch_size=256, momentum=0.9, weight_decay=5e-4, schedule="step"),
}


@dataclass(frozen=True)
class Scoring:
    """How the masks are computed (shared by all methods; the ProsPr fields only matter to ProsPr).

    Attributes:
        batch_size: images per scoring batch, drawn from the training split.
        steps, lr: ProsPr's inner loop (``M`` and its SGD learning rate).
        reuse: one batch for every inner step and the final loss (``True``) or ``steps + 1`` new
            batches (``False``).
        synflow_rounds: rounds of iterative SynFlow.
        prospr_rounds: rounds of iterative ProsPr (``prospr-iter``), re-scoring the masked network
            on :func:`lightning_prospr.pipeline.density_schedule`.
        average: ProsPr scores averaged over this many independent unrolls, each on its own
            batches (``num_batches`` of :func:`lightning_prospr.pipeline.compute_masks`).
    """

    batch_size: int = 128
    steps: int = 3
    lr: float = 0.1
    reuse: bool = False
    synflow_rounds: int = 100
    prospr_rounds: int = 100
    average: int = 1

    def describe(self, method: str) -> str:
        """The settings that matter to ``method`` (part of a run's key in the CSV)."""
        if method in PROSPR_METHODS:
            text = f"M={self.steps} lr={self.lr:g} {'reuse' if self.reuse else 'new'} b={self.batch_size}"
            text += f" avg={self.average}" if self.average > 1 else ""
            return text + (f" rounds={self.prospr_rounds}" if method == "prospr-iter" else "")
        if method == "synflow":
            return f"rounds={self.synflow_rounds}"
        if method in ("snip", "grasp"):
            return f"b={self.batch_size}"
        return ""


@dataclass(frozen=True)
class RunSpec:
    """One cell of the grid."""

    model: str
    method: str
    sparsity: float
    seed: int

    @property
    def dataset(self) -> str:
        return DATASET_OF[self.model]


def build_model(name: str, seed: int) -> nn.Module:
    """The architecture ``name`` with weights from ``torch.manual_seed(seed)``."""
    _, _, models = _import_package()
    torch.manual_seed(seed)
    if name == "lenet300100":
        return models.LeNet300100()
    if name == "lenet5":
        return models.LeNet5()
    if name == "resnet20":
        return models.ResNet20()
    if name == "vgg16bn":
        return models.VGG16BN()
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Cross-entropy of the model on ``(images, labels)``."""
    return F.cross_entropy(model(batch[0]), batch[1])


def scoring_batches(data: Data, count: int, batch_size: int, seed: int, device: torch.device) -> list[Any]:
    """``count`` disjoint batches of the training split (no augmentation), chosen by ``seed``."""
    generator = torch.Generator().manual_seed(1_000_003 + seed)
    order = torch.randperm(len(data.train), generator=generator)[: count * batch_size]
    order = order.to(data.train.x.device)
    return [(data.train.x[idx].to(device), data.train.y[idx].to(device)) for idx in order.split(batch_size)]


def masks_for(
    model: nn.Module, spec: RunSpec, data: Data, scoring: Scoring, device: torch.device
) -> tuple[dict[str, Tensor], Any]:
    """``(masks, MaskResult)`` of ``spec.method`` at ``spec.sparsity``."""
    pipeline, _, _ = _import_package()
    method = spec.method
    kwargs: dict[str, Any] = {"seed": spec.seed}
    repeat = 1
    if method in PROSPR_METHODS:
        per_unroll = 1 if scoring.reuse else scoring.steps + 1
        count = per_unroll * scoring.average
        repeat = scoring.steps + 1 if scoring.reuse else 1  # an unroll draws M + 1 batches in order
        kwargs.update(method="prospr", steps=scoring.steps, lr=scoring.lr, first_order=method == "prospr-fo")
        kwargs.update(num_batches=scoring.average)
        if method == "prospr-iter":
            kwargs.update(rounds=scoring.prospr_rounds)
    elif method == "synflow":
        count = 1
        kwargs.update(method="synflow", rounds=scoring.synflow_rounds)
    else:
        count = 1
        kwargs.update(method=method)
    batches = scoring_batches(data, count, scoring.batch_size, spec.seed, device)
    batches = [b for b in batches for _ in range(repeat)]
    result = pipeline.compute_masks(
        model, loss_fn, batches, spec.sparsity, example_input=batches[0][0], **kwargs
    )
    return result.masks, result


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


def check_zeros(
    model: nn.Module, masks: dict[str, Tensor], sparsity: float
) -> tuple[bool, float, dict[str, float]]:
    """``(ok, actual sparsity, per-layer density)`` of the effective weights after training.

    ``ok``: the masks registered on the model are the ones computed, they remove exactly
    ``round(sparsity * N)`` of the ``N`` scored weights, and every removed position is exactly 0 in
    the effective weight (``weight_orig * weight_mask``, what the forward pass uses). The actual
    sparsity counts exact zeros of the effective weights over all scored weights (a kept weight
    that is exactly 0 by chance would count too).
    """
    from lightning_prospr.selection import pruned_count

    _, masking, _ = _import_package()
    registered = masking.current_masks(model)
    total_weights = sum(m.numel() for m in masks.values())
    removed = sum(int((~m.bool()).sum()) for m in masks.values())
    ok = removed == pruned_count(sparsity, total_weights)
    zeros = total = 0
    density: dict[str, float] = {}
    for name, mask in masks.items():
        effective = masking.effective_weight(model, name)
        ok &= name in registered and bool(torch.equal(registered[name].cpu(), mask.bool().cpu()))
        ok &= bool((effective[~mask.bool()] == 0).all())
        zeros += int((effective == 0).sum())
        total += effective.numel()
        density[name] = round(float(mask.float().mean()), 6)
    return ok, zeros / max(1, total), density


def run_one(
    spec: RunSpec,
    data: Data,
    recipe: Recipe,
    scoring: Scoring,
    device: torch.device,
    *,
    evaluate_test: bool = True,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Prune (unless dense), train and evaluate one run; returns its CSV row."""
    pipeline, masking, _ = _import_package()
    model = build_model(spec.model, spec.seed).to(device)
    guard: dict[str, Any] = {}
    score_seconds = 0.0
    if spec.method == "dense":
        names = pipeline.resolve_parameters(model, None)
        named = dict(model.named_parameters())
        masks = {n: torch.ones_like(named[n], dtype=torch.bool) for n in names}
    else:
        start = time.perf_counter()
        masks, result = masks_for(model, spec, data, scoring, device)
        score_seconds = time.perf_counter() - start
        guard = {"added": result.guard.added, "removed": result.guard.removed} if result.guard.changed else {}
        masking.apply_masks(model, masks)
    start = time.perf_counter()
    final_loss = train(model, data, recipe, spec.seed, device, max_steps=max_steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - start
    if spec.method == "dense":
        ok, actual, density = True, _dense_zeros(model, masks), {n: 1.0 for n in masks}
    else:
        ok, actual, density = check_zeros(model, masks, spec.sparsity)
    return {
        "model": spec.model,
        "dataset": spec.dataset,
        "method": spec.method,
        "sparsity": f"{spec.sparsity:g}",
        "seed": spec.seed,
        "test_acc": f"{evaluate(model, data.test, device):.2f}" if evaluate_test else "",
        "val_acc": f"{evaluate(model, data.val, device):.2f}",
        "final_train_loss": f"{final_loss:.4f}",
        "score_seconds": f"{score_seconds:.2f}",
        "train_seconds": f"{train_seconds:.2f}",
        "layer_density": json.dumps(density, separators=(",", ":")),
        "guard_changes": json.dumps(guard, separators=(",", ":")) if guard else "",
        "actual_sparsity": f"{actual:.6f}",
        "zeros_ok": str(ok),
        "recipe": recipe.describe(),
        "scoring": scoring.describe(spec.method),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _dense_zeros(model: nn.Module, masks: dict[str, Tensor]) -> float:
    """The fraction of exact zeros among the scored weights of an unpruned model."""
    named = dict(model.named_parameters())
    zeros = sum(int((named[n] == 0).sum()) for n in masks)
    total = sum(named[n].numel() for n in masks)
    return zeros / max(1, total)


# --------------------------------------------------------------------------------------------------
# CSV, grid, resuming.
# --------------------------------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a results CSV (empty when it does not exist)."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def row_key(row: dict[str, Any]) -> tuple[str, ...]:
    """The identity of a run: model, data set, method, sparsity, seed, recipe and scoring settings."""
    return tuple(str(row[c]) for c in KEY_COLUMNS)


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one row to ``path`` (writing the header first if the file is new), flushed at once."""
    new = not path.is_file() or path.stat().st_size == 0
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def grid(
    models: Sequence[str], methods: Sequence[str], sparsities: Sequence[float], seeds: Sequence[int]
) -> list[RunSpec]:
    """The runs, seed by seed (so an interrupted grid has complete seeds), dense once per seed."""
    specs = []
    for seed in seeds:
        for model in models:
            if "dense" in methods:
                specs.append(RunSpec(model, "dense", 0.0, seed))
            for sparsity in sparsities:
                specs.extend(RunSpec(model, m, sparsity, seed) for m in methods if m != "dense")
    return specs


# --------------------------------------------------------------------------------------------------
# Rendering: Markdown table and plot.
# --------------------------------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(
    rows: Iterable[dict[str, str]], metric: str = "test_acc"
) -> dict[tuple[str, str, float], list[float]]:
    """``{(model, method, sparsity): [metric of each seed]}``, skipping empty values."""
    out: dict[tuple[str, str, float], list[float]] = defaultdict(list)
    for row in rows:
        if row.get(metric, "") != "":
            out[(row["model"], row["method"], float(row["sparsity"]))].append(float(row[metric]))
    return out


def _ordered(values: Iterable[str], order: Sequence[str]) -> list[str]:
    found = set(values)
    return [v for v in order if v in found] + sorted(found - set(order))


def render_markdown(rows: Sequence[dict[str, str]], metric: str = "test_acc") -> str:
    """One table per model: rows = method, columns = sparsity, cells = mean ± std over seeds (%).

    The best mean of each column is in bold (ties included); a cell with fewer seeds than the most
    common count says how many it has. The dense accuracy heads the table.
    """
    stats = summarize(rows, metric)
    what = "test accuracy" if metric == "test_acc" else "validation accuracy"
    lines: list[str] = []
    for model in _ordered({k[0] for k in stats}, MODELS):
        dataset = DATASET_OF.get(model, "")
        cells = {k[1:]: v for k, v in stats.items() if k[0] == model}
        counts = [len(v) for v in cells.values()]
        usual = max(set(counts), key=counts.count) if counts else 0
        title = f"{MODEL_LABELS.get(model, model)} on {DATASET_LABELS.get(dataset, dataset)}"
        lines += [f"### {title}", ""]
        dense = cells.get(("dense", 0.0))
        if dense:
            mean, std = _mean_std(dense)
            lines += [f"Dense: **{mean:.2f} ± {std:.2f} %** ({len(dense)} seeds).", ""]
        sparsities = sorted({s for (m, s) in cells if m != "dense"})
        methods = _ordered({m for (m, _) in cells if m != "dense"}, METHODS)
        lines.append(f"Mean ± std {what} (%) over {usual} seeds; columns are sparsities.")
        lines.append("")
        lines.append("| method | " + " | ".join(f"{100 * s:g} %" for s in sparsities) + " |")
        lines.append("|---|" + "---:|" * len(sparsities))
        best = {
            s: max(statistics.fmean(cells[(m, s)]) for m in methods if (m, s) in cells) for s in sparsities
        }
        for method in methods:
            row = [method]
            for s in sparsities:
                values = cells.get((method, s))
                if not values:
                    row.append("-")
                    continue
                mean, std = _mean_std(values)
                text = f"{mean:.2f} ± {std:.2f}"
                if round(mean, 2) == round(best[s], 2):
                    text = f"**{text}**"
                if len(values) != usual:
                    text += f" (n={len(values)})"
                row.append(text)
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def render_timing(rows: Sequence[dict[str, str]]) -> str:
    """Mean scoring and training seconds per model and method (over sparsities and seeds)."""
    groups: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        groups[(row["model"], row["method"])].append(
            (float(row["score_seconds"]), float(row["train_seconds"]))
        )
    lines = ["| model | method | runs | scoring s (mean) | training s (mean) |", "|---|---|---:|---:|---:|"]
    for model in _ordered({k[0] for k in groups}, MODELS):
        for method in _ordered({k[1] for k in groups if k[0] == model}, METHODS):
            values = groups[(model, method)]
            lines.append(
                f"| {MODEL_LABELS.get(model, model)} | {method} | {len(values)} | "
                f"{statistics.fmean(v[0] for v in values):.2f} | "
                f"{statistics.fmean(v[1] for v in values):.1f} |"
            )
    return "\n".join(lines) + "\n"


def render_plot(
    rows: Sequence[dict[str, str]], path: Path, metric: str = "test_acc", zoom: float | None = 10.0
) -> None:
    """Accuracy against density (log axis, sparsity growing to the right), one column per model.

    Each method is a line through the mean over seeds with ± std error bars; the dense accuracy is a
    dashed line in a grey band of ± one std. With ``zoom``, a second row repeats the panels with the
    accuracy axis limited to the ``zoom`` points below the dense mean (collapsed runs sit near 10 %
    and would otherwise flatten the differences that matter).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summarize(rows, metric)
    models = _ordered({k[0] for k in stats}, MODELS)
    ncols, nrows = max(1, len(models)), 2 if zoom else 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 4.6 * nrows), squeeze=False)
    colors = plt.get_cmap("tab10")
    for col, model in enumerate(models):
        cells = {k[1:]: v for k, v in stats.items() if k[0] == model}
        sparsities = sorted({s for (m, s) in cells if m != "dense"})
        densities = [1.0 - s for s in sparsities]
        dense = cells.get(("dense", 0.0))
        for row in range(nrows):
            ax = axes[row][col]
            if dense:
                mean, std = _mean_std(dense)
                ax.axhspan(mean - std, mean + std, color="0.6", alpha=0.35, lw=0)
                ax.axhline(mean, color="0.3", lw=1.0, ls="--", label=f"dense {mean:.2f} ± {std:.2f}")
            for method in _ordered({m for (m, _) in cells if m != "dense"}, METHODS):
                points = [
                    (1.0 - s, *_mean_std(cells[(method, s)])) for s in sparsities if (method, s) in cells
                ]
                xs, ys, es = zip(*points, strict=True) if points else ((), (), ())
                bold = method.startswith("prospr")
                color = colors(METHODS.index(method) if method in METHODS else 9)
                ax.errorbar(
                    xs, ys, yerr=es, marker="o", ms=5 if bold else 4, lw=2.0 if bold else 1.2,
                    capsize=3, label=method, color=color,
                )  # fmt: skip
            if densities:  # sparsity grows to the right: the density axis runs from high to low
                ax.set_xlim(max(densities) * 1.4, min(densities) / 1.4)
            ax.set_xscale("log")
            if densities:
                ax.set_xticks(densities)
                ax.set_xticklabels([f"{100 * d:g}" for d in densities])
            ax.minorticks_off()
            ax.set_xlabel("density 1 - sparsity (%), log scale")
            label = "test accuracy (%)" if metric == "test_acc" else "validation accuracy (%)"
            title = f"{MODEL_LABELS.get(model, model)} on {DATASET_LABELS.get(DATASET_OF.get(model, ''), '')}"
            if row == 1 and zoom:
                top = _mean_std(dense)[0] if dense else max(statistics.fmean(v) for v in cells.values())
                ax.set_ylim(top - zoom, top + 1.0)
                title += f" (zoom: top {zoom:g} points)"
            else:
                ax.legend(fontsize=8, loc="lower left")
            ax.set_ylabel(label)
            ax.set_title(title)
            ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_comparison(
    rows: Sequence[dict[str, str]], metric: str = "test_acc", from_sparsity: float = 0.98
) -> str:
    """Each ProsPr variant against the best baseline of each cell at ``from_sparsity`` and above.

    The best baseline is the non-ProsPr method with the highest mean (``dense`` excluded). The
    per-seed column gives the variant's value minus that baseline's, seed by seed (seeds both have).
    """
    stats = summarize(rows, metric)
    by_seed: dict[tuple[str, str, float], dict[str, float]] = defaultdict(dict)
    for row in rows:
        if row.get(metric, "") != "":
            by_seed[(row["model"], row["method"], float(row["sparsity"]))][row["seed"]] = float(row[metric])
    lines = [
        "| model | sparsity | method | mean | best baseline | difference | per seed |",
        "|---|---:|---|---:|---|---:|---|",
    ]
    wins = total = 0
    for model in _ordered({k[0] for k in stats}, MODELS):
        sparsities = sorted({k[2] for k in stats if k[0] == model and k[2] >= from_sparsity})
        for s in sparsities:
            baselines = {
                m: statistics.fmean(v)
                for (mm, m, ss), v in stats.items()
                if mm == model and ss == s and m not in PROSPR_METHODS and m != "dense"
            }
            if not baselines:
                continue
            rival = max(baselines, key=lambda m: baselines[m])
            for method in PROSPR_METHODS:
                values = stats.get((model, method, s))
                if not values:
                    continue
                mean = statistics.fmean(values)
                ours, theirs = by_seed[(model, method, s)], by_seed[(model, rival, s)]
                seeds = sorted(set(ours) & set(theirs), key=int)
                per_seed = ", ".join(f"{ours[k] - theirs[k]:+.2f}" for k in seeds)
                difference = mean - baselines[rival]
                won = round(difference, 2) >= 0
                wins += won
                total += 1
                cell = f"**{difference:+.2f}**" if won else f"{difference:+.2f}"
                lines.append(
                    f"| {MODEL_LABELS.get(model, model)} | {100 * s:g} % | {method} | {mean:.2f} | "
                    f"{rival} {baselines[rival]:.2f} | {cell} | {per_seed} |"
                )
    what = "test accuracy" if metric == "test_acc" else "validation accuracy"
    summary = (
        f"Mean {what} (%) of each ProsPr variant against the best other method of the cell "
        f"(sparsity >= {100 * from_sparsity:g} %); matches or beats it in {wins} of {total} "
        "(variant, cell) pairs (bold)."
    )
    return summary + "\n\n" + "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, rows: Sequence[dict[str, str]], header: str) -> None:
    """``results.md`` and ``accuracy_vs_sparsity.png`` in ``out_dir`` from ``rows``."""
    zeros = [r for r in rows if r["zeros_ok"] != "True"]
    text = (
        f"{header}\n\n{render_markdown(rows)}\n"
        f"Runs: {len(rows)}; runs whose pruned weights were not all exactly zero after training: "
        f"{len(zeros)}.\n\n"
        f"#### ProsPr against the best baseline\n\n{render_comparison(rows)}\n"
        f"#### Time per run\n\n{render_timing(rows)}"
    )
    (out_dir / "results.md").write_text(text, encoding="utf-8")
    render_plot(rows, out_dir / "accuracy_vs_sparsity.png")


# --------------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------------

#: The validation study: ProsPr settings on LeNet-5, one seed, validation accuracy only.
STUDY_LRS = (0.1, 0.01)
STUDY_STEPS = (1, 3)
STUDY_SPARSITIES = (0.98, 0.995)
STUDY_ROUNDS = (10, 30, 100)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Accuracy of pruned networks (model x method x sparsity x seed), one training recipe.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--grid", choices=sorted(GRIDS), default="mnist", help="preset: models and recipe")
    parser.add_argument("--models", nargs="+", choices=MODELS, help="default: the grid's models")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help=f"default: {' '.join(METHODS)}")
    parser.add_argument(
        "--sparsities", nargs="+", type=float, help=f"default: {' '.join(f'{s:g}' for s in SPARSITIES)}"
    )
    parser.add_argument("--seeds", nargs="+", type=int, help="default: 0 1 2")
    parser.add_argument("--epochs", type=int, help="default: the grid's recipe (mnist 2, cifar10 200)")
    parser.add_argument("--lr", type=float, help="peak/initial learning rate (mnist 0.1, cifar10 0.1)")
    parser.add_argument("--batch-size", type=int, help="training batch (mnist 128, cifar10 256)")
    parser.add_argument("--weight-decay", type=float, help="(mnist 0, cifar10 5e-4)")
    parser.add_argument("--score-batch-size", type=int, default=128, help="images per scoring batch")
    parser.add_argument("--prospr-steps", type=int, default=3, help="ProsPr inner steps M")
    parser.add_argument("--prospr-lr", type=float, default=0.1, help="ProsPr inner SGD learning rate")
    parser.add_argument(
        "--prospr-batches",
        choices=("new", "reuse"),
        default="new",
        help="ProsPr: a new batch for every inner step, or one batch reused",
    )
    parser.add_argument("--synflow-rounds", type=int, default=100)
    parser.add_argument(
        "--prospr-rounds", type=int, default=100, help="rounds of iterative ProsPr (method prospr-iter)"
    )
    parser.add_argument(
        "--prospr-average",
        type=int,
        default=1,
        help="average ProsPr's scores over this many unrolls, each on its own batches",
    )
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--out-dir", type=Path, help="default: benchmarks/results/<grid>")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel, in worker processes")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch.set_num_threads per process on CPU; default: min(2, CPU cores) // jobs, at least 1",
    )
    parser.add_argument(
        "--study",
        action="store_true",
        help="validation study of ProsPr's settings (lr x steps x new/reuse) on LeNet-5 at 98 and "
        "99.5 %% sparsity, seed 0 (or --models/--sparsities/--seeds), validation accuracy only",
    )
    parser.add_argument(
        "--study-rounds",
        action="store_true",
        help="validation study of iterative ProsPr's rounds (" + ", ".join(map(str, STUDY_ROUNDS)) + ") at "
        "the --prospr-* setting, same models, sparsities and seeds as --study; writes study_rounds.*",
    )
    parser.add_argument("--render", action="store_true", help="only re-render results.md and the plot")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke preset: LeNet-300-100, dense/random/snip/prospr, 90 %%, seed 0, 20 training steps, "
        "2,000 images per split, synflow 5 rounds",
    )
    parser.add_argument("--max-steps", type=int, help="stop training after this many steps (smoke tests)")
    parser.add_argument("--limit", type=int, help="use only the first N images of every split (smoke tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.models = args.models or ["lenet300100"]
        args.methods = args.methods or ["dense", "random", "snip", "prospr"]
        args.sparsities = args.sparsities or [0.9]
        args.seeds = args.seeds or [0]
        args.max_steps = args.max_steps or 20
        args.limit = args.limit or 2000
        args.synflow_rounds = min(args.synflow_rounds, 5)
    if args.study or args.study_rounds:
        args.models = args.models or ["lenet5"]
        args.sparsities = args.sparsities or list(STUDY_SPARSITIES)
        args.seeds = args.seeds or [0]
    args.models = args.models or list(GRIDS[args.grid])
    args.methods = args.methods or list(METHODS)
    args.sparsities = args.sparsities or list(SPARSITIES)
    args.seeds = args.seeds or [0, 1, 2]
    for s in args.sparsities:
        if not 0.0 < s < 1.0:
            parser.error(f"--sparsities must lie in (0, 1), got {s}")
    datasets = {DATASET_OF[m] for m in args.models}
    if len(datasets) > 1:
        parser.error("--models must share one data set (run MNIST and CIFAR-10 models separately)")
    args.dataset = datasets.pop()
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    args.threads = args.threads or max(1, min(2, os.cpu_count() or 1) // args.jobs)
    args.out_dir = args.out_dir or ROOT / "benchmarks" / "results" / args.dataset
    return args


def make_recipe(args: argparse.Namespace) -> Recipe:
    """The dataset's recipe with the command-line overrides."""
    recipe = RECIPES[args.dataset]
    overrides = {
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "weight_decay": args.weight_decay,
    }
    return replace(recipe, **{k: v for k, v in overrides.items() if v is not None})


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def environment(device: torch.device) -> str:
    """One line: torch version, device, threads, CPU count, Python."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return (
        f"torch {torch.__version__}, {where}, {torch.get_num_threads()} threads, "
        f"Python {platform.python_version()}, {platform.platform()}"
    )


def _progress(done: int, total: int, row: dict[str, Any], started: float) -> str:
    elapsed = time.perf_counter() - started
    return (
        f"[{done}/{total} {elapsed / 60:.1f} min] {row['model']} {row['method']} s={row['sparsity']} "
        f"seed={row['seed']} {row['scoring']}: test {row['test_acc'] or '-'} val {row['val_acc']} "
        f"loss {row['final_train_loss']} "
        f"score {row['score_seconds']} s train {row['train_seconds']} s zeros_ok={row['zeros_ok']}"
    )


#: One unit of work: the run, its scoring settings, and whether to evaluate on the test set.
Task = tuple[RunSpec, Scoring, bool]

#: Per-process state of the workers (set by :func:`_init_worker`, or in-process when ``--jobs 1``).
_STATE: dict[str, Any] = {}


def _init_worker(
    dataset: str,
    root: Path,
    limit: int | None,
    recipe: Recipe,
    device: str,
    threads: int,
    max_steps: int | None,
) -> None:
    """Load the data once per process and fix the thread count."""
    dev = torch.device(device)
    if dev.type == "cpu":
        torch.set_num_threads(max(1, threads))
    data = load_data(dataset, root, limit)
    if dev.type != "cpu":  # whole splits on the accelerator: batches and augmentation never leave it
        data = replace(data, train=data.train.to(dev), val=data.val.to(dev), test=data.test.to(dev))
    _STATE.update(data=data, recipe=recipe, device=dev, max_steps=max_steps)


def _work(task: Task) -> dict[str, Any]:
    spec, scoring, evaluate_test = task
    return run_one(
        spec,
        _STATE["data"],
        _STATE["recipe"],
        scoring,
        _STATE["device"],
        evaluate_test=evaluate_test,
        max_steps=_STATE["max_steps"],
    )


def task_key(task: Task, recipe: Recipe) -> tuple[str, ...]:
    """The :data:`KEY_COLUMNS` values the task's CSV row will have."""
    spec, scoring, _ = task
    return (
        spec.model,
        spec.dataset,
        spec.method,
        f"{spec.sparsity:g}",
        str(spec.seed),
        recipe.describe(),
        scoring.describe(spec.method),
    )


def execute(args: argparse.Namespace, tasks: Sequence[Task], recipe: Recipe, path: Path) -> int:
    """Run the tasks not yet in ``path``, appending each row as it finishes; returns how many ran.

    ``--jobs 1`` runs them in this process; more start that many worker processes (``spawn``), each
    with its own copy of the data and ``--threads`` threads, and rows arrive in completion order.
    """
    done = {row_key(r) for r in read_rows(path)}
    todo = [t for t in tasks if task_key(t, recipe) not in done]
    print(f"{len(tasks)} runs, {len(tasks) - len(todo)} already in {path}, {len(todo)} to run", flush=True)
    if not todo:
        return 0
    init = (args.dataset, args.data_root, args.limit, recipe, str(args.device), args.threads, args.max_steps)
    started = time.perf_counter()
    if args.jobs <= 1 or len(todo) <= 1:
        _init_worker(*init)
        rows: Iterable[dict[str, Any]] = map(_work, todo)
        pool = None
    else:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(args.jobs, initializer=_init_worker, initargs=init)
        rows = pool.imap_unordered(_work, todo)
    try:
        for i, row in enumerate(rows, 1):
            append_row(path, row)
            print(_progress(i, len(todo), row, started), flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    print(f"ran {len(todo)} runs in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    return len(todo)


def study_tasks(args: argparse.Namespace, base: Scoring) -> list[Task]:
    """ProsPr with lr x steps x new/reuse batches, validation accuracy only (``--study``); or, with
    ``--study-rounds``, iterative ProsPr at the given ProsPr setting with each of :data:`STUDY_ROUNDS`."""
    if args.study_rounds:
        return [
            (RunSpec(model, "prospr-iter", s, seed), replace(base, prospr_rounds=rounds), False)
            for seed in args.seeds
            for model in args.models
            for s in args.sparsities
            for rounds in STUDY_ROUNDS
        ]
    settings = [
        replace(base, lr=lr, steps=steps, reuse=reuse)
        for lr in STUDY_LRS
        for steps in STUDY_STEPS
        for reuse in (False, True)
    ]
    return [
        (RunSpec(model, "prospr", s, seed), scoring, False)
        for seed in args.seeds
        for model in args.models
        for s in args.sparsities
        for scoring in settings
    ]


def render_study(
    rows: Sequence[dict[str, str]], models: Sequence[str], seeds: Sequence[int], recipe: Recipe
) -> str:
    """Validation accuracy per ProsPr setting (rows) and sparsity (columns), plus the mean."""
    table: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        table[row["scoring"]][float(row["sparsity"])].append(float(row["val_acc"]))
    sparsities = sorted({float(r["sparsity"]) for r in rows})
    lines = [
        f"ProsPr settings: validation accuracy (%) on the {VAL_SIZE} held-out training images (never "
        f"the test set); {', '.join(MODEL_LABELS.get(m, m) for m in models)}, seeds "
        f"{' '.join(map(str, seeds))}; training recipe: {recipe.describe()}.",
        "",
        "| setting | " + " | ".join(f"{100 * s:g} %" for s in sparsities) + " | mean |",
        "|---|" + "---:|" * (len(sparsities) + 1),
    ]
    means = {}
    for setting, by_s in sorted(table.items()):
        per = [statistics.fmean(by_s[s]) for s in sparsities if by_s.get(s)]
        means[setting] = statistics.fmean(per)
        cells = [f"{statistics.fmean(by_s[s]):.2f}" if by_s.get(s) else "-" for s in sparsities]
        lines.append(f"| {setting} | " + " | ".join(cells) + f" | {means[setting]:.2f} |")
    if means:
        best = max(means, key=lambda k: (round(means[k], 2), *_cheaper(k)))
        tied = sorted(k for k in means if round(means[k], 2) == round(means[best], 2) and k != best)
        lines += ["", f"Best mean validation accuracy: `{best}` ({means[best]:.2f} %)."]
        if tied:
            lines.append(
                f"Tied with {', '.join(f'`{k}`' for k in tied)}; ties go to the cheaper scoring "
                "(one reused batch, then fewer steps, then the paper's lr 0.1)."
            )
    return "\n".join(lines) + "\n"


def _cheaper(setting: str) -> tuple[int, int, int, float]:
    """Preference among tied ProsPr settings (larger is preferred): reuse, fewer steps, fewer
    rounds, lr near 0.1."""
    fields = dict(part.split("=", 1) for part in setting.split() if "=" in part)
    steps = int(fields.get("M", 0))
    rounds = int(fields.get("rounds", 1))
    lr = float(fields.get("lr", 0.1))
    return int("reuse" in setting.split()), -steps, -rounds, -abs(math.log10(lr) + 1.0)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    args.device = device
    if device.type == "cpu":
        torch.set_num_threads(max(1, args.threads))
    recipe = make_recipe(args)
    scoring = Scoring(
        batch_size=args.score_batch_size,
        steps=args.prospr_steps,
        lr=args.prospr_lr,
        reuse=args.prospr_batches == "reuse",
        average=args.prospr_average,
        synflow_rounds=args.synflow_rounds,
        prospr_rounds=args.prospr_rounds,
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/accuracy.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    print(f"{command}\n{environment(device)}\nrecipe: {recipe.describe()}", flush=True)
    if args.study or args.study_rounds:
        stem = "study_rounds" if args.study_rounds else "study"
        path = args.out_dir / f"{stem}.csv"
        if not args.render:
            execute(args, study_tasks(args, scoring), recipe, path)
        rows = [r for r in read_rows(path) if r["recipe"] == recipe.describe() and r["model"] in args.models]
        text = render_study(rows, args.models, args.seeds, recipe)
        (args.out_dir / f"{stem}.md").write_text(text, encoding="utf-8")
        print(text)
        return 0
    csv_path = args.out_dir / "results.csv"
    if not args.render:
        specs = grid(args.models, args.methods, args.sparsities, args.seeds)
        execute(args, [(spec, scoring, True) for spec in specs], recipe, csv_path)
    rows = [
        r
        for r in read_rows(csv_path)
        if r["recipe"] == recipe.describe()
        and r["model"] in args.models
        and r["method"] in args.methods
        and (r["method"] == "dense" or float(r["sparsity"]) in args.sparsities)
        and r["scoring"] == scoring.describe(r["method"])
    ]
    settings = sorted(
        {(r["method"], r["scoring"]) for r in rows if r["scoring"]}, key=lambda t: METHODS.index(t[0])
    )
    header = (
        f"Command: `{command}`\n\nEnvironment: {environment(device)}\n\nRecipe: {recipe.describe()}; "
        "scoring: " + "; ".join(f"{m} {c}" for m, c in settings)
    )
    if rows:
        write_outputs(args.out_dir, rows, header)
        print(render_markdown(rows))
    print(f"wrote {csv_path}, {args.out_dir / 'results.md'}, {args.out_dir / 'accuracy_vs_sparsity.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "CSV_COLUMNS",
    "METHODS",
    "SPARSITIES",
    "Data",
    "Recipe",
    "RunSpec",
    "Scoring",
    "Split",
    "load_data",
    "main",
    "render_markdown",
    "render_plot",
    "run_one",
]
