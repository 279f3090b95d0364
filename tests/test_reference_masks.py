"""The API of 0.2.0 changed names, not masks: every case of tests/reference_masks.py, computed with
today's `compute_masks(model, loss_fn, batches, PruningSettings(...))`, gives the stored masks bit
for bit (LeNet-5, ResNet-20 and the Transformer; every method and mode), except the one deliberate
change: structured masks of ResNet-20 and the Transformer, whose residual streams stay whole."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from reference_masks import BASE, CASES, FILE, MODELS, build, loss_fn, pack

from lightning_prospr import PruningSettings, compute_masks

#: How each argument of 0.1's compute_masks is said now.
RENAMES = {"num_batches": "unrolls"}


def translate(kwargs: dict[str, Any], sparsity: float) -> PruningSettings:
    """0.1's keyword arguments as 0.2's settings (the changelog's renames, as code)."""
    old = {**BASE, **kwargs}
    method = old.pop("method", "prospr")
    if method == "prospr" and old.get("steps") == 0:  # steps=0 was SNIP
        method = "snip"
    mode = (
        "first_order"
        if old.pop("first_order", False)
        else "recompute"
        if old.pop("recompute", False)
        else "full"
    )
    floor, connected = old.pop("layer_floor", 1), old.pop("keep_connected", True)
    guard = "connected" if connected else "floor" if floor else "off"
    new: dict[str, Any] = {"method": method, "guard": guard}
    if guard != "off":
        new["layer_floor"] = floor
    if method == "prospr":
        new["mode"] = mode
        new.update({k: old.pop(k) for k in ("steps", "lr", "momentum", "weight_decay") if k in old})
    else:  # the inner-loop options did not apply; 0.2.0 refuses them
        for key in ("steps", "lr", "momentum", "weight_decay"):
            old.pop(key, None)
    if method == "grasp" and "num_batches" in old:
        new["grasp_batches"] = old.pop("num_batches")
    new.update({RENAMES.get(k, k): v for k, v in old.items()})
    return PruningSettings(sparsity, **new)


@pytest.fixture(scope="module")
def stored():
    return np.load(FILE)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize(("case", "kwargs", "sparsity"), CASES, ids=[c[0] for c in CASES])
def test_masks_are_bit_for_bit_those_of_0_1(stored, model_name, case, kwargs, sparsity):
    settings = translate(kwargs, sparsity)
    model, data = build(model_name)
    key = f"{model_name}/{case}"
    if settings.structured and model_name != "lenet5":
        # The one deliberate change: structured masks follow channel groups since 0.2.0. ResNet-20's
        # residual stream (the stem and every block's conv2, joined by option-A shortcuts that pad
        # channels) and the Transformer's attention and LayerNorm-ed stream cannot be removed, so
        # they are kept whole: 0.1 pruned them per tensor, into masks no smaller network computes.
        # What remains removable: ResNet-20's block-internal channels, the feed-forward widths.
        kept = {"resnet20": 10, "transformer": 6}[model_name]
        with pytest.warns(UserWarning, match=f"structured pruning keeps {kept} weight"):
            result = compute_masks(model, loss_fn, data, settings)
        old = list(stored[f"{key}/names"])
        inner = {"resnet20": ".conv1.weight", "transformer": ".linear1.weight"}[model_name]
        assert list(result.masks) == [n for n in old if n.endswith(inner)]
        assert len(old) == len(result.masks) + kept
        return
    result = compute_masks(model, loss_fn, data, settings)
    assert list(result.masks) == list(stored[f"{key}/names"])
    assert np.array_equal(pack(result.masks), stored[key]), f"{key} ({settings.describe()})"


def test_the_translation_of_the_renames():
    assert translate({"first_order": True}, 0.9).mode == "first_order"
    assert translate({"recompute": True}, 0.9).mode == "recompute"
    assert translate({"steps": 0}, 0.9).method == "snip"
    assert translate({"layer_floor": 0, "keep_connected": False}, 0.9).guard == "off"
    assert translate({"keep_connected": False}, 0.9).guard == "floor"
    assert translate({"num_batches": 2}, 0.9).unrolls == 2
    assert translate({"method": "grasp", "num_batches": 2}, 0.9).grasp_batches == 2
