"""Smoke test: the float32-against-float64 precision benchmark runs and prints its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_precision_benchmark_quick_prints_its_table() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "precision.py"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| resnet20 |")]
    assert [row.split("|")[3].strip() for row in rows] == ["0", "1"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert 0.0 <= float(cells[4]) < 1.0  # float32 and float64 scores agree to well under 100 %
        assert 50.0 < float(cells[6].removesuffix(" %")) <= 100.0  # mask overlap at 90 %
