"""How much float32 rounding moves ProsPr's scores and masks: float32 against float64.

Run from the repository root::

    python benchmarks/precision.py                         # ResNet-20 on CIFAR-10, LeNet-5 on MNIST
    python benchmarks/precision.py --models resnet20 --steps 1 3 --lrs 0.1 0.01
    python benchmarks/precision.py --quick                  # smoke test: random data, seconds

For each model, inner step count ``M`` and inner learning rate, the same initial network (built with
``torch.manual_seed(--seed)``) is scored twice with `prospr_scores` (`snip_scores` for M = 0) on the same
batch (the first ``--batch-size`` training images, or random data with ``--quick``): once in float32
and once as a float64 copy. Reported:

* ``rel err``: ``max |s32 - s64| / max |s64|`` over all scored weights (the float64 scores are the
  reference: rounding there is about 1e9 times smaller);
* ``worst tensor``: the same ratio within the worst tensor;
* ``overlap@s``: the share of the weights kept by the float64 masks at sparsity ``s`` that the
  float32 masks keep as well (:func:`lightning_prospr.global_masks`, no guard);
* ``loss M rel``: the relative difference of the inner loop's loss after ``M`` SGD steps (the
  trajectory itself), from a plain ``torch.optim.SGD`` copy in each precision.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# benchmarks/accuracy.py, beside this script (its folder is sys.path[0] when it runs as a script)
from accuracy import DATASET_OF, ROOT, build_model, loss_fn
from common.data import DEFAULT_DATA_ROOT, load_data
from torch import Tensor, nn

if str(ROOT) not in sys.path:  # the package, also when it is not installed
    sys.path.insert(0, str(ROOT))
#: Models with a data set here (VGG-16-BN is left out: float64 full mode on it takes minutes on a CPU).
MODELS = ("resnet20", "lenet5", "lenet300100")


def _batch(model_name: str, batch_size: int, data_root: Path, quick: bool) -> tuple[Tensor, Tensor]:
    """The first ``batch_size`` training images (random ones with ``quick``)."""
    if quick:
        gen = torch.Generator().manual_seed(0)
        shape = (batch_size, 3, 32, 32) if DATASET_OF[model_name] == "cifar10" else (batch_size, 1, 28, 28)
        return torch.randn(shape, generator=gen), torch.randint(0, 10, (batch_size,), generator=gen)
    data = load_data(DATASET_OF[model_name], data_root, limit=max(batch_size, 1000))
    return data.train.x[:batch_size], data.train.y[:batch_size]


def _loss_after(model: nn.Module, batch: tuple[Tensor, Tensor], steps: int, lr: float) -> float:
    net = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(net, batch).backward()
        optimizer.step()
    with torch.no_grad():
        return float(loss_fn(net, batch))


def compare(
    model: nn.Module, batch: tuple[Tensor, Tensor], steps: int, lr: float, sparsities: Sequence[float]
) -> dict[str, Any]:
    """float32 against float64 scores of ``model`` (float32) on ``batch``; see the module docstring."""
    from lightning_prospr.scores import prospr_scores, snip_scores
    from lightning_prospr.selection import global_masks

    wide = copy.deepcopy(model).double()
    wide_batch = (batch[0].double(), batch[1])

    def score(net: nn.Module, b: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        # M = 0 is SNIP, which has its own entry point since 0.2.0.
        if steps == 0:
            return snip_scores(net, loss_fn, [b])
        return prospr_scores(net, loss_fn, [b], steps=steps, lr=lr)

    s32, s64 = score(model, batch), score(wide, wide_batch)
    top = max(float(s.abs().max()) for s in s64.values())
    row: dict[str, Any] = {
        "rel_err": max(float((s32[n].double() - s64[n]).abs().max()) for n in s64) / top,
        "worst_tensor": max(float((s32[n].double() - s64[n]).abs().max() / s64[n].abs().max()) for n in s64),
    }
    for sparsity in sparsities:
        m32, m64 = global_masks(s32, sparsity), global_masks(s64, sparsity)
        kept = sum(int(m.sum()) for m in m64.values())
        row[f"overlap@{sparsity:g}"] = sum(int((m32[n] & m64[n]).sum()) for n in m64) / kept
    l32, l64 = _loss_after(model, batch, steps, lr), _loss_after(wide, wide_batch, steps, lr)
    row["loss_rel"] = abs(l32 - l64) / abs(l64)
    return row


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["resnet20", "lenet5"])
    parser.add_argument("--steps", nargs="+", type=int, default=[0, 1, 3])
    parser.add_argument("--lrs", nargs="+", type=float, default=[0.1, 0.01])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.99])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--quick", action="store_true", help="random data, batch 8, M in 0 1, lr 0.1")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.steps, args.lrs, args.batch_size = ["resnet20"], [0, 1], [0.1], 8
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"command: `python benchmarks/precision.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, seed {args.seed}\n")
    columns = ["rel err", "worst tensor", *(f"overlap@{100 * s:g} %" for s in args.sparsities), "loss M rel"]
    print("| model | data | M | lr | " + " | ".join(columns) + " |")
    print("|---|---|---:|---:|" + "---:|" * len(columns))
    for name in args.models:
        batch = _batch(name, args.batch_size, args.data_root, args.quick)
        data = "random" if args.quick else DATASET_OF[name]
        for steps in args.steps:
            for lr in args.lrs if steps else args.lrs[:1]:
                row = compare(build_model(name, args.seed), batch, steps, lr, args.sparsities)
                cells = [f"{row['rel_err']:.1e}", f"{row['worst_tensor']:.1e}"]
                cells += [f"{100 * row[f'overlap@{s:g}']:.1f} %" for s in args.sparsities]
                cells.append(f"{row['loss_rel']:.1e}")
                print(
                    f"| {name} | {data} b={args.batch_size} | {steps} | {lr:g} | " + " | ".join(cells) + " |"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
