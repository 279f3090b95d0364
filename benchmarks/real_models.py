"""Real models: what the default rule prunes, and how long scoring takes, per model and mode.

    python benchmarks/real_models.py            # the table of docs/real-models.md
    python benchmarks/real_models.py --quick    # one model, one mode (the smoke test)

Each third-party model of ``benchmarks/third_party.py`` (timm, torchvision, transformers; built from
configs with random init) is wrapped in a LightningModule without ``forward`` and pruned to 90 % by
``Trainer.fit`` with the callback in full, first-order and recompute mode (M = 3, the batch sizes
of the tests). The scoring seconds are the callback's own (``report.seconds``: drawing batches,
finding the weights, scores, selection and guard), on this machine's CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from third_party import CASES, Wrapped

from lightning_prospr import ProsprPruningCallback
from lightning_prospr.prunable import default_parameter_names, prunable_parameters

MODES = {"full": {}, "first-order": {"mode": "first_order"}, "recompute": {"mode": "recompute"}}


def rule_of_0_1(model: nn.Module) -> list[str]:
    """lightning-prospr 0.1.0's default: the weight of every Linear and Conv1d/2d/3d, tied once."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    found = {
        canonical[id(m.weight)]
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and id(m.weight) in canonical
    }
    return [n for n in canonical.values() if n in found]


def left_out(model: nn.Module, chosen: set[str]) -> str:
    """What the rule leaves out, by kind, counted in parameters."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    kinds: dict[str, int] = {}
    for name, p in model.named_parameters():
        if name in chosen:
            continue
        if id(p) in embedded:
            kind = "embeddings"
        elif p.dim() < 2 and name.endswith("bias"):
            kind = "biases"
        elif p.dim() < 2:
            kind = "norm scales"
        else:
            kind = "positional tables and class tokens"
        kinds[kind] = kinds.get(kind, 0) + p.numel()
    return ", ".join(f"{k} {v:,}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))


def seconds(case: str, mode: str) -> float:
    module = Wrapped(case)
    callback = ProsprPruningCallback(sparsity=0.9, steps=3, verbose=False, **MODES[mode])
    pl.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
    ).fit(module)  # fmt: skip
    assert callback.report is not None
    return callback.report.seconds


def full_size() -> None:
    """Published architectures at full size, built on the meta device (no memory, no download) and
    counted with the module-type rule, which selects what the watched pass does on these families
    (tests/test_real_models.py checks that on the small instances)."""
    import timm
    import torchvision
    import transformers

    builders = {
        "GPT-2 small": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config()),
        "BERT-base": lambda: transformers.BertForSequenceClassification(transformers.BertConfig()),
        "Llama-2-7B shape": lambda: transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
            )
        ),
        "ViT-B/16": lambda: timm.create_model("vit_base_patch16_224"),
        "ConvNeXt-T": lambda: timm.create_model("convnext_tiny"),
        "ResNet-50 (torchvision)": lambda: torchvision.models.resnet50(),
        "MobileNetV3-L (torchvision)": lambda: torchvision.models.mobilenet_v3_large(),
    }
    print("\n| full-size model | parameters | pruned by default | matrices | 0.1.0's rule |")
    print("|---|---:|---:|---:|---:|")
    for name, build in builders.items():
        with torch.device("meta"):
            model = build()
        named = dict(model.named_parameters())
        total = sum(p.numel() for p in named.values())
        chosen = default_parameter_names(model)
        pruned = sum(named[n].numel() for n in chosen)
        old = rule_of_0_1(model)
        old_weights = sum(named[n].numel() for n in old)
        print(
            f"| {name} | {total / 1e6:,.1f} M | {pruned / 1e6:,.1f} M ({100 * pruned / total:.0f} %) | "
            f"{len(chosen)} | {len(old)} tensors, {old_weights / 1e6:,.1f} M |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one model in one mode")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = ["hf-gpt2"] if args.quick else list(CASES)
    modes = ["first-order"] if args.quick else list(MODES)
    print(f"torch {torch.__version__}, 1 thread, scoring seconds at 90 % sparsity, M = 3\n")
    print(
        "| model | parameters | pruned by default | matrices | 0.1.0's rule | left out | "
        + " | ".join(f"s {m}" for m in modes)
        + " |"
    )
    print("|---|---:|---:|---:|---:|---|" + "---:|" * len(modes))
    for case in cases:
        spec = CASES[case]
        torch.manual_seed(0)
        model = spec.build()
        batch = spec.batch(torch.Generator().manual_seed(1), torch.float32)
        chosen = prunable_parameters(model, spec.loss, batch)
        named = dict(model.named_parameters())
        total = sum(p.numel() for p in named.values())
        pruned = sum(named[n].numel() for n in chosen)
        old = rule_of_0_1(model)
        old_weights = sum(named[n].numel() for n in old)
        times = [seconds(case, mode) for mode in modes]
        print(
            f"| {case} | {total:,} | {pruned:,} ({100 * pruned / total:.0f} %) | {len(chosen)} | "
            f"{len(old)} tensors, {old_weights:,} | {left_out(model, set(chosen))} | "
            + " | ".join(f"{t:.2f}" for t in times)
            + " |"
        )
    if not args.quick:
        full_size()
        gpt2 = CASES["hf-gpt2"].build()
        print("\nGPT-2 under 0.1.0's rule:", rule_of_0_1(gpt2))
        batch = CASES["hf-gpt2"].batch(torch.Generator().manual_seed(1), torch.float32)
        print("GPT-2 now:", prunable_parameters(gpt2, CASES["hf-gpt2"].loss, batch))


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"\n{time.perf_counter() - start:.0f} s in all")
