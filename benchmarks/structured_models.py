"""Which real models shrink: structured pruning and `shrink` on third-party architectures.

    python benchmarks/structured_models.py            # the table of docs/shrink.md
    python benchmarks/structured_models.py --quick    # one model (the smoke test)

Every model is built from its library's constructor or config with random init (nothing is
downloaded), given structured magnitude masks at 50 % with `allocation="uniform"` (half of every
group's channels) and shrunk with them. Per model: the channel groups found, the pruned weights
left whole (and the commonest reason), the parameters before and after, and the largest relative
difference between the masked and the shrunk network's outputs in eval mode, on the batch the
groups were found with. Models that zero-initialize their classifier (timm's MLP-Mixer) output
zeros at init; their parameters that are all zeros get random values before pruning here, so that
the difference means something.
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
import transformers
from torch import Tensor, nn

from lightning_prospr import PruningSettings, compute_masks, shrink
from lightning_prospr.masking import apply_masks

F = nn.functional
transformers.logging.set_verbosity_error()
ROOT = Path(__file__).resolve().parents[1]
Batch = tuple[Any, Tensor]


def torchvision_model(name: str) -> Callable[[], nn.Module]:
    return lambda: getattr(torchvision.models, name)(num_classes=10)


def timm_model(name: str) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=10)


DECODER = {"vocab_size": 64, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 16}
GQA = {**SIZES, "num_key_value_heads": 2, "intermediate_size": 64}


def decoder(model_type: str, config_type: str, **config: Any) -> Callable[[], nn.Module]:
    """A 2-layer Hugging Face causal LM of width 32 with 4 query heads, from its config."""
    return lambda: getattr(transformers, model_type)(getattr(transformers, config_type)(**DECODER, **config))


TORCHVISION = (
    "resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "squeezenet1_0",
    "mnasnet0_5", "regnet_x_400mf", "convnext_tiny", "shufflenet_v2_x0_5",
)  # fmt: skip
TIMM = (
    "resnet18", "mobilenetv3_small_050", "efficientnet_b0", "convnext_atto", "vit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224", "levit_128s", "mixer_s16_224", "poolformer_s12", "ghostnet_100",
    "edgenext_xx_small", "regnety_002", "mobilevit_xxs", "efficientvit_b0", "fastvit_t8",
)  # fmt: skip
FALCON = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_kv_heads": 2}
DECODERS = {
    "gpt2": decoder("GPT2LMHeadModel", "GPT2Config", n_layer=2, n_embd=32, n_head=4),
    "llama": decoder("LlamaForCausalLM", "LlamaConfig", **GQA),
    "llama-multi-query": decoder("LlamaForCausalLM", "LlamaConfig", **{**GQA, "num_key_value_heads": 1}),
    "qwen2": decoder("Qwen2ForCausalLM", "Qwen2Config", **GQA),
    "gemma-3": decoder("Gemma3ForCausalLM", "Gemma3TextConfig", **GQA, head_dim=8),
    "phi-3": decoder("Phi3ForCausalLM", "Phi3Config", **GQA),
    "gpt-neox": decoder("GPTNeoXForCausalLM", "GPTNeoXConfig", **SIZES, intermediate_size=64),
    "olmo-2": decoder("Olmo2ForCausalLM", "Olmo2Config", **GQA),
    "bloom": decoder("BloomForCausalLM", "BloomConfig", hidden_size=32, n_layer=2, n_head=4),
    "falcon": decoder("FalconForCausalLM", "FalconConfig", new_decoder_architecture=True, **FALCON),
}
#: name: (library, constructor, input side in pixels; 0 for token models)
MODELS: dict[str, tuple[str, Callable[[], nn.Module], int]] = {
    **{f"torchvision-{n}": ("torchvision", torchvision_model(n), 64) for n in TORCHVISION},
    **{f"timm-{n}": ("timm", timm_model(n), 224) for n in TIMM},
    **{n: ("transformers", build, 0) for n, build in DECODERS.items()},
}
QUICK = "torchvision-mobilenet_v3_small"
FIELDS = ("library", "model", "groups", "left_whole", "commonest_reason", "params_dense", "params_shrunk",
          "max_rel_diff", "seconds")  # fmt: skip


def batch_for(side: int) -> Batch:
    generator = torch.Generator().manual_seed(0)
    if side == 0:
        return torch.randint(0, 64, (3, 8), generator=generator), torch.zeros(0)
    return torch.randn(2, 3, side, side, generator=generator), torch.tensor([1, 2])


def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
    x, y = batch
    if not x.is_floating_point():  # a causal language model: its own loss on the tokens
        return model(x, labels=x).loss
    return F.cross_entropy(model(x), y)


def outputs(model: nn.Module, batch: Batch) -> Tensor:
    model.eval()
    with torch.no_grad():
        out = model(batch[0])
    return out.logits if hasattr(out, "logits") else out


def fill_zeros(model: nn.Module) -> None:
    """Random values for the parameters that are all zeros (a zero-initialized classifier)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point() and not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def reason_kind(why: str) -> str:
    """A short name for why a weight was left whole."""
    kinds = (
        ("bare nn.Parameter", "tied to a bare parameter"),
        ("Embedding", "tied to an embedding"),
        ("coupled with", "tied to an unpruned weight"),
        ("does not give the masked", "fails the check"),
        ("did not end", "search bound"),
        ("maps its channels to positions", "positions out of range"),
        ("search for the channels coupled with it failed", "torch-pruning failed"),
        ("one key/value head", "shared key/value head"),
        ("not pruned by output channel", "not a Linear or Conv"),
    )
    return next((label for key, label in kinds if key in why), why[:40])


