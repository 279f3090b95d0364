"""The structured-accuracy benchmark: it runs end to end, every method of a cell has the same
shape (channels) or the same exact pattern (2:4), and its table says so (or flags a cell where the
MACs differ)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from benchmark_scripts import ROOT, load_script, run_script

DATA = ROOT.parent / "shared" / "data"


@pytest.mark.skipif(
    not (DATA / "MNIST" / "raw").is_dir(), reason=f"real MNIST not found under {DATA} (offline data folder)"
)
def test_structured_accuracy_quick_gives_every_method_the_same_small_network(tmp_path: Path) -> None:
    run_script("structured_accuracy", "--quick", "--out-dir", str(tmp_path), "--data-root", str(DATA))
    every = list(csv.DictReader(open(tmp_path / "results.csv")))
    rows = {r["method"]: r for r in every if r["structure"] == "channels"}
    assert list(rows) == ["dense", "prospr", "snip", "magnitude", "random"]
    dense = rows.pop("dense")
    assert dense["parameters"] == "266610" and dense["kept_channels"] == ""  # LeNet-300-100, whole
    # 75 % of the 300 and 100 hidden units removed in each layer: 784-75-25-10.
    expected = 784 * 75 + 75 + 75 * 25 + 25 + 25 * 10 + 10
    assert {r["parameters"] for r in rows.values()} == {str(expected)}
    assert {r["kept_channels"] for r in rows.values()} == {"75 25"}
    assert {r["macs"] for r in rows.values()} == {str(784 * 75 + 75 * 25 + 25 * 10)}
    assert all(0 <= float(r["test_acc"]) <= 100 for r in rows.values())
    table = (tmp_path / "results.md").read_text()
    assert f"| lenet300100 | 75% of channels | {784 * 75 + 75 * 25 + 25 * 10:,} | {expected} |" in table
    # 2:4: every layer of LeNet-300-100 (inputs 784, 300, 100) keeps exactly half of its weights.
    two_four = [r for r in every if r["structure"] == "2:4"]
    assert [r["method"] for r in two_four] == ["prospr", "snip", "magnitude", "random"]
    assert {r["removed"] for r in two_four} == {"0.5000"}
    assert {r["kept_channels"] for r in two_four} == {"0.50 0.50 0.50"}
    assert {r["parameters"] for r in two_four} == {"266610"}  # masked, not shrunk
    assert "| lenet300100 | 2:4 (50.0% of weights) | 266,200 | 266610 |" in table


@pytest.mark.slow
@pytest.mark.skipif(
    not (DATA / "cifar-10-batches-py").is_dir(),
    reason=f"real CIFAR-10 not found under {DATA} (offline data folder)",
)
def test_structured_accuracy_cifar_grid_shrinks_resnet20_inner_widths_alike(tmp_path: Path) -> None:
    run_script(
        "structured_accuracy", "--grid", "cifar10-short", "--quick", "--structures", "channels",
        "--methods", "prospr", "random", "--out-dir", str(tmp_path), "--data-root", str(DATA),
        timeout=900,
    )  # fmt: skip
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [(r["dataset"], r["model"], r["method"]) for r in rows] == [
        ("cifar10", "resnet20", "prospr"),
        ("cifar10", "resnet20", "random"),
    ]
    # The blocks' inner widths (16, 32, 64 in the three stages) lose 75 %; the residual stream stays.
    assert {r["kept_channels"] for r in rows} == {"4 4 4 8 8 8 16 16 16"}
    assert len({(r["macs"], r["parameters"]) for r in rows}) == 1
    assert "wd=0.0005" in rows[0]["recipe"] and rows[0]["recipe"].endswith("bf16")


def test_models_of_another_data_set_are_refused() -> None:
    bench = load_script("structured_accuracy")
    with pytest.raises(SystemExit):
        bench.parse_args(["--models", "resnet20"])
    assert bench.parse_args(["--grid", "cifar10-short"]).models == ["resnet20"]
    assert bench.parse_args([]).out_dir.name == "structured"
    assert bench.parse_args(["--grid", "cifar10-short"]).out_dir.name == "structured-cifar10-short"


def _row(method: str, acc: float, macs: int, seed: int) -> dict[str, str]:
    return {
        "model": "lenet5", "structure": "channels", "method": method, "sparsity": "0.5",
        "seed": str(seed), "test_acc": str(acc), "macs": str(macs), "parameters": "100",
    }  # fmt: skip


def test_render_bolds_the_best_mean_and_flags_unequal_macs() -> None:
    bench = load_script("structured_accuracy")
    rows = [_row("prospr", 90.0, 10, 0), _row("prospr", 92.0, 10, 1), _row("snip", 95.0, 10, 0)]
    table = bench.render(rows, ["prospr", "snip"])
    assert "| lenet5 | 50% of channels | 10 | 100 | 91.00 ± 1.41 | **95.00 ± 0.00** | 2 |" in table
    table = bench.render([*rows, _row("snip", 95.0, 12, 1)], ["prospr", "snip"])
    assert "differ: 10, 12" in table
