"""Smoke test: the speed benchmark runs end to end and prints its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_speed_benchmark_quick_prints_table(tmp_path: Path) -> None:
    out, table_csv = tmp_path / "speed.md", tmp_path / "speed.csv"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "speed.py"),
            "--quick",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--csv",
            str(table_csv),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header = (
        "| model | method | M | batch | seconds | ratio to train step | peak extra MB | "
        "memory ratio to train step | best s | best ratio | CPU s | CPU ratio |"
    )
    assert header in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| resnet20 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["train step", "full", "first_order", "snip"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[3] == "8"  # batch
        assert float(cells[4]) > 0  # seconds
        assert float(cells[6].removeprefix("<=")) > 0  # peak extra MB
    assert "torch" in proc.stdout and "command: `python benchmarks/speed.py --quick" in proc.stdout
    assert out.read_text().strip() in proc.stdout
    assert len(table_csv.read_text().splitlines()) == 5


def test_batchnorm_ablation_model_has_no_batchnorm() -> None:
    """``resnet20-nobn`` is ResNet-20 with exactly its BatchNorm layers replaced by Identity."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("speed_benchmark", ROOT / "benchmarks" / "speed.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    full, batch = module._build("resnet20", 4, "cpu")
    ablated, same = module._build("resnet20-nobn", 4, "cpu")
    assert torch.equal(batch[0], same[0])
    norms = [m for m in full.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(isinstance(m, torch.nn.BatchNorm2d) for m in ablated.modules())
    convs = {n: p for n, p in full.named_parameters() if "bn" not in n}
    assert {n: p.shape for n, p in ablated.named_parameters()} == {n: p.shape for n, p in convs.items()}
    assert ablated(same[0]).shape == (4, 10)
