"""Smoke test: the shrink benchmark runs end to end, and its counts are those of the networks."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_script, run_script


def test_shrink_benchmark_quick_counts_a_smaller_network(tmp_path: Path) -> None:
    run_script("shrink", "--quick", "--out-dir", str(tmp_path))
    rows = {r["variant"]: r for r in csv.DictReader(open(tmp_path / "results.csv"))}
    assert list(rows) == ["dense", "masked", "shrunk"]
    dense, masked, small = rows["dense"], rows["masked"], rows["shrunk"]
    assert dense["parameters"] == masked["parameters"] == "269722"  # ResNet-20, masks change no shape
    assert dense["macs"] == masked["macs"] and int(dense["macs"]) == 40_551_040  # 40.6 M MACs per image
    assert int(small["parameters"]) < int(dense["parameters"]) // 2 + 10_000
    assert int(small["macs"]) < int(dense["macs"])
    assert float(small["mac_reduction"]) > 1 and all(float(r["train_s"]) > 0 for r in rows.values())
    assert "| resnet20 | 50% | shrunk |" in (tmp_path / "results.md").read_text()


def test_round_widths_puts_back_removed_channels_up_to_a_multiple() -> None:
    round_widths = load_script("shrink").round_widths
    a = torch.tensor([True, False, True, False, False, False, True, False, False, False])  # 3 kept
    full = torch.tensor([True, False, True])  # 2 kept of 3: rounding up to 8 keeps all 3
    out = round_widths({"a": a, "b": a.clone(), "full": full}, 4)
    assert int(out["a"].sum()) == 4 and bool(out["a"][a].all())  # the kept ones stay kept
    assert torch.equal(out["a"], out["b"])  # equal (coupled) masks stay equal
    assert int(round_widths({"full": full}, 8)["full"].sum()) == 3
    assert int(out["full"].sum()) == 3


@pytest.mark.slow  # about a minute on a loaded 2-core machine: ProsPr masks of a 3.7 M-parameter GPT-2
def test_shrink_benchmark_gpt2_case_removes_heads_and_mlp_width() -> None:
    """The GPT-2 case: 8 heads and MLP width 1024 per block; at 50 % half of every block's heads
    go and the MLP widths share the global budget; the residual stream (tied to the embeddings)
    stays whole; the counts are those of the networks."""
    module = load_script("shrink")
    nets = module.networks("gpt2", 0.5, seed=0)
    dense, small = nets["dense"], nets["shrunk"]
    for block in small.transformer.h:
        assert (block.attn.num_heads, block.attn.c_attn.weight.shape) == (4, (256, 384))
        assert block.mlp.c_fc.weight.shape[0] == 256 and 0 < block.mlp.c_fc.weight.shape[1] < 1024
    assert small.transformer.wte.weight.shape == dense.transformer.wte.weight.shape
    rows = {r["variant"]: r for r in module.measure("gpt2", 0.5, batch=2, repeats=1, seed=0, nets=nets)}
    assert rows["shrunk"]["parameters"] == sum(p.numel() for p in small.parameters())
    assert (
        rows["dense"]["parameters"]
        == rows["masked"]["parameters"]
        == sum(p.numel() for p in dense.parameters())
    )
    assert int(rows["shrunk"]["macs"]) < int(rows["dense"]["macs"]) == int(rows["masked"]["macs"])
    assert "| gpt2 | 50% | shrunk |" in module.render(list(rows.values()), "")


@pytest.mark.slow  # about a minute on a loaded 2-core machine, like the GPT-2 case
def test_shrink_benchmark_llama_case_removes_key_value_heads_with_their_query_heads() -> None:
    """The Llama case: 8 query heads of 32 on 4 key/value heads; at 50 % two key/value heads of
    each block go with their four query heads, and the MLP widths share the global budget."""
    module = load_script("shrink")
    nets = module.networks("llama", 0.5, seed=0)
    for layer in nets["shrunk"].model.layers:
        attention = layer.self_attn
        assert attention.q_proj.weight.shape == (128, 256) and attention.o_proj.weight.shape == (256, 128)
        assert attention.k_proj.weight.shape == attention.v_proj.weight.shape == (64, 256)
        assert 0 < layer.mlp.gate_proj.weight.shape[0] < 1024
    rows = {r["variant"]: r for r in module.measure("llama", 0.5, batch=2, repeats=1, seed=0, nets=nets)}
    assert int(rows["shrunk"]["macs"]) < int(rows["dense"]["macs"]) == int(rows["masked"]["macs"])
