"""LightningCLI, run for real in subprocesses: the flag form, YAML configs, and --print_config round trips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "examples" / "cli.py"
DATA = ROOT.parent / "shared" / "data"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def cli(*args: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(CLI), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_flag_form(tmp_path):
    out = cli(
        "fit",
        "--data=DigitsDataModule",
        "--model.net=digits.DigitsNet",
        "--trainer.callbacks+=lightning_prospr.ProsprPruningCallback",
        "--trainer.callbacks.sparsity=0.98",
        "--trainer.callbacks.steps=2",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=3",
        f"--trainer.default_root_dir={tmp_path}",
        *QUIET,
        cwd=tmp_path,
    )
    assert "ProsPr M=2, lr=0.1, full mode" in out
    assert "Global sparsity: 98.00 %" in out


def test_yaml_config_and_print_config_round_trip(tmp_path):
    config = str(ROOT / "examples" / "configs" / "digits.yaml")
    first = cli(
        "fit", "--config", config, "--trainer.callbacks.sparsity=0.95", "--print_config", cwd=tmp_path
    )
    (tmp_path / "printed.yaml").write_text(first)
    second = cli("fit", "--config", str(tmp_path / "printed.yaml"), "--print_config", cwd=tmp_path)
    assert yaml.safe_load(first) == yaml.safe_load(second)
    (callback,) = yaml.safe_load(first)["trainer"]["callbacks"]
    assert callback["class_path"] == "lightning_prospr.ProsprPruningCallback"
    assert callback["init_args"]["sparsity"] == 0.95 and callback["init_args"]["steps"] == 3

    out = cli(
        "fit",
        "--config",
        str(tmp_path / "printed.yaml"),
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        f"--trainer.default_root_dir={tmp_path}",
        *QUIET,
        cwd=tmp_path,
    )
    assert "Global sparsity: 95.00 %" in out


@pytest.mark.skipif(not (DATA / "MNIST" / "raw").is_dir(), reason="MNIST not found in ../shared/data")
def test_mnist_lenet5_config(tmp_path):
    out = cli(
        "fit",
        "--config",
        str(ROOT / "examples" / "configs" / "mnist_lenet5.yaml"),
        f"--data.root={DATA}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=5",
        "--trainer.limit_val_batches=2",
        f"--trainer.default_root_dir={tmp_path}",
        *QUIET,
        cwd=tmp_path,
    )
    assert "Global sparsity: 98.00 %" in out


@pytest.mark.skipif(
    not (DATA / "cifar-10-batches-py").is_dir(), reason="CIFAR-10 not found in ../shared/data"
)
def test_cifar10_resnet20_config_paper_recipe(tmp_path):
    config = str(ROOT / "examples" / "configs" / "cifar10_resnet20.yaml")
    printed = yaml.safe_load(cli("fit", "--config", config, "--print_config", cwd=tmp_path))
    assert printed["trainer"]["max_epochs"] == 200
    assert printed["model"]["lr"] == 0.1 and printed["model"]["weight_decay"] == 5e-4
    assert printed["data"]["init_args"]["batch_size"] == 256
    out = cli(
        "fit",
        "--config",
        config,
        f"--data.root={DATA}",
        "--data.batch_size=16",
        "--data.num_workers=0",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        f"--trainer.default_root_dir={tmp_path}",
        *QUIET,
        cwd=tmp_path,
    )
    assert "Global sparsity: 98.00 %" in out
