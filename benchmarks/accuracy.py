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
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common.data import (  # re-exported for the tests
    DEFAULT_DATA_ROOT,
    Data,
)
from common.render import (
    Catalog,
    render_ablations,
    render_comparison,
    render_effective,
    render_markdown,
    render_plot,
    render_study,
    render_timing,
    render_verdict,
    row_label,
)
from common.results import ResultStore
from common.runner import run_tasks
from common.training import Recipe, Worker, evaluate, start_worker, train

from lightning_prospr import MaskResult, PruningSettings, compute_masks, default_parameter_names
from lightning_prospr.ablations import reinitialize, shuffle_within_layers
from lightning_prospr.effective import effective_masks
from lightning_prospr.masking import apply_masks, current_masks, effective_weight
from lightning_prospr.models import VGG16BN, LeNet5, LeNet300100, ResNet20
from lightning_prospr.selection import pruned_count

ROOT = Path(__file__).resolve().parents[1]

#: The scoring methods of the grid (``prospr-fo``: first order; ``prospr-iter``: in rounds).
BASE_METHODS = (
    "dense",
    "random",
    "magnitude",
    "snip",
    "grasp",
    "synflow",
    "prospr",
    "prospr-fo",
    "prospr-iter",
)
#: The ProsPr variants (they share the ``--prospr-*`` scoring settings).
PROSPR_METHODS = ("prospr", "prospr-fo", "prospr-iter")
#: Method modifiers: a layer-wise allocation (``+erk``, ``+uniform``), the guard
#: (``+effective``: every kept weight on a path; the default is ``connected``) and a sanity check of
#: the mask (``+shuffle``: the kept positions permuted within each layer; ``+reinit``: fresh weights).
#: ``+spread`` (after a per-layer allocation) spreads each layer's weights over its output units; the
#: CSV's ``allocation`` column then reads e.g. ``balanced+spread``.
ALLOCATION_TAGS = ("erk", "uniform", "balanced")
SPREAD_TAG = "spread"
GUARD_TAGS = ("effective",)
ABLATIONS = ("shuffle", "reinit")
#: The methods of the grid, in table order (``--methods`` takes any ``base[+allocation][+ablation]``).
METHODS = (
    "dense",
    "random",
    "random+erk",
    "magnitude",
    "snip",
    "snip+erk",
    "grasp",
    "synflow",
    "prospr",
    "prospr-fo",
    "prospr-iter",
    "prospr+erk",
    "prospr-iter+erk",
    "prospr+uniform",
    "prospr-iter+uniform",
    "prospr+shuffle",
    "prospr-iter+shuffle",
    "prospr+erk+shuffle",
    "snip+shuffle",
    "synflow+shuffle",
    "prospr+reinit",
)
SPARSITIES = (0.9, 0.98, 0.99, 0.995, 0.998)
MODELS = ("lenet300100", "lenet5", "resnet20", "vgg16bn")
DATASET_OF = {"lenet300100": "mnist", "lenet5": "mnist", "resnet20": "cifar10", "vgg16bn": "cifar10"}
GRIDS = {
    "mnist": ("lenet300100", "lenet5"),
    "cifar10": ("resnet20", "vgg16bn"),
    "cifar10-short": ("resnet20",),
}
MODEL_LABELS = {
    "lenet300100": "LeNet-300-100",
    "lenet5": "LeNet-5",
    "resnet20": "ResNet-20",
    "vgg16bn": "VGG-16-BN",
}
DATASET_LABELS = {"mnist": "MNIST", "cifar10": "CIFAR-10"}


