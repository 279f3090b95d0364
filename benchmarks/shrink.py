"""What shrinking buys: train-step and inference time, parameters and MACs, dense vs masked vs shrunk.

Run from the repository root::

    python benchmarks/shrink.py                      # ResNet-20 and VGG-16-BN at 50 / 75 / 90 %
    python benchmarks/shrink.py --quick              # smoke test (ResNet-20, 50 %, batch 16)
    python benchmarks/shrink.py --memory-format channels_last \
        --out-dir benchmarks/results/shrink-channels-last  # the same in channels-last layout
    python benchmarks/shrink.py --models resnet20 --sparsities 0.75 --round-to 8 --out-dir /tmp/round8
    python benchmarks/shrink.py --models gpt2 --batch 16 --out-dir benchmarks/results/shrink-gpt2
    python benchmarks/shrink.py --models llama --batch 16 --out-dir benchmarks/results/shrink-llama

For each model (CIFAR-shaped random images, 10 classes, cross-entropy) and structured sparsity,
structured ProsPr masks (default settings, one scoring batch of 32) give three networks from the
same initialization. `gpt2` is Hugging Face's GPT-2 from a config (4 layers of width 256, 8 heads,
MLP width 1024, vocabulary 2048, random init) on random token sequences of 64, with its language
modelling loss; its masks take `head_sparsity` equal to the sparsity (its heads, apart from the MLP
widths), and its residual stream, tied to the embeddings, stays whole. `llama` is Hugging Face's
Llama the same way (4 layers of width 256, 8 query heads of 32 on 4 key/value heads, MLP width
1024, vocabulary 2048): its unit of `head_sparsity` is a key/value head with its two query heads.
`--batch` counts sequences for both. The three networks:

* **dense**: the network as built;
* **masked**: the dense network under the structured masks (`apply_masks`, the
  `torch.nn.utils.prune` re-parametrization the callback uses without `shrink`);
* **shrunk**: the dense network after `shrink(...)`, the pruned channels removed.

Each is timed in the same process, interleaved (one call of each per repetition, so that drift in
the machine's load affects all three alike): a **train step** (`zero_grad`, forward, backward,
SGD step with momentum) and an **inference** pass (eval mode, `torch.no_grad`), at `--batch`
(default 128). The figure is the median CPU time of the process over `--repeats` calls after one
warm-up call, with `--threads` (default 1) OpenMP threads: with one thread the CPU time counts the
work done whatever else runs on the machine. `--memory-format channels_last` puts every network
and the images in channels-last layout (oneDNN's preferred layout for convolutions on CPU), the
same for all three networks. `--round-to k` rounds every shrunk width up to a multiple of k (the
extra channels are the lowest-numbered removed ones: a timing experiment, not a pruning rule), to
see whether kernels favour such widths. Parameters are counted; MACs are those of one
forward pass of one image or sequence (`torch.utils.flop_counter.FlopCounterMode`, FLOPs / 2). The masked
network runs the dense kernels, so its MACs are the dense ones.

The goals (issue "Prune at initialization, train faster"): at 75 % the shrunk train step is at most
0.7x the dense one, and the measured speedup is at least 0.7x the MAC reduction at batch 128
(`speedup / MAC reduction` >= 0.7 in the table).
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from lightning_prospr import PruningSettings, apply_masks, compute_masks, shrink
from lightning_prospr.models import VGG16BN, ResNet20

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common.timing import timed

SEQUENCE = 64  #: tokens per GPT-2 sequence
VOCABULARY = 2048


def gpt2() -> nn.Module:
    import transformers

    config = transformers.GPT2Config(
        n_layer=4, n_embd=256, n_head=8, n_inner=1024, vocab_size=VOCABULARY, n_positions=SEQUENCE,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def llama() -> nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        num_hidden_layers=4, hidden_size=256, num_attention_heads=8, num_key_value_heads=4,
        intermediate_size=1024, vocab_size=VOCABULARY, max_position_embeddings=SEQUENCE,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def images(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def sequences(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCABULARY, (n, SEQUENCE), generator=gen)
    return ids, ids


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return model(batch[0], labels=batch[1]).loss


@dataclass(frozen=True)
class Case:
    """A benchmarked model: how to build it, its batches, its loss, whether heads are pruned apart."""

    build: Callable[[], nn.Module]
    batch: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    heads: bool = False


MODELS: dict[str, Case] = {
    "resnet20": Case(ResNet20, images, loss_fn),
    "vgg16bn": Case(VGG16BN, images, loss_fn),
    "gpt2": Case(gpt2, sequences, lm_loss, heads=True),
    "llama": Case(llama, sequences, lm_loss, heads=True),
}
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
COLUMNS = [
    "model", "sparsity", "variant", "parameters", "macs", "train_s", "infer_s",
    "train_vs_dense", "infer_vs_dense", "mac_reduction", "train_speedup_vs_macs",
]  # fmt: skip


def macs(model: nn.Module, case: Case) -> int:
    """Multiply-accumulates of one forward pass of one image (or sequence)."""
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(case.batch(1, torch.Generator().manual_seed(0))[0])
    model.train(was_training)
    return counter.get_total_flops() // 2


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple, case: Case
) -> Callable[[], None]:
    def step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        case.loss(model, batch).backward()
        optimizer.step()

    return step


def inference(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        model.eval()
        with torch.no_grad():
            model(x)

    return run


def round_widths(channel_masks: dict[str, torch.Tensor], multiple: int) -> dict[str, torch.Tensor]:
    """Each channel mask with removed channels put back until the kept count is a multiple of
    `multiple` (or every channel is kept); coupled weights, having equal masks, stay equal."""
    out = {}
    for name, mask in channel_masks.items():
        keep = mask.reshape(-1).bool().clone()
        kept = int(keep.sum())
        want = min(keep.numel(), -(-kept // multiple) * multiple)
        keep[(~keep).nonzero().reshape(-1)[: want - kept]] = True
        out[name] = keep
    return out


def networks(name: str, sparsity: float, seed: int, round_to: int = 1) -> dict[str, nn.Module]:
    """Dense, masked and shrunk networks of one initialization."""
    case = MODELS[name]
    torch.manual_seed(seed)
    dense = case.build()
    state = {k: v.clone() for k, v in dense.state_dict().items()}
    scoring = [case.batch(32, torch.Generator().manual_seed(seed))]
    heads = sparsity if case.heads else None
    settings = PruningSettings(sparsity=sparsity, structured=True, head_sparsity=heads)
    result = compute_masks(dense, case.loss, scoring, settings)
    masked = case.build()
    masked.load_state_dict(state)
    apply_masks(masked, {**result.masks, **result.coupled})
    small = case.build()
    small.load_state_dict(state)
    channel_masks = round_widths(result.channel_masks, round_to) if round_to > 1 else result.channel_masks
    shrink(small, channel_masks, loss_fn=case.loss, example_input=scoring[0])
    dense.load_state_dict(state)
    return {"dense": dense, "masked": masked, "shrunk": small}


def measure(
    name: str,
    sparsity: float,
    batch: int,
    repeats: int,
    seed: int,
    memory_format: str = "contiguous",
    round_to: int = 1,
    nets: dict[str, nn.Module] | None = None,
) -> list[dict[str, object]]:
    """Time the dense, masked and shrunk networks of `networks(name, sparsity, seed, round_to)`
    (or the given `nets`), and count their parameters and MACs: one row each."""
    case = MODELS[name]
    nets = nets or networks(name, sparsity, seed, round_to)
    layout = MEMORY_FORMATS[memory_format]
    for net in nets.values():
        net.to(memory_format=layout)
    inputs, targets = case.batch(batch, torch.Generator().manual_seed(seed + 1))
    data = (inputs.contiguous(memory_format=layout) if inputs.dim() == 4 else inputs, targets)
    calls = {}
    for variant, net in nets.items():
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        calls[variant] = (train_step(net, optimizer, data, case), inference(net, data[0]))
    times: dict[str, tuple[list[float], list[float]]] = {v: ([], []) for v in nets}
    for repeat in range(repeats + 1):
        for variant, (step, infer) in calls.items():
            train_cpu, infer_cpu = timed(step)[1], timed(infer)[1]
            if repeat:  # the first call of each is a warm-up
                times[variant][0].append(train_cpu)
                times[variant][1].append(infer_cpu)
    rows = []
    dense_macs = macs(nets["dense"], case)
    medians = {v: (statistics.median(t), statistics.median(i)) for v, (t, i) in times.items()}
    for variant, net in nets.items():
        net_macs = dense_macs if variant == "masked" else macs(net, case)
        train_s, infer_s = medians[variant]
        train_vs, infer_vs = train_s / medians["dense"][0], infer_s / medians["dense"][1]
        reduction = dense_macs / net_macs
        rows.append(
            {
                "model": name,
                "sparsity": sparsity,
                "variant": variant,
                "parameters": sum(p.numel() for p in net.parameters()),
                "macs": net_macs,
                "train_s": round(train_s, 4),
                "infer_s": round(infer_s, 4),
                "train_vs_dense": round(train_vs, 3),
                "infer_vs_dense": round(infer_vs, 3),
                "mac_reduction": round(reduction, 2),
                "train_speedup_vs_macs": round((1 / train_vs) / reduction, 2),
            }
        )
    return rows


def render(rows: list[dict[str, object]], header: str) -> str:
    lines = [
        header,
        "",
        "| model | sparsity | network | parameters | MACs / sample | train step s | vs dense | inference s "
        "| vs dense | MAC reduction | train speedup / MAC reduction |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {float(r['sparsity']):.0%} | {r['variant']} | {int(r['parameters']):,} "
            f"| {int(r['macs']) / 1e6:.1f} M | {r['train_s']} | {float(r['train_vs_dense']):.2f}x "
            f"| {r['infer_s']} | {float(r['infer_vs_dense']):.2f}x | {float(r['mac_reduction']):.1f}x "
            f"| {float(r['train_speedup_vs_macs']):.2f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.75, 0.9])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-format", choices=list(MEMORY_FORMATS), default="contiguous")
    parser.add_argument("--round-to", type=int, default=1, help="round shrunk widths up to a multiple")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results/shrink"))
    parser.add_argument("--quick", action="store_true", help="ResNet-20, 50 %%, batch 16, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.sparsities, args.batch, args.repeats = ["resnet20"], [0.5], 16, 1
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, object]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        for sparsity in args.sparsities:
            rows.extend(
                measure(
                    name, sparsity, args.batch, args.repeats, args.seed, args.memory_format, args.round_to
                )
            )
            print(render(rows[-3:], f"{name} {sparsity:.0%}"), flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    header = (
        f"Structured ProsPr, batch {args.batch}, median CPU time of {args.repeats} interleaved calls, "
        f"{args.threads} thread(s), {args.memory_format} memory format"
        + (f", shrunk widths rounded up to multiples of {args.round_to}" if args.round_to > 1 else "")
        + f"; torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}."
    )
    (args.out_dir / "results.md").write_text(render(rows, header), encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
