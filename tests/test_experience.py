"""What a user sees: the progress bar while scoring, the density chart, the summary table."""

from __future__ import annotations

import re

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_prospr.lightning_report as lightning_report
from lightning_prospr import ProsprPruningCallback, SparsityReport

F = nn.functional


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader():
    gen = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(64, 6, generator=gen), torch.randint(0, 3, (64,), generator=gen)),
        batch_size=16,
    )


def fit(tmp_path, callback, **kwargs):
    options = dict(max_epochs=1, accelerator="cpu", enable_checkpointing=False, enable_model_summary=False)
    options.update(kwargs)
    pl.Trainer(default_root_dir=tmp_path, callbacks=[callback], **options).fit(
        Module(), train_dataloaders=loader()
    )


@pytest.mark.parametrize("enabled", [True, False])
def test_progress_bar_follows_the_trainers(tmp_path, capsys, monkeypatch, enabled):
    monkeypatch.setattr(lightning_report, "PROGRESS_DELAY", 0.0)
    fit(
        tmp_path,
        ProsprPruningCallback(sparsity=0.5, verbose=False),
        enable_progress_bar=enabled,
        logger=False,
    )
    err = capsys.readouterr().err
    assert ("ProsPr scoring" in err) is enabled
    if enabled:
        assert re.search(r"\d/5 ", err)  # the pass finding the weights to prune, then M + 1 = 4


def test_density_chart_saved_and_sent_to_tensorboard(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    callback = ProsprPruningCallback(sparsity=0.8, density_plot=True, verbose=False)
    fit(tmp_path, callback, logger=logger, enable_progress_bar=False)
    assert callback.density_plot_path is not None
    with open(callback.density_plot_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert "prospr/density" in events.Tags()["images"]
    assert "prospr/sparsity" in events.Tags()["scalars"]


def test_summary_table_is_aligned_with_totals():
    masks = {
        "a.weight": torch.tensor([True, False, False, False]),
        "block.b.weight": torch.ones(2000, dtype=torch.bool),
    }
    report = SparsityReport.from_masks(masks, seconds=1.5, method="ProsPr M=3")
    lines = report.table().splitlines()
    assert lines[0] == "ProsPr pruning (ProsPr M=3)"
    rows = [line for line in lines if "|" in line]
    assert len({line.index("|") for line in rows}) == 1  # columns aligned
    assert rows[-1].split("|")[1].strip() == "Total" and "2,001" in rows[-1] and "2,004" in rows[-1]
    assert "Global sparsity: 0.15 %" in lines[-1] and "1.50 s" in lines[-1]
