"""Smoke test: the engine-against-hand-written-unroll benchmark agrees on the scores and prints times."""

from __future__ import annotations

from benchmark_scripts import run_script


def test_handwritten_unroll_benchmark_quick_agrees_and_prints_times() -> None:
    proc = run_script("handwritten_unroll", "--quick")
    difference = next(line for line in proc.stdout.splitlines() if line.startswith("max |engine"))
    assert float(difference.rsplit(":", 1)[1]) < 1e-6  # the same derivative, computed twice
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 1
    assert all(float(cell) > 0 for cell in rows[0].strip("|").split("|")[1:])
