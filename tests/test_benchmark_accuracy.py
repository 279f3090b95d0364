"""Smoke test: the accuracy benchmark runs a tiny grid on real MNIST and writes its CSV, table and plot."""

from __future__ import annotations

import csv
import json
import types
from pathlib import Path

import pytest
import torch
from benchmark_scripts import ROOT, load_script, run_script

DATA = ROOT.parent / "shared" / "data"

pytestmark = pytest.mark.skipif(
    not (DATA / "MNIST" / "raw").is_dir(), reason=f"real MNIST not found under {DATA} (offline data folder)"
)

COLUMNS = [
    "dataset",
    "model",
    "method",
    "allocation",
    "guard",
    "ablation",
    "sparsity",
    "effective_sparsity",
    "seed",
    "test_acc",
    "val_acc",
    "final_train_loss",
    "score_seconds",
    "train_seconds",
    "layer_density",
    "effective_density",
    "guard_changes",
    "actual_sparsity",
    "zeros_ok",
    "recipe",
    "scoring",
    "threads",
    "torch",
]


def test_quick_grid_writes_csv_table_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "--quick",
        "--methods",
        "dense",
        "random",
        "snip",
        "synflow",
        "prospr",
        "prospr+erk",
        "prospr+shuffle",
        "--sparsities",
        "0.9",
        "0.99",
    ]
    proc = run_script("accuracy", *args, "--out-dir", str(tmp_path), "--data-root", str(DATA))
    assert "13 runs, 0 already in" in proc.stdout

    with open(tmp_path / "results.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    assert len(rows) == 1 + 6 * 2  # dense once, 6 methods x 2 sparsities
    assert {(r["method"], r["allocation"], r["ablation"], r["sparsity"]) for r in rows} >= {
        ("dense", "global", "none", "0"),
        ("prospr", "global", "none", "0.99"),
        ("prospr", "erk", "none", "0.99"),
        ("prospr", "global", "shuffle", "0.9"),
        ("synflow", "global", "none", "0.9"),
    }
    by = {(r["method"], r["allocation"], r["ablation"], r["sparsity"]): r for r in rows}
    plain, shuffled = by[("prospr", "global", "none", "0.99")], by[("prospr", "global", "shuffle", "0.99")]
    assert plain["layer_density"] == shuffled["layer_density"]  # the shuffle keeps every layer's density
    erk = json.loads(by[("prospr", "erk", "none", "0.99")]["layer_density"])
    # ERK on 784-300-100-10 at 99 %: 2,662 kept, shares 1810.3, 668.0, 183.7 -> 1810, 668, 184
    assert erk == {
        "fc1.weight": round(1810 / 235200, 6),
        "fc2.weight": round(668 / 30000, 6),
        "fc3.weight": 0.184,
    }
    for row in rows:
        assert row["model"] == "lenet300100" and row["dataset"] == "mnist" and row["seed"] == "0"
        effective = float(row["effective_sparsity"])
        assert float(row["sparsity"]) - 1e-6 <= effective < 1.0
        assert set(json.loads(row["effective_density"])) == {"fc1.weight", "fc2.weight", "fc3.weight"}
        assert 0.0 <= float(row["test_acc"]) <= 100.0 and 0.0 <= float(row["val_acc"]) <= 100.0
        assert float(row["final_train_loss"]) > 0 and float(row["train_seconds"]) > 0
        assert row["zeros_ok"] == "True"
        density = json.loads(row["layer_density"])
        assert set(density) == {"fc1.weight", "fc2.weight", "fc3.weight"}
        if row["method"] == "dense":
            assert all(d == 1.0 for d in density.values()) and float(row["score_seconds"]) == 0.0
        else:
            # the effective weights have exactly the removed fraction of zeros
            assert abs(float(row["actual_sparsity"]) - float(row["sparsity"])) < 1e-4
            assert all(0.0 < d for d in density.values())  # the guard keeps every layer alive
            # only ERK keeps a layer dense (fc3, 1,000 weights, is capped at density 1 at 90 %)
            assert all(d < 1.0 for d in density.values()) or row["allocation"] == "erk"
        if row["guard_changes"]:
            assert set(json.loads(row["guard_changes"])) == {"added", "removed"}

    table = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "### LeNet-300-100 on MNIST" in table and "Dense: **" in table
    assert "| method | 90 % | 99 % |" in table
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in lines[1:7]] == [
        "random",
        "snip",
        "synflow",
        "prospr",
        "prospr+erk",
        "prospr+shuffle",
    ]
    assert "#### Ablations: shuffled and re-initialized masks" in table
    assert "| LeNet-300-100 | 99 % | prospr+shuffle |" in table
    assert "#### Effective sparsity" in table
    assert " ± " in lines[1]
    assert "Command: `python benchmarks/accuracy.py --quick" in table

    png = (tmp_path / "accuracy_vs_sparsity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # Resumable: a second call (in-process, to save a start-up) finds every run in the CSV and adds nothing.
    module = load_script("accuracy")
    threads = torch.get_num_threads()
    try:
        assert module.main([*args, "--out-dir", str(tmp_path), "--data-root", str(DATA)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "13 runs, 13 already in" in capsys.readouterr().out
    assert len((tmp_path / "results.csv").read_text(encoding="utf-8").splitlines()) == 1 + len(rows)


def test_help_lists_the_grid_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load_script("accuracy").parse_args(["--help"])
    out = capsys.readouterr().out
    for option in ("--models", "--methods", "--sparsities", "--seeds", "--epochs", "--out-dir", "--quick"):
        assert option in out


def test_cifar_augmentation_crops_and_flips() -> None:
    load_script("accuracy")  # puts benchmarks/ on sys.path
    from common.data import augment_batch

    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    # every output pixel is an input pixel of the same image and channel, or padding (0)
    for i in range(2):
        for c in range(3):
            values = set(out[i, c].flatten().tolist()) - {0.0}
            assert values <= set(x[i, c].flatten().tolist())


def test_iterative_prospr_scores_in_rounds_and_names_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """``prospr-iter`` is full ProsPr with ``--prospr-rounds`` rounds; the rounds are part of the run's
    key, and the masks nest round by round down to the exact sparsity."""
    module = load_script("accuracy")
    from common.data import Data, Split

    real = module.compute_masks
    seen: list = []

    def spy(model, loss_fn, batches, settings, **kwargs):
        seen.append(settings)
        return real(model, loss_fn, batches, settings, **kwargs)

    monkeypatch.setattr(module, "compute_masks", spy)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(64, 1, 28, 28, generator=gen)
    split = Split(images, torch.randint(0, 10, (64,), generator=gen))
    data = Data("mnist", split, split, split)
    scoring = module.Scoring(batch_size=32, steps=1, reuse=True, prospr_rounds=4)
    assert scoring.describe("prospr-iter") == "M=1 lr=0.1 reuse b=32 rounds=4"
    assert "rounds" not in scoring.describe("prospr")
    model = module.build_model("lenet300100", 0)
    spec = module.RunSpec("lenet300100", "prospr-iter", 0.99, 0)
    masks, _ = module.masks_for(model, spec, data, scoring, torch.device("cpu"))
    assert seen[-1].method == "prospr" and seen[-1].rounds == 4 and seen[-1].mode == "full"
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert total - kept == round(0.99 * total)
    one_shot = module.RunSpec("lenet300100", "prospr", 0.99, 0)
    module.masks_for(model, one_shot, data, scoring, torch.device("cpu"))
    assert seen[-1].rounds is None and seen[-1].unrolls == 1


def test_score_averaging_gives_each_unroll_its_own_reused_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_script("accuracy")
    from common.data import Data, Split

    calls: list[tuple[list, object]] = []

    def record(model, loss_fn, batches, settings, **kwargs):
        calls.append((list(batches), settings))
        return types.SimpleNamespace(masks={})

    monkeypatch.setattr(module, "compute_masks", record)
    images = torch.arange(64.0).reshape(64, 1, 1, 1)
    split = Split(images, torch.zeros(64, dtype=torch.long))
    data = Data("mnist", split, split, split)
    spec = module.RunSpec("lenet300100", "prospr", 0.99, 0)
    for reuse, expected in ((True, [0, 0, 0, 1, 1, 1]), (False, [0, 1, 2, 3, 4, 5])):
        scoring = module.Scoring(batch_size=8, steps=2, reuse=reuse, average=2)
        assert "avg=2" in scoring.describe("prospr") and "avg" not in module.Scoring().describe("prospr")
        module.masks_for(None, spec, data, scoring, torch.device("cpu"))
        batches, settings = calls[-1]
        assert settings.unrolls == 2 and settings.steps == 2
        ids: dict[float, int] = {}  # each distinct batch numbered in order of first appearance
        assert [ids.setdefault(b[0].sum().item(), len(ids)) for b in batches] == expected


def test_comparison_table_picks_the_best_baseline_per_cell() -> None:
    module = load_script("accuracy")

    def row(method: str, sparsity: str, seed: int, acc: float) -> dict[str, str]:
        return {
            "model": "lenet5",
            "method": method,
            "sparsity": sparsity,
            "seed": str(seed),
            "test_acc": str(acc),
        }

    rows = [row("dense", "0", s, 99.0) for s in (0, 1)]
    rows += [row("snip", "0.98", 0, 90.0), row("snip", "0.98", 1, 92.0)]  # mean 91: the best baseline
    rows += [row("synflow", "0.98", 0, 95.0), row("synflow", "0.98", 1, 85.0)]  # mean 90
    rows += [row("prospr", "0.98", 0, 91.0), row("prospr", "0.98", 1, 91.0)]  # ties snip: counts as a match
    rows += [row("prospr-iter", "0.98", 0, 89.0), row("prospr-iter", "0.98", 1, 90.0)]
    rows += [row("snip", "0.9", 0, 97.0), row("prospr", "0.9", 0, 10.0)]  # below 98 %: not compared
    text = module.render_comparison(rows, module.CATALOG)
    assert "in 1 of 2 (variant, cell) pairs" in text
    assert "| LeNet-5 | 98 % | prospr | 91.00 | snip 91.00 | **+0.00** | +1.00, -1.00 |" in text
    assert "| LeNet-5 | 98 % | prospr-iter | 89.50 | snip 91.00 | -1.50 | -1.00, -2.00 |" in text
    assert "90 %" not in text


def test_method_labels_name_method_allocation_and_ablation() -> None:
    module = load_script("accuracy")
    variant = module.Variant.parse("prospr-iter+erk+shuffle")
    assert (variant.base, variant.allocation, variant.ablation) == ("prospr-iter", "erk", "shuffle")
    assert module.Variant.parse("snip+shuffle+uniform").label == "snip+uniform+shuffle"
    for bad in (
        "prospr+erk+uniform",
        "dense+erk",
        "prospr+magic",
        "snap",
        "prospr+spread",
        "snip+erk+spread+spread",
    ):
        with pytest.raises(ValueError):
            module.Variant.parse(bad)
    settings = module.settings_for("synflow+erk", 0.99, 0, module.Scoring(synflow_rounds=7))
    assert (settings.method, settings.allocation, settings.rounds) == ("synflow", "erk", 7)
    # +spread follows the allocation in the label and in the CSV's allocation column.
    spread = module.Variant.parse("prospr-iter+effective+spread+balanced")
    assert spread.label == "prospr-iter+balanced+spread+effective"
    assert spread.allocation_column == "balanced+spread"
    row = {"method": "prospr-iter", "allocation": "balanced+spread", "guard": "effective", "ablation": "none"}
    assert module.row_label(row) == spread.label
    settings = module.settings_for(spread.label, 0.98, 0, module.Scoring())
    assert (settings.allocation, settings.spread, settings.guard) == ("balanced", True, "effective")


def test_verdict_chooses_our_variant_on_validation_and_the_baseline_on_test() -> None:
    module = load_script("accuracy")

    def row(
        method: str, seed: int, test: float, val: float, allocation: str = "global", ablation: str = "none"
    ):
        return {
            "model": "lenet5", "method": method, "allocation": allocation, "ablation": ablation,
            "sparsity": "0.99", "seed": str(seed), "test_acc": str(test), "val_acc": str(val),
        }  # fmt: skip

    rows = [row("snip", s, 90.0 + s, 95.0) for s in (0, 1)]  # best baseline on test: mean 90.5
    rows += [row("random", s, 80.0, 99.0, "erk") for s in (0, 1)]  # best on val, but a baseline
    rows += [row("prospr", s, 95.0, 90.0) for s in (0, 1)]  # best test, worse val: not chosen
    rows += [row("prospr", s, 91.0, 92.0, "erk") for s in (0, 1)]  # best val among ours: chosen
    rows += [row("prospr", s, 99.0, 99.5, "global", "shuffle") for s in (0, 1)]  # ablation: neither
    text = module.render_verdict(rows, module.CATALOG)
    assert "in 1 of 1 cells" in text
    assert "| LeNet-5 | 99 % | prospr+erk | 91.00 ± 0.00 | snip | 90.50 ± 0.71 | **+0.50** | yes |" in text
    ablations = module.render_ablations(rows, module.CATALOG)
    assert (
        "| LeNet-5 | 99 % | prospr+shuffle | 99.00 ± 0.00 | prospr | 95.00 ± 0.00 | +4.00 | +4.00, +4.00 |"
        in ablations
    )
    # A third seed of the original only: both means are over the seeds the ablation has.
    ablations = module.render_ablations([*rows, row("prospr", 2, 50.0, 50.0)], module.CATALOG)
    assert (
        "| LeNet-5 | 99 % | prospr+shuffle | 99.00 ± 0.00 | prospr | 95.00 ± 0.00 | +4.00 | +4.00, +4.00 |"
        in ablations
    )


@pytest.mark.parametrize(
    ("folder", "table"),
    [
        ("mnist", "results.md"),
        ("mnist", "study.md"),
        ("cifar10-short-study", "study.md"),
        ("cifar10-short", "results.md"),
        ("cifar10_bf16_check/bf16", "results.md"),
        ("cifar10_bf16_check/32", "results.md"),
    ],
)
def test_committed_results_re_render_identically(folder: str, table: str, tmp_path: Path, capsys) -> None:
    """Each committed table comes out of its CSV again, unchanged but for the environment line, with
    the command that made it (read from the table itself or its log) and `--render`."""
    import shlex
    import shutil

    source = ROOT / "benchmarks" / "results" / folder
    committed = (source / table).read_text(encoding="utf-8")
    if table == "results.md":
        command = committed.splitlines()[0].removeprefix("Command: `").removesuffix("`")
    else:
        log = (source / table.replace(".md", ".log")).read_text(encoding="utf-8")
        command = next(line for line in log.splitlines() if line.startswith("python benchmarks/accuracy.py"))
    argv = [a for a in shlex.split(command)[2:]]
    if "--out-dir" in argv:
        del argv[argv.index("--out-dir") : argv.index("--out-dir") + 2]
    for name in ("results.csv", "study.csv", "study_rounds.csv"):
        if (source / name).is_file():
            shutil.copy(source / name, tmp_path / name)
    threads = torch.get_num_threads()
    try:
        assert load_script("accuracy").main([*argv, "--render", "--out-dir", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()

    def body(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.startswith(("Environment:", "Command:"))]

    assert body((tmp_path / table).read_text(encoding="utf-8")) == body(committed)
