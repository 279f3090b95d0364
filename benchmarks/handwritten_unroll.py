"""Does the engine add time of its own? ``prospr_scores`` against a hand-written unroll.

Run from the repository root::

    python benchmarks/handwritten_unroll.py                 # ResNet-20, batch 128, M = 3, 3 calls each
    python benchmarks/handwritten_unroll.py --quick         # smoke test: batch 8, M = 1, 1 call each

The hand-written version is the textbook reverse-over-reverse unroll and nothing else:
:func:`torch.func.functional_call` on ``c * theta_0``, ``M`` SGD steps with
``torch.autograd.grad(create_graph=True)`` on every parameter, one backward pass from the loss after
step ``M`` to the masks ``c``. No state restoring, no error handling, no memory release. Both run on
the same model and batch (BatchNorm in train mode, on cloned buffers), alternately, one thread; the
script prints the largest score difference relative to the largest score, and the CPU time
(:func:`time.process_time`) of every call.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common.timing import timed

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the package, also when it is not installed
    sys.path.insert(0, str(ROOT))


def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def handwritten_scores(
    model: nn.Module, batch: tuple[Tensor, Tensor], names: Sequence[str], steps: int, lr: float
) -> dict[str, Tensor]:
    """``|dL_M/dc|`` at ``c = 1`` by the plainest reverse-over-reverse unroll."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    masks = {n: torch.ones_like(p, requires_grad=True) for n, p in model.named_parameters() if n in names}
    w = {
        n: masks[n] * p.detach() if n in masks else p.detach().requires_grad_(True)
        for n, p in model.named_parameters()
    }
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(model, (w, buffers), (batch[0],)), batch[1])
        grads = torch.autograd.grad(loss, list(w.values()), create_graph=True)
        w = {n: v - lr * g for (n, v), g in zip(w.items(), grads, strict=True)}
    loss = F.cross_entropy(functional_call(model, (w, buffers), (batch[0],)), batch[1])
    found = torch.autograd.grad(loss, [masks[n] for n in names])
    return {n: g.abs() for n, g in zip(names, found, strict=True)}


def main(argv: Sequence[str] | None = None) -> int:
    from lightning_prospr import default_parameter_names, prospr_scores
    from lightning_prospr.models import ResNet20

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="batch 8, M = 1, 1 call each")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.steps, args.repeats = 8, 1, 1
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ResNet20(num_classes=10).train()
    batch = (torch.randn(args.batch_size, 3, 32, 32), torch.randint(0, 10, (args.batch_size,)))
    names = default_parameter_names(model)

    def engine() -> dict[str, Tensor]:
        return prospr_scores(model, loss_fn, [batch], steps=args.steps)

    def handwritten() -> dict[str, Tensor]:
        return handwritten_scores(model, batch, names, args.steps, 0.1)

    ours, reference = engine(), handwritten()  # also the warm-up
    top = max(float(s.abs().max()) for s in reference.values())
    difference = max(float((ours[n] - reference[n]).abs().max()) for n in names) / top
    given = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python", "benchmarks/handwritten_unroll.py", *given])
    print(f"command: `{command}`")
    print(f"torch {torch.__version__}, 1 thread, ResNet-20, batch {args.batch_size}, M = {args.steps}")
    print(f"max |engine - handwritten| / max score: {difference:.1e}\n")
    print("| call | engine CPU s | hand-written CPU s |")
    print("|---:|---:|---:|")
    for call in range(args.repeats):
        seconds = [timed(fn)[1] for fn in (engine, handwritten)]  # CPU seconds
        print(f"| {call + 1} | {seconds[0]:.3f} | {seconds[1]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