@dataclass(frozen=True)
class Variant:
    """A grid method: the scoring method, the layer-wise allocation, and an optional ablation."""

    base: str
    allocation: str = "global"
    ablation: str = "none"
    guard: str = "connected"
    spread: bool = False

    @classmethod
    def parse(cls, label: str) -> Variant:
        """``"prospr-iter+erk+effective+shuffle"`` -> ``Variant("prospr-iter", "erk", "shuffle",
        "effective")``."""
        base, *tags = label.split("+")
        allocation = [t for t in tags if t in ALLOCATION_TAGS]
        guard = [t for t in tags if t in GUARD_TAGS]
        ablation = [t for t in tags if t in ABLATIONS]
        spread = tags.count(SPREAD_TAG)
        unknown = [t for t in tags if t not in (*ALLOCATION_TAGS, *GUARD_TAGS, *ABLATIONS, SPREAD_TAG)]
        if (
            base not in BASE_METHODS
            or unknown
            or max(len(allocation), len(guard), len(ablation), spread) > 1
            or (spread and not allocation)
        ):
            raise ValueError(
                f"unknown method {label!r}: write base[+allocation[+spread]][+effective][+ablation], "
                f"base one of {', '.join(BASE_METHODS)}, allocation one of {', '.join(ALLOCATION_TAGS)}, "
                f"ablation one of {', '.join(ABLATIONS)}"
            )
        if base == "dense" and tags:
            raise ValueError("`dense` takes no allocation, guard or ablation")
        return cls(
            base,
            allocation[0] if allocation else "global",
            ablation[0] if ablation else "none",
            guard[0] if guard else "connected",
            bool(spread),
        )

    @property
    def allocation_column(self) -> str:
        """The CSV's ``allocation`` value: the allocation, with ``+spread`` when spread."""
        return f"{self.allocation}+{SPREAD_TAG}" if self.spread else self.allocation

    @property
    def label(self) -> str:
        defaults = ("global", "connected", "none")
        tags = [t for t in (self.allocation_column, self.guard, self.ablation) if t not in defaults]
        return "+".join([self.base, *tags])


def _is_ours(label: str) -> bool:
    variant = Variant.parse(label)
    return variant.base in PROSPR_METHODS and variant.ablation == "none"


def _is_ablation(label: str) -> bool:
    return Variant.parse(label).ablation != "none"


def catalog(labels: Sequence[str] = ()) -> Catalog:
    """The tables' catalogue: the default methods in their order, then any other `labels` (methods
    of the rows or the command line) in theirs; ours and the ablations by what each label is."""
    methods = tuple(dict.fromkeys([*METHODS, *labels]))
    return Catalog(
        MODELS, methods, tuple(m for m in methods if _is_ours(m)), MODEL_LABELS, DATASET_OF,
        DATASET_LABELS, ablations=tuple(m for m in methods if _is_ablation(m)),
    )  # fmt: skip


CATALOG = catalog()

#: Columns of ``results.csv``, in order.
CSV_COLUMNS = (
    "dataset",
    "model",
    "method",
    "allocation",
    "guard",
    "ablation",
    "sparsity",
    "effective_sparsity",
    "seed",
    "test_acc",
    "val_acc",
    "final_train_loss",
    "score_seconds",
    "train_seconds",
    "layer_density",
    "effective_density",
    "guard_changes",
    "actual_sparsity",
    "zeros_ok",
    "recipe",
    "scoring",
    "threads",
    "torch",
)
#: Columns that identify a run (a row with the same values is not run again).
KEY_COLUMNS = (
    "model", "dataset", "method", "allocation", "guard", "ablation", "sparsity", "seed", "recipe", "scoring",
)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Recipe, scoring settings, one run.
# --------------------------------------------------------------------------------------------------


