"""Per-layer density each method gives on ResNet-20, and the seconds each scorer takes.

    python benchmarks/densities.py --sparsities 0.99 0.999 --out docs/densities.md

Scores come from one batch of real CIFAR-10 training images when ``--data-root`` holds them (random
images otherwise, said in the output), with the layer-collapse guard on (the default) and, for
comparison, the number of layers plain top-k would have emptied.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

from lightning_prospr import PruningSettings, compute_masks
from lightning_prospr.models import ResNet20

METHODS: dict[str, dict[str, str]] = {
    "prospr": {"method": "prospr"},
    "prospr-fo": {"method": "prospr", "mode": "first_order"},
    "snip": {"method": "snip"},
    "grasp": {"method": "grasp"},
    "synflow": {"method": "synflow"},
    "magnitude": {"method": "magnitude"},
    "random": {"method": "random"},
}


def cifar_batch(root: Path, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """A batch of normalized CIFAR-10 training images, or random ones when the data are absent."""
    gen = torch.Generator().manual_seed(seed)
    if (root / "cifar-10-batches-py").is_dir():
        from torchvision import datasets

        data = datasets.CIFAR10(str(root), train=True, download=False)
        idx = torch.randperm(len(data), generator=gen)[:size]
        x = torch.tensor(data.data[idx.numpy()]).permute(0, 3, 1, 2).float() / 255
        mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
        std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
        y = torch.tensor(data.targets)[idx]
        return (x - mean) / std, y, f"{size} CIFAR-10 training images"
    return torch.randn(size, 3, 32, 32, generator=gen), torch.randint(0, 10, (size,), generator=gen), "random"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.99, 0.999])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = ResNet20()
    x, y, source = cifar_batch(Path(args.data_root), args.batch_size, args.seed)

    def loss(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    command = " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# Per-layer density on ResNet-20",
        "",
        f"Command: `python benchmarks/{Path(__file__).name} {command}`",
        f"Scoring batch: {source}; torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads. Density in % of each layer's weights kept, with the "
        "layer-collapse guard on (default); `collapsed` counts the layers plain top-k would empty; "
        "`s` is the scorer's wall time (scores, selection and guard) on a shared 2-core CPU.",
    ]
    for sparsity in args.sparsities:
        table: dict[str, dict[str, float]] = {}
        seconds: dict[str, float] = {}
        collapsed: dict[str, int] = {}
        for name in args.methods:
            start = time.perf_counter()
            settings = PruningSettings(sparsity, **METHODS[name])  # type: ignore[arg-type]
            result = compute_masks(model, loss, [(x, y)], settings, example_input=x)
            seconds[name] = time.perf_counter() - start
            plain_settings = PruningSettings(sparsity, guard="off", **METHODS[name])  # type: ignore[arg-type]
            plain = compute_masks(model, loss, [(x, y)], plain_settings, example_input=x)
            collapsed[name] = sum(int(m.sum()) == 0 for m in plain.masks.values())
            table[name] = {n: 100 * m.float().mean().item() for n, m in result.masks.items()}
            print(
                f"{sparsity} {name}: {seconds[name]:.1f} s, {collapsed[name]} layers empty without the guard"
            )
        layers = list(next(iter(table.values())))
        lines += ["", f"## Sparsity {100 * sparsity:g} %", ""]
        lines.append("| layer | " + " | ".join(args.methods) + " |")
        lines.append("|---|" + "---:|" * len(args.methods))
        for layer in layers:
            lines.append(f"| {layer} | " + " | ".join(f"{table[m][layer]:.3g}" for m in args.methods) + " |")
        lines.append("| **seconds** | " + " | ".join(f"{seconds[m]:.1f}" for m in args.methods) + " |")
        lines.append(
            "| **collapsed without guard** | " + " | ".join(str(collapsed[m]) for m in args.methods) + " |"
        )
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
