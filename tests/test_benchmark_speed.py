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
