"""Smoke test: the speed benchmark runs end to end and prints its table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_script, run_script


def test_speed_benchmark_quick_prints_table(tmp_path: Path) -> None:
    out, table_csv = tmp_path / "speed.md", tmp_path / "speed.csv"
    proc = run_script("speed", "--quick", "--device", "cpu", "--out", str(out), "--csv", str(table_csv))
    header = (
        "| model | method | M | batch | seconds | ratio to train step | peak extra MB | "
        "memory ratio to train step | best s | best ratio | CPU s | CPU ratio | kept MB | live peak MB | "
        "live memory ratio |"
    )
    assert header in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| resnet20 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["train step", "full", "first_order", "snip"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[3] == "8"  # batch
        assert float(cells[4]) > 0  # seconds
        assert float(cells[6].removeprefix("<=")) > 0  # peak extra MB
        assert float(cells[13]) > 0  # live peak MB
    assert "C allocator of the workers: " in proc.stdout
    assert "torch" in proc.stdout and "command: `python benchmarks/speed.py --quick" in proc.stdout
    assert out.read_text().strip() in proc.stdout
    assert len(table_csv.read_text().splitlines()) == 5


def test_batchnorm_ablation_model_has_no_batchnorm() -> None:
    """``resnet20-nobn`` is ResNet-20 with exactly its BatchNorm layers replaced by Identity."""
    module = load_script("speed")
    full, batch = module._build("resnet20", 4, "cpu")
    ablated, same = module._build("resnet20-nobn", 4, "cpu")
    assert torch.equal(batch[0], same[0])
    norms = [m for m in full.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(isinstance(m, torch.nn.BatchNorm2d) for m in ablated.modules())
    convs = {n: p for n, p in full.named_parameters() if "bn" not in n}
    assert {n: p.shape for n, p in ablated.named_parameters()} == {n: p.shape for n, p in convs.items()}
    assert ablated(same[0]).shape == (4, 10)


def test_live_peak_counts_what_is_alive_at_once() -> None:
    """The live-tensor peak of a known allocation pattern: 4 MB, +4 MB, -4 MB, +8 MB -> 12 MB."""
    module = load_script("speed")

    def op() -> None:
        first = torch.ones(1_000_000)  # 4,000,000 bytes
        second = torch.ones(1_000_000)
        del first
        third = torch.ones(2_000_000)  # with second alive: 12,000,000 bytes at the peak
        del second, third

    assert abs(module._live_peak_mib(op) - 12e6 / 2**20) < 0.01


def test_allocator_that_is_not_installed_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    module = load_script("speed")
    monkeypatch.setattr("ctypes.util.find_library", lambda name: None)
    with pytest.raises(SystemExit):
        module.parse_args(["--allocator", "jemalloc"])
    assert "--allocator jemalloc: no libjemalloc found; install it" in capsys.readouterr().err
    monkeypatch.setattr("ctypes.util.find_library", lambda name: f"lib{name}.so.9")
    assert module.parse_args(["--allocator", "tcmalloc"]).preload == "libtcmalloc_minimal.so.9"
    assert module.parse_args([]).preload is None
