"""benchmarks/structured_models.py: which real models shrink (its smoke run, and its reasons)."""

from __future__ import annotations

import csv
from pathlib import Path

from benchmark_scripts import load_script, run_script


def test_quick_run_shrinks_a_torchvision_model_to_the_masked_network(tmp_path: Path) -> None:
    run_script("structured_models", "--quick", "--out-dir", str(tmp_path))
    (row,) = list(csv.DictReader((tmp_path / "results.csv").open(encoding="utf-8")))
    assert row["model"] == "torchvision-mobilenet_v3_small" and int(row["groups"]) > 0
    assert int(row["params_shrunk"]) < int(row["params_dense"])
    assert float(row["max_rel_diff"]) <= 1e-4
    assert "| torchvision | mobilenet_v3_small |" in (tmp_path / "results.md").read_text(encoding="utf-8")


def test_reasons_get_short_names_from_the_package_messages() -> None:
    kind = load_script("structured_models").reason_kind
    assert kind("its channels reach a bare nn.Parameter, which torch-pruning would cut too") == (
        "tied to a bare parameter"
    )
    assert (
        kind("removing its heads by the layout of `a` does not give the masked network") == "fails the check"
    )
    assert kind("something new") == "something new"
