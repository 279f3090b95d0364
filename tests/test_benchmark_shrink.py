"""Smoke test: the shrink benchmark runs end to end, and its counts are those of the networks."""

from __future__ import annotations

import csv
from pathlib import Path

from benchmark_scripts import run_script


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