def measure(name: str) -> dict[str, Any]:
    library, build, side = MODELS[name]
    start = time.perf_counter()
    torch.manual_seed(0)
    model = build()
    fill_zeros(model)
    batch = batch_for(side)
    row: dict[str, Any] = {"library": library, "model": name}
    settings = PruningSettings(0.5, method="magnitude", structured=True, allocation="uniform")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = compute_masks(model, loss_fn, [batch], settings)
            masked, small = copy.deepcopy(model), copy.deepcopy(model)
            apply_masks(masked, {**result.masks, **result.coupled})
            shrink(small, result.channel_masks, batch, loss_fn=loss_fn)
    except ValueError as err:  # the package's own refusal, with its reason
        return {**row, "groups": 0, "commonest_reason": f"error: {str(err)[:90]}",
                "params_dense": sum(p.numel() for p in model.parameters()),
                "seconds": f"{time.perf_counter() - start:.1f}"}  # fmt: skip
    assert result.groups is not None
    a, b = outputs(masked, batch), outputs(small, batch)
    kinds = Counter(reason_kind(why) for why in result.groups.excluded.values())
    return {
        **row,
        "groups": len(result.groups.groups),
        "left_whole": len(result.groups.excluded),
        "commonest_reason": kinds.most_common(1)[0][0] if kinds else "",
        "params_dense": sum(p.numel() for p in model.parameters()),
        "params_shrunk": sum(p.numel() for p in small.parameters()),
        "max_rel_diff": f"{float((a - b).abs().max() / a.abs().max()):.1e}",
        "seconds": f"{time.perf_counter() - start:.1f}",
    }


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| library | model | groups | weights left whole | commonest reason | parameters dense → shrunk | "
        "masked vs shrunk (max rel. diff.) | s |",
        "|---|---|---:|---:|---|---|---:|---:|",
    ]
    for r in rows:
        params = f"{int(r['params_dense']):,}"
        if r.get("params_shrunk"):
            params += f" → {int(r['params_shrunk']):,}"
        cells = [r["library"], r["model"].removeprefix(f"{r['library']}-")]
        cells += [r["groups"], r.get("left_whole") or "-", r.get("commonest_reason") or "-", params]
        cells += [r.get("max_rel_diff") or "-", r["seconds"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help="default: all")
    parser.add_argument("--quick", action="store_true", help=f"only {QUICK} (the smoke test)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results" / "structured-models")
    args = parser.parse_args(argv)
    names = [QUICK] if args.quick else args.models or list(MODELS)
    torch.set_num_threads(1)
    rows = []
    for name in names:
        rows.append(measure(name))
        print(" ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with (args.out_dir / "results.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    command = "python benchmarks/structured_models.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = f"Command: `{command.strip()}`\n\ntorch {torch.__version__}, 1 thread, CPU\n\n{render(rows)}"
    (args.out_dir / "results.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