RECIPES = {
    "mnist": Recipe(epochs=2, lr=0.1, batch_size=128, momentum=0.9, weight_decay=0.0, schedule="onecycle"),
    "cifar10": Recipe(epochs=200, lr=0.1, batch_size=256, momentum=0.9, weight_decay=5e-4, schedule="step"),
    # The paper's setting at a recipe a 2-core CPU runs in hours (docs/results.md): ResNet-20, 3 epochs.
    "cifar10-short": Recipe(
        epochs=3,
        lr=0.1,
        batch_size=128,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="onecycle",
        precision="bf16",
    ),
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
        method = Variant.parse(method).base
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

    @property
    def variant(self) -> Variant:
        return Variant.parse(self.method)


def build_model(name: str, seed: int) -> nn.Module:
    """The architecture ``name`` with weights from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    if name == "lenet300100":
        return LeNet300100()
    if name == "lenet5":
        return LeNet5()
    if name == "resnet20":
        return ResNet20()
    if name == "vgg16bn":
        return VGG16BN()
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


def settings_for(method: str, sparsity: float, seed: int, scoring: Scoring) -> PruningSettings:
    """The engine's settings for one of this benchmark's methods (its ablation is applied after)."""
    variant = Variant.parse(method)
    base = variant.base
    shared = {"allocation": variant.allocation, "guard": variant.guard, "spread": variant.spread}
    if base in PROSPR_METHODS:
        return PruningSettings(
            sparsity,
            steps=scoring.steps,
            lr=scoring.lr,
            mode="first_order" if base == "prospr-fo" else "full",
            unrolls=scoring.average,
            rounds=scoring.prospr_rounds if base == "prospr-iter" else None,
            **shared,
        )
    if base == "synflow":
        return PruningSettings(sparsity, method="synflow", rounds=scoring.synflow_rounds, **shared)
    return PruningSettings(sparsity, method=base, seed=seed if base == "random" else 0, **shared)


def masks_for(
    model: nn.Module, spec: RunSpec, data: Data, scoring: Scoring, device: torch.device
) -> tuple[dict[str, Tensor], MaskResult]:
    """`(masks, MaskResult)` of `spec.method` at `spec.sparsity` (before any ablation)."""
    settings = settings_for(spec.method, spec.sparsity, spec.seed, scoring)
    count, repeat = 1, 1
    if spec.variant.base in PROSPR_METHODS:
        count = (1 if scoring.reuse else scoring.steps + 1) * scoring.average
        repeat = scoring.steps + 1 if scoring.reuse else 1  # an unroll draws M + 1 batches in order
    batches = scoring_batches(data, count, scoring.batch_size, spec.seed, device)
    batches = [b for b in batches for _ in range(repeat)]
    result = compute_masks(model, loss_fn, batches, settings, example_input=batches[0][0])
    return result.masks, result


#: Seeds of the ablations, offset from the run's seed so that they draw apart from its init.
SHUFFLE_SEED, REINIT_SEED = 10_000, 20_000


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
    registered = current_masks(model)
    total_weights = sum(m.numel() for m in masks.values())
    removed = sum(int((~m.bool()).sum()) for m in masks.values())
    ok = removed == pruned_count(sparsity, total_weights)
    zeros = total = 0
    density: dict[str, float] = {}
    for name, mask in masks.items():
        effective = effective_weight(model, name)
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
    """Prune (unless dense), apply the ablation, train and evaluate one run; returns its CSV row."""
    model = build_model(spec.model, spec.seed).to(device)
    variant = spec.variant
    guard: dict[str, Any] = {}
    score_seconds = 0.0
    if variant.base == "dense":
        names = default_parameter_names(model)
        named = dict(model.named_parameters())
        masks = {n: torch.ones_like(named[n], dtype=torch.bool) for n in names}
    else:
        start = time.perf_counter()
        masks, result = masks_for(model, spec, data, scoring, device)
        score_seconds = time.perf_counter() - start
        guard = {"added": result.guard.added, "removed": result.guard.removed} if result.guard.changed else {}
        if variant.ablation == "shuffle":
            masks = shuffle_within_layers(masks, seed=SHUFFLE_SEED + spec.seed)
        apply_masks(model, masks)
        if variant.ablation == "reinit":
            reinitialize(model, list(masks), seed=REINIT_SEED + spec.seed)
    probe = (data.train.x[:2].to(device), data.train.y[:2].to(device))
    effective = effective_masks(model, masks, loss_fn, probe)
    start = time.perf_counter()
    final_loss = train(model, data, recipe, spec.seed, device, max_steps=max_steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - start
    if variant.base == "dense":
        ok, actual, density = True, _dense_zeros(model, masks), {n: 1.0 for n in masks}
    else:
        ok, actual, density = check_zeros(model, masks, spec.sparsity)
    effective_density = {n: round(float(m.float().mean()), 6) for n, m in effective.masks.items()}
    return {
        "dataset": spec.dataset,
        "model": spec.model,
        "method": variant.base,
        "allocation": variant.allocation_column,
        "guard": variant.guard,
        "ablation": variant.ablation,
        "sparsity": f"{spec.sparsity:g}",
        "effective_sparsity": f"{effective.sparsity:.6f}",
        "seed": spec.seed,
        "test_acc": f"{evaluate(model, data.test, device):.2f}" if evaluate_test else "",
        "val_acc": f"{evaluate(model, data.val, device):.2f}",
        "final_train_loss": f"{final_loss:.4f}",
        "score_seconds": f"{score_seconds:.2f}",
        "train_seconds": f"{train_seconds:.2f}",
        "layer_density": json.dumps(density, separators=(",", ":")),
        "effective_density": json.dumps(effective_density, separators=(",", ":")),
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


def write_outputs(out_dir: Path, rows: Sequence[dict[str, str]], header: str) -> None:
    """`results.md` and `accuracy_vs_sparsity.png` in `out_dir` from `rows`."""
    zeros = [r for r in rows if r["zeros_ok"] != "True"]
    methods = catalog([row_label(r) for r in rows])
    text = (
        f"{header}\n\n{render_markdown(rows, methods)}\n"
        f"Runs: {len(rows)}; runs whose pruned weights were not all exactly zero after training: "
        f"{len(zeros)}.\n\n"
        f"#### The best ProsPr variant (chosen on validation) against the best baseline\n\n"
        f"{render_verdict(rows, methods)}\n"
        f"#### Every ProsPr variant against the best baseline\n\n{render_comparison(rows, methods)}\n"
        f"#### Ablations: shuffled and re-initialized masks\n\n{render_ablations(rows, methods)}\n"
        f"#### Effective sparsity\n\n{render_effective(rows, methods)}\n"
        f"#### Time per run\n\n{render_timing(rows, methods)}"
    )
    (out_dir / "results.md").write_text(text, encoding="utf-8")
    render_plot(rows, out_dir / "accuracy_vs_sparsity.png", methods)


# --------------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------------

#: The validation study (``--study``): ProsPr's settings, validation accuracy only. Every list can be
#: narrowed on the command line (``--study-allocations``, ...); the study runs their product.
STUDY_ALLOCATIONS = ("global", "erk", "uniform")
STUDY_ROUNDS = (1, 100)
STUDY_STEPS = (1, 3)
STUDY_LRS = (0.1, 0.01)
STUDY_BATCHES = ("new", "reuse")
STUDY_AVERAGE = (1,)
STUDY_GUARDS = ("connected",)
STUDY_SPARSITIES = (0.98, 0.995)


def method_label(text: str) -> str:
    """``--methods`` values: any ``base[+allocation][+ablation]`` (argparse type)."""
    try:
        return Variant.parse(text).label
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Accuracy of pruned networks (model x method x sparsity x seed), one training recipe.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--grid", choices=sorted(GRIDS), default="mnist", help="preset: models and recipe")
    parser.add_argument("--models", nargs="+", choices=MODELS, help="default: the grid's models")
    parser.add_argument(
        "--methods",
        nargs="+",
        type=method_label,
        help=f"base[+erk|+uniform][+shuffle|+reinit], base one of {' '.join(BASE_METHODS)}; default: "
        + " ".join(METHODS),
    )
    parser.add_argument(
        "--sparsities", nargs="+", type=float, help=f"default: {' '.join(f'{s:g}' for s in SPARSITIES)}"
    )
    parser.add_argument("--seeds", nargs="+", type=int, help="default: 0 1 2")
    parser.add_argument("--epochs", type=int, help="default: the grid's recipe (mnist 2, cifar10 200)")
    parser.add_argument("--lr", type=float, help="peak/initial learning rate (mnist 0.1, cifar10 0.1)")
    parser.add_argument("--batch-size", type=int, help="training batch (mnist 128, cifar10 256)")
    parser.add_argument("--weight-decay", type=float, help="(mnist 0, cifar10 5e-4)")
    parser.add_argument(
        "--precision",
        choices=("32", "bf16"),
        help="training precision (bf16: CPU/CUDA autocast); default: the grid's",
    )
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
        help="validation study of ProsPr's settings: the product of the --study-* lists, on LeNet-5 at 98 "
        "and 99.5 %% sparsity, seed 0 (or --models/--sparsities/--seeds), validation accuracy only; "
        "writes study.csv and study.md",
    )
    parser.add_argument(
        "--study-allocations",
        nargs="+",
        choices=("global", *ALLOCATION_TAGS),
        default=list(STUDY_ALLOCATIONS),
    )
    parser.add_argument(
        "--study-rounds",
        nargs="+",
        type=int,
        default=list(STUDY_ROUNDS),
        help="1: one shot; more: prospr-iter",
    )
    parser.add_argument("--study-steps", nargs="+", type=int, default=list(STUDY_STEPS))
    parser.add_argument("--study-lrs", nargs="+", type=float, default=list(STUDY_LRS))
    parser.add_argument("--study-batches", nargs="+", choices=("new", "reuse"), default=list(STUDY_BATCHES))
    parser.add_argument(
        "--study-average", nargs="+", type=int, default=list(STUDY_AVERAGE), help="unrolls averaged"
    )
    parser.add_argument(
        "--study-guards", nargs="+", choices=("connected", *GUARD_TAGS), default=list(STUDY_GUARDS)
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
    if args.study:
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
    args.out_dir = args.out_dir or ROOT / "benchmarks" / "results" / args.grid
    return args


def make_recipe(args: argparse.Namespace) -> Recipe:
    """The dataset's recipe with the command-line overrides."""
    recipe = RECIPES[args.grid]
    overrides = {
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "weight_decay": args.weight_decay,
        "precision": args.precision,
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
        f"[{done}/{total} {elapsed / 60:.1f} min] {row['model']} {row_label(row)} s={row['sparsity']} "
        f"seed={row['seed']} {row['scoring']}: test {row['test_acc'] or '-'} val {row['val_acc']} "
        f"loss {row['final_train_loss']} "
        f"eff {row['effective_sparsity']} score {row['score_seconds']} s train {row['train_seconds']} s "
        f"zeros_ok={row['zeros_ok']}"
    )


#: One unit of work: the run, its scoring settings, and whether to evaluate on the test set.
Task = tuple[RunSpec, Scoring, bool]


def work(worker: Worker, task: Task) -> dict[str, Any]:
    spec, scoring, evaluate_test = task
    return run_one(
        spec, worker.data, worker.recipe, scoring, worker.device, evaluate_test=evaluate_test,
        max_steps=worker.max_steps,
    )  # fmt: skip


def task_key(task: Task, recipe: Recipe) -> tuple[str, ...]:
    """The `KEY_COLUMNS` values the task's CSV row will have."""
    spec, scoring, _ = task
    variant = spec.variant
    return (
        spec.model,
        spec.dataset,
        variant.base,
        variant.allocation_column,
        variant.guard,
        variant.ablation,
        f"{spec.sparsity:g}",
        str(spec.seed),
        recipe.describe(),
        scoring.describe(spec.method),
    )


def store(path: Path) -> ResultStore:
    return ResultStore(path, CSV_COLUMNS, KEY_COLUMNS)


def execute(args: argparse.Namespace, tasks: Sequence[Task], recipe: Recipe, path: Path) -> int:
    """Run the tasks not yet in `path`, appending each row as it finishes; returns how many ran.

    `--jobs 1` runs them in this process; more start that many worker processes (`spawn`), each
    with its own copy of the data and `--threads` threads, and rows arrive in completion order.
    """
    results = store(path)
    done = results.done()
    todo = [t for t in tasks if task_key(t, recipe) not in done]
    print(f"{len(tasks)} runs, {len(tasks) - len(todo)} already in {path}, {len(todo)} to run", flush=True)
    if not todo:
        return 0
    init = (args.dataset, args.data_root, args.limit, recipe, str(args.device), args.threads, args.max_steps)
    started = time.perf_counter()
    for i, row in enumerate(run_tasks(todo, start_worker, init, work, args.jobs), 1):
        results.append(row)
        print(_progress(i, len(todo), row, started), flush=True)
    print(f"ran {len(todo)} runs in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    return len(todo)


def study_tasks(args: argparse.Namespace, base: Scoring) -> list[Task]:
    """ProsPr at every combination of the ``--study-*`` lists, validation accuracy only: one-shot
    (``prospr``) for 1 round, ``prospr-iter`` with ``prospr_rounds`` otherwise."""
    settings = [
        (
            Variant("prospr-iter" if rounds > 1 else "prospr", allocation, guard=guard).label,
            replace(
                base, lr=lr, steps=steps, reuse=batches == "reuse", average=average, prospr_rounds=rounds
            ),
        )
        for guard in args.study_guards
        for allocation in args.study_allocations
        for rounds in args.study_rounds
        for steps in args.study_steps
        for lr in args.study_lrs
        for batches in args.study_batches
        for average in args.study_average
    ]
    return [
        (RunSpec(model, method, s, seed), scoring, False)
        for seed in args.seeds
        for model in args.models
        for s in args.sparsities
        for method, scoring in settings
    ]


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
    if args.study:
        path = args.out_dir / "study.csv"
        if not args.render:
            execute(args, study_tasks(args, scoring), recipe, path)
        rows = [
            r for r in store(path).rows() if r["recipe"] == recipe.describe() and r["model"] in args.models
        ]
        text = render_study(
            rows, catalog([row_label(r) for r in rows]), args.models, args.seeds, recipe.describe()
        )
        (args.out_dir / "study.md").write_text(text, encoding="utf-8")
        print(text)
        return 0
    csv_path = args.out_dir / "results.csv"
    if not args.render:
        specs = grid(args.models, args.methods, args.sparsities, args.seeds)
        execute(args, [(spec, scoring, True) for spec in specs], recipe, csv_path)
    rows = [
        r
        for r in store(csv_path).rows()
        if r["recipe"] == recipe.describe()
        and r["model"] in args.models
        and row_label(r) in args.methods
        and (r["method"] == "dense" or float(r["sparsity"]) in args.sparsities)
        and r["scoring"] == scoring.describe(r["method"])
    ]
    settings = sorted(
        {(r["method"], r["scoring"]) for r in rows if r["scoring"]}, key=lambda t: BASE_METHODS.index(t[0])
    )
    header = (
        f"Command: `{command}`\n\nEnvironment: {environment(device)}\n\nRecipe: {recipe.describe()}; "
        "scoring: " + "; ".join(f"{m} {c}" for m, c in settings)
    )
    if rows:
        write_outputs(args.out_dir, rows, header)
        print(render_markdown(rows, catalog([row_label(r) for r in rows])))
    print(f"wrote {csv_path}, {args.out_dir / 'results.md'}, {args.out_dir / 'accuracy_vs_sparsity.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
