"""Smoke test: the float32-against-float64 precision benchmark runs and prints its table."""

from __future__ import annotations

from benchmark_scripts import run_script


def test_precision_benchmark_quick_prints_its_table() -> None:
    proc = run_script("precision", "--quick")
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| resnet20 |")]
    assert [row.split("|")[3].strip() for row in rows] == ["0", "1"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert 0.0 <= float(cells[4]) < 1.0  # float32 and float64 scores agree to well under 100 %
        assert 50.0 < float(cells[6].removesuffix(" %")) <= 100.0  # mask overlap at 90 %
