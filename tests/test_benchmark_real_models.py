"""benchmarks/real_models.py runs (one model, one mode)."""

from __future__ import annotations

from benchmark_scripts import run_script


def test_real_models_benchmark_quick():
    out = run_script("real_models", "--quick").stdout
    assert "| hf-gpt2 | 28,032 | 24,576 (88 %) | 8 | 1 tensors, 2,048 |" in out
