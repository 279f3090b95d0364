"""Masks computed before the API of 0.2.0 (at commit "Docs: Real models page", the end of the
"every real model" work), stored bit for bit, and the cases that made them.

    python tests/reference_masks.py      # writes tests/data/reference_masks.npz (do not rerun lightly)

tests/test_reference_masks.py recomputes every case with today's API and compares the bits: the
API changes of 0.2.0 changed names, not masks. Each case is written in the words of the API that
made the file (``first_order``, ``recompute``, ``num_batches``, ``layer_floor`` ...); the test
translates them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_prospr.models import LeNet5, ResNet20, TinyTransformerEncoder

FILE = Path(__file__).with_name("data") / "reference_masks.npz"
F = nn.functional

#: Shared by every case: one thread, float64 models, lr 0.01 (a well-conditioned unroll).
BASE: dict[str, Any] = {"steps": 3, "lr": 0.01}

#: ``(case name, keyword arguments of 0.1's compute_masks, sparsity)``.
CASES: list[tuple[str, dict[str, Any], float]] = [
    ("prospr-full", {}, 0.9),
    ("prospr-first_order", {"first_order": True}, 0.9),
    ("prospr-recompute", {"recompute": True}, 0.9),
    ("prospr-momentum-wd", {"momentum": 0.9, "weight_decay": 5e-4}, 0.9),
    ("prospr-rounds3", {"rounds": 3}, 0.95),
    ("prospr-num_batches2", {"num_batches": 2}, 0.9),
    ("prospr-guarded-0.99", {}, 0.99),
    ("prospr-plain-0.99", {"layer_floor": 0, "keep_connected": False}, 0.99),
    ("prospr-floor-only-0.99", {"keep_connected": False}, 0.99),
    ("prospr-structured", {"structured": True}, 0.5),
    ("snip", {"method": "snip"}, 0.9),
    ("snip-first_order", {"method": "snip", "first_order": True}, 0.9),
    ("snip-steps0", {"steps": 0}, 0.9),
    ("snip-rounds3", {"method": "snip", "rounds": 3}, 0.95),
    ("snip-structured", {"method": "snip", "structured": True}, 0.5),
    ("grasp", {"method": "grasp"}, 0.9),
    ("grasp-num_batches2", {"method": "grasp", "num_batches": 2}, 0.9),
    ("synflow", {"method": "synflow"}, 0.9),
    ("synflow-one-shot", {"method": "synflow", "rounds": 1}, 0.9),
    ("magnitude", {"method": "magnitude"}, 0.9),
    ("magnitude-structured", {"method": "magnitude", "structured": True}, 0.5),
    ("random", {"method": "random", "seed": 3}, 0.9),
    ("random-structured", {"method": "random", "structured": True}, 0.5),
]


def lenet5() -> tuple[nn.Module, list[Any]]:
    gen = torch.Generator().manual_seed(1)
    data = [
        (
            torch.randn(8, 1, 28, 28, generator=gen, dtype=torch.float64),
            torch.randint(0, 10, (8,), generator=gen),
        )
        for _ in range(8)
    ]
    return LeNet5().double(), data


def resnet20() -> tuple[nn.Module, list[Any]]:
    gen = torch.Generator().manual_seed(2)
    data = [
        (
            torch.randn(8, 3, 32, 32, generator=gen, dtype=torch.float64),
            torch.randint(0, 10, (8,), generator=gen),
        )
        for _ in range(8)
    ]
    return ResNet20().double(), data


def transformer() -> tuple[nn.Module, list[Any]]:
    gen = torch.Generator().manual_seed(3)
    data = [
        (torch.randint(0, 32, (8, 16), generator=gen), torch.randint(0, 2, (8,), generator=gen))
        for _ in range(8)
    ]
    model = TinyTransformerEncoder(32, d_model=32, nhead=4, num_layers=2, num_classes=2, max_len=16)
    return model.double(), data


MODELS = {"lenet5": lenet5, "resnet20": resnet20, "transformer": transformer}


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def build(name: str) -> tuple[nn.Module, list[Any]]:
    torch.manual_seed(0)
    return MODELS[name]()


def pack(masks: dict[str, torch.Tensor]) -> np.ndarray:
    """The masks' bits, in order, concatenated and packed (names are stored beside them)."""
    flat = torch.cat([m.reshape(-1).cpu() for m in masks.values()]).numpy().astype(bool)
    return np.packbits(flat)


def main() -> None:
    from lightning_prospr.pipeline import compute_masks

    torch.set_num_threads(1)
    arrays: dict[str, np.ndarray] = {}
    for model_name in MODELS:
        for case, kwargs, sparsity in CASES:
            model, data = build(model_name)
            result = compute_masks(model, loss_fn, data, sparsity, **{**BASE, **kwargs})
            key = f"{model_name}/{case}"
            arrays[key] = pack(result.masks)
            arrays[f"{key}/names"] = np.array(list(result.masks))
            print(key, sum(int(m.sum()) for m in result.masks.values()), "kept", flush=True)
    FILE.parent.mkdir(exist_ok=True)
    np.savez_compressed(FILE, **arrays)
    print(f"wrote {FILE} ({FILE.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    sys.exit(main())
