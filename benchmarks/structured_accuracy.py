"""Masks that can run faster, at equal cost: ProsPr against SNIP, magnitude and random.

Run from the repository root::

    python benchmarks/structured_accuracy.py     # MNIST, LeNet-5 and LeNet-300-100, 3 seeds
    python benchmarks/structured_accuracy.py --grid cifar10-short --structures channels \
        --methods prospr snip magnitude random --sparsities 0.75 0.9   # CIFAR-10, ResNet-20
    python benchmarks/structured_accuracy.py --quick --out-dir /tmp/q   # smoke test (seconds)

Two kinds of mask (``--structures``), each a table of its own:

* ``channels``: structured masks, shrunk before training (below);
* ``2:4``: N:M semi-structured masks (``PruningSettings(sparsity=0.5, pattern="2:4",
  guard="off")``), registered with `apply_masks` and trained masked: 2 of every 4 consecutive
  weights along each layer's input dimension, the pattern of sparse tensor cores. Every method
  removes the same number of weights from every layer; layers whose input dimension is not a
  multiple of 4 stay dense (LeNet-5's two convolutions: 1 and 6 input channels), so the
  ``removed`` column gives the fraction of all scored weights removed.

Every run builds the model with ``torch.manual_seed(seed)``, computes **structured** masks
(`PruningSettings(structured=True, allocation="uniform")`: the same fraction of the output
channels / units removed in every layer, the classifier's outputs kept), **shrinks** the network
(`lightning_prospr.shrink`: the pruned channels are removed, the tensors get smaller) and trains the
small network with the grid's recipe of ``benchmarks/accuracy.py`` (``--grid mnist``: SGD 0.1,
momentum 0.9, one-cycle, 2 epochs, batch 128; ``--grid cifar10-short``: ResNet-20 on CIFAR-10, the
same with weight decay 5e-4, 3 epochs, augmentation and bf16 autocast). Because the allocation is
uniform, every method keeps the same number of channels in every layer, so every method's network
has the same shape, parameters and MACs: only *which* channels are kept differs. (With the global
allocation the channel sums of magnitude and random scores grow with a channel's fan-in, so they
keep the wide fully connected layer and cut the convolutions to one channel: their MACs would
differ from ProsPr's by an order of magnitude.) The table reports the MACs of every run and marks
a cell where they are not all equal (for ``2:4``, the MACs of the dense kernels that train it).

ProsPr uses the settings chosen on the validation split in ``benchmarks/results/mnist/study.md``
(M = 3, lr 0.1, one batch of 128 reused; the CIFAR-10 grid of ``benchmarks/accuracy.py`` uses the
same); SNIP and magnitude score the same batch; random draws its channels from the run's seed. On
ResNet-20 (option-A shortcuts: the residual stream is padded with zero channels, which the
dependency graph cannot follow) the stem and the blocks' second convolutions, whose outputs are the
residual stream, stay whole for every method (the engine warns once per run); the blocks' inner
widths are pruned. The MACs are those of one forward pass of one image
(`torch.utils.flop_counter.FlopCounterMode`, FLOPs / 2). Results go to ``results.csv`` (resumable:
a run already there is not repeated) and ``results.md`` under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import DATASET_OF, GRIDS, RECIPES, build_model, loss_fn, scoring_batches
from common.data import DEFAULT_DATA_ROOT
from common.results import ResultStore
from common.runner import run_tasks
from common.training import Recipe, Worker, evaluate, start_worker, train

from lightning_prospr import PruningSettings, apply_masks, compute_masks, shrink

ROOT = Path(__file__).resolve().parents[1]
#: The grids this benchmark runs (a data set, its models and the recipe of ``benchmarks/accuracy.py``).
STRUCTURED_GRIDS = {"mnist": ("lenet5", "lenet300100"), "cifar10-short": GRIDS["cifar10-short"]}
MODELS = tuple(m for models in STRUCTURED_GRIDS.values() for m in models)
METHODS = ("dense", "prospr", "snip", "magnitude", "random")
SPARSITIES = (0.5, 0.75, 0.9)
STRUCTURES = ("channels", "2:4")
COLUMNS = (
    "dataset", "model", "structure", "method", "allocation", "sparsity", "removed", "seed", "test_acc",
    "val_acc",
    "final_train_loss", "parameters", "macs", "kept_channels", "score_seconds", "train_seconds",
    "recipe", "scoring", "threads", "torch",
)  # fmt: skip
KEY_COLUMNS = ("model", "structure", "method", "allocation", "sparsity", "seed", "recipe", "scoring")
#: ProsPr's settings chosen on validation (benchmarks/results/mnist/study.md).
PROSPR_STEPS, PROSPR_LR, SCORE_BATCH = 3, 0.1, 128


def scoring_description(method: str) -> str:
    """The scoring settings of `method` (part of a run's key)."""
    if method == "prospr":
        return f"M={PROSPR_STEPS} lr={PROSPR_LR:g} reuse b={SCORE_BATCH}"
    return "" if method == "dense" else f"b={SCORE_BATCH}"


def macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass of one image."""
    with FlopCounterMode(display=False) as counter:
        model(example[:1])
    return int(counter.get_total_flops()) // 2


@dataclass(frozen=True)
class Task:
    model: str
    structure: str
    method: str
    sparsity: float
    seed: int


def run_one(worker: Worker, task: Task) -> dict[str, Any]:
    """Score, shrink, train and evaluate one run; returns its CSV row."""
    model = build_model(task.model, task.seed)
    batches = scoring_batches(worker.data, 1, SCORE_BATCH, task.seed, worker.device)
    example = batches[0][0]
    score_seconds = 0.0
    kept = ""
    removed = 0.0
    if task.method != "dense":
        kind: dict[str, Any] = (
            {"structured": True, "allocation": "uniform"}
            if task.structure == "channels"
            else {"pattern": task.structure, "guard": "off"}
        )
        seed = task.seed if task.method == "random" else 0  # `seed` applies to random only
        settings = (
            PruningSettings(task.sparsity, steps=PROSPR_STEPS, lr=PROSPR_LR, **kind)
            if task.method == "prospr"
            else PruningSettings(task.sparsity, method=task.method, seed=seed, **kind)
        )
        repeat = PROSPR_STEPS + 1 if task.method == "prospr" else 1  # one batch, reused by every step
        start = time.perf_counter()
        result = compute_masks(model, loss_fn, batches * repeat, settings, example_input=example)
        score_seconds = time.perf_counter() - start
        if task.structure == "channels":
            shrink(model, result.channel_masks, loss_fn=loss_fn, example_input=batches[0])
            kept = " ".join(str(int(m.sum())) for m in result.channel_masks.values())
            removed = task.sparsity
        else:
            apply_masks(model, result.masks)
            kept = " ".join(f"{float(m.float().mean()):.2f}" for m in result.masks.values())
            total = sum(m.numel() for m in result.masks.values())
            removed = sum(int((~m.bool()).sum()) for m in result.masks.values()) / total
    start = time.perf_counter()
    final_loss = train(
        model, worker.data, worker.recipe, task.seed, worker.device, max_steps=worker.max_steps
    )
    train_seconds = time.perf_counter() - start
    return {
        "dataset": DATASET_OF[task.model],
        "model": task.model,
        "structure": task.structure,
        "method": task.method,
        "allocation": _allocation(task),
        "sparsity": f"{task.sparsity:g}",
        "removed": f"{removed:.4f}",
        "seed": task.seed,
        "test_acc": f"{evaluate(model, worker.data.test, worker.device):.2f}",
        "val_acc": f"{evaluate(model, worker.data.val, worker.device):.2f}",
        "final_train_loss": f"{final_loss:.4f}",
        "parameters": sum(p.numel() for p in model.parameters()),
        "macs": macs(model, example),
        "kept_channels": kept,
        "score_seconds": f"{score_seconds:.2f}",
        "train_seconds": f"{train_seconds:.2f}",
        "recipe": worker.recipe.describe(),
        "scoring": scoring_description(task.method),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _allocation(task: Task) -> str:
    if task.method == "dense":
        return ""
    return "uniform" if task.structure == "channels" else "pattern"


def tasks_of(
    structures: Sequence[str],
    models: Sequence[str],
    methods: Sequence[str],
    sparsities: Sequence[float],
    seeds: Sequence[int],
) -> list[Task]:
    """Seed by seed (an interrupted grid has complete seeds); dense once per model and seed (with
    the ``channels`` runs); N:M masks at their one sparsity, 1 - N/M."""
    tasks = []
    for seed in seeds:
        for structure in structures:
            for model in models:
                if "dense" in methods and structure == "channels":
                    tasks.append(Task(model, structure, "dense", 0.0, seed))
                levels = sparsities if structure == "channels" else [1 - _density(structure)]
                tasks.extend(
                    Task(model, structure, m, s, seed) for s in levels for m in methods if m != "dense"
                )
    return tasks


def _density(pattern: str) -> float:
    n, m = (int(v) for v in pattern.split(":"))
    return n / m


def task_key(task: Task, recipe: Recipe) -> tuple[str, ...]:
    return (
        task.model, task.structure, task.method, _allocation(task), f"{task.sparsity:g}",
        str(task.seed), recipe.describe(), scoring_description(task.method),
    )  # fmt: skip


def _cell(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def render(rows: Sequence[dict[str, str]], methods: Sequence[str]) -> str:
    """Mean ± std of the test accuracy per model, sparsity and method; the best mean of the pruned
    methods in bold; the MACs and parameters of the cell's networks (flagged if they differ).
    ``removed``: the fraction of channels (structured rows) or, for N:M rows, the pattern and the
    fraction of all scored weights removed."""
    pruned = [m for m in methods if m != "dense"]
    head = "| model | removed | MACs | parameters | " + " | ".join(pruned) + " | seeds |"
    lines = [head, "|" + " --- |" * 4 + " ---: |" * len(pruned) + " ---: |"]
    for model in dict.fromkeys(r["model"] for r in rows):
        of_model = [r for r in rows if r["model"] == model]
        dense = [float(r["test_acc"]) for r in of_model if r["method"] == "dense"]
        dense_macs = {r["macs"] for r in of_model if r["method"] == "dense"}
        if dense:
            mean, std = _cell(dense)
            lines.append(
                f"| {model} | 0 (dense) | {int(next(iter(dense_macs))):,} | "
                f"{next(r['parameters'] for r in of_model if r['method'] == 'dense')} | "
                f"dense: {mean:.2f} ± {std:.2f} |" + " |" * (len(pruned) - 1) + f" {len(dense)} |"
            )
        for sparsity in sorted({r["sparsity"] for r in of_model if r["method"] != "dense"}, key=float):
            cell = [r for r in of_model if r["sparsity"] == sparsity and r["method"] != "dense"]
            structure = cell[0].get("structure", "channels")
            removed = (
                f"{float(sparsity):.0%} of channels"
                if structure == "channels"
                else f"{structure} ({statistics.fmean(float(r['removed']) for r in cell):.1%} of weights)"
            )
            shapes = {(r["macs"], r["parameters"]) for r in cell}
            stats = {m: _cell([float(r["test_acc"]) for r in cell if r["method"] == m]) for m in pruned}
            present = {m: s for m, s in stats.items() if any(r["method"] == m for r in cell)}
            best = max(present.values(), key=lambda s: s[0])[0] if present else None
            values = []
            for m in pruned:
                if m not in present:
                    values.append("n/a")
                    continue
                mean, std = present[m]
                text = f"{mean:.2f} ± {std:.2f}"
                values.append(f"**{text}**" if mean == best else text)
            macs_text = (
                f"{int(next(iter(shapes))[0]):,}"
                if len(shapes) == 1
                else "differ: " + ", ".join(sorted(s[0] for s in shapes))
            )
            params = next(iter(shapes))[1] if len(shapes) == 1 else "differ"
            seeds = len({r["seed"] for r in cell})
            lines.append(
                f"| {model} | {removed} | {macs_text} | {params} | " + " | ".join(values) + f" | {seeds} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Structured pruning at equal MACs: shrunk networks, trained.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--grid",
        choices=list(STRUCTURED_GRIDS),
        default="mnist",
        help="data set, models and recipe (those of benchmarks/accuracy.py)",
    )
    parser.add_argument("--structures", nargs="+", choices=STRUCTURES, default=list(STRUCTURES))
    parser.add_argument("--models", nargs="+", choices=MODELS, help="default: the grid's models")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel, in worker processes")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument(
        "--out-dir",
        type=Path,
        help="default: benchmarks/results/structured (mnist), structured-cifar10-short (cifar10-short)",
    )
    parser.add_argument("--render", action="store_true", help="only re-render results.md")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke preset: the grid's last model (LeNet-300-100, ResNet-20), 75 %%, seed 0, 20 steps, "
        "2,000 images",
    )
    args = parser.parse_args(argv)
    args.max_steps = args.limit = None
    grid_models = STRUCTURED_GRIDS[args.grid]
    if args.quick:
        args.models, args.sparsities, args.seeds, args.max_steps, args.limit = (
            [grid_models[-1]],
            [0.75],
            [0],
            20,
            2000,
        )
    args.models = args.models or list(grid_models)
    foreign = [m for m in args.models if m not in grid_models]
    if foreign:
        parser.error(
            f"--models {' '.join(foreign)} not in --grid {args.grid} ({' '.join(grid_models)}); "
            "pass the grid of their data set"
        )
    if args.out_dir is None:
        name = "structured" if args.grid == "mnist" else f"structured-{args.grid}"
        args.out_dir = ROOT / "benchmarks" / "results" / name
    for s in args.sparsities:
        if not 0.0 < s < 1.0:
            parser.error(f"--sparsities must lie in (0, 1), got {s}")
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, str]]:
    args = parse_args(argv)
    recipe = RECIPES[args.grid]
    threads = max(1, min(2, os.cpu_count() or 1) // args.jobs)
    torch.set_num_threads(threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = ResultStore(args.out_dir / "results.csv", COLUMNS, KEY_COLUMNS)
    command = "python benchmarks/structured_accuracy.py " + shlex.join(
        sys.argv[1:] if argv is None else list(argv)
    )
    environment = (
        f"torch {torch.__version__}, CPU ({os.cpu_count()} cores), {threads} threads per run, "
        f"Python {platform.python_version()}"
    )
    print(f"{command}\n{environment}\nrecipe: {recipe.describe()}", flush=True)
    if not args.render:
        done = results.done()
        todo = [
            t
            for t in tasks_of(args.structures, args.models, args.methods, args.sparsities, args.seeds)
            if task_key(t, recipe) not in done
        ]
        print(f"{len(todo)} runs to do", flush=True)
        init = (
            DATASET_OF[args.models[0]],
            args.data_root,
            args.limit,
            recipe,
            "cpu",
            threads,
            args.max_steps,
        )
        started = time.perf_counter()
        for i, row in enumerate(run_tasks(todo, start_worker, init, run_one, args.jobs), 1):
            results.append(row)
            print(
                f"[{i}/{len(todo)} {(time.perf_counter() - started) / 60:.1f} min] "
                f"{row['model']} {row['method']} "
                f"s={row['sparsity']} seed={row['seed']}: test {row['test_acc']} val {row['val_acc']} "
                f"MACs {row['macs']} kept {row['kept_channels']} train {row['train_seconds']} s",
                flush=True,
            )
    rows = [
        r
        for r in results.rows()
        if r["recipe"] == recipe.describe()
        and r["model"] in args.models
        and r["method"] in args.methods
        and r["structure"] in args.structures
        and (
            r["method"] == "dense" or r["structure"] != "channels" or float(r["sparsity"]) in args.sparsities
        )
        and r["scoring"] == scoring_description(r["method"])
    ]
    tables = {
        "channels": "Structured masks (uniform allocation), shrunk before training: every method's "
        "network has the same shape",
        "2:4": "2:4 masks (guard off), trained masked on dense kernels",
    }
    text = (
        f"Command: `{command}`\n\nEnvironment: {environment}\n\nRecipe: {recipe.describe()}; "
        f"ProsPr {scoring_description('prospr')}; the others score the same batch.\n\n"
        "Test accuracy (%), mean ± std over seeds; the best pruned method of each row in bold.\n"
    )
    for structure in args.structures:
        of_kind = [r for r in rows if r["structure"] == structure]
        if of_kind:
            text += f"\n#### {tables[structure]}\n\n{render(of_kind, args.methods)}"
    (args.out_dir / "results.md").write_text(text, encoding="utf-8")
    print(text)
    return rows


if __name__ == "__main__":
    main()
