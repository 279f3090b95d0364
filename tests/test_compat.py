"""Every private torch and Lightning name is checked: deleting one gives a clear error, never a
quiet skip (which, for the checkpoint internals, would mean silently wrong scores)."""

from __future__ import annotations

import importlib

import lightning.pytorch as pl
import pytest
import torch
from shared import ce_loss as loss
from shared import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prospr import ProsprPruningCallback, compat, prospr_scores
from lightning_prospr.compat import CompatibilityError

F = nn.functional
CHECKED = r"checked with torch 2\.14\.1 and lightning 2\.6\.6"


def batch():
    return (torch.randn(8, 4), torch.randint(0, 3, (8,)))


def net():
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


@pytest.mark.parametrize("private", compat.TORCH_NAMES, ids=lambda p: f"{p.owner}.{p.names[0]}")
def test_each_private_torch_name_missing_raises(private, monkeypatch):
    module = importlib.import_module(private.owner)
    assert private.resolve() is not None  # present in the torch this was checked with
    for name in private.names:
        if hasattr(module, name):
            monkeypatch.delattr(module, name)
    with pytest.raises(CompatibilityError, match=rf"{private.owner}\.{private.names[0]}.*{CHECKED}"):
        private.resolve()
    with pytest.raises(CompatibilityError):
        compat.check_torch()


def test_an_older_spelling_is_accepted(monkeypatch):
    import torch.utils.checkpoint as checkpoint

    assert compat.NON_REENTRANT_CHECKPOINT.resolve() == (checkpoint, compat.NON_REENTRANT_CHECKPOINT.names[0])
    monkeypatch.delattr(checkpoint, compat.NON_REENTRANT_CHECKPOINT.names[0])
    assert compat.NON_REENTRANT_CHECKPOINT.resolve() == (checkpoint, compat.NON_REENTRANT_CHECKPOINT.names[1])


def test_scoring_refuses_when_a_checkpoint_internal_is_gone(monkeypatch):
    import torch.utils.checkpoint as checkpoint

    monkeypatch.delattr(checkpoint, "CheckpointFunction")
    with pytest.raises(CompatibilityError, match=r"CheckpointFunction.*use_reentrant=True"):
        prospr_scores(net(), loss, [batch()], steps=1)


def test_the_default_set_refuses_without_the_dispatch_mode(monkeypatch):
    import torch.utils._python_dispatch as dispatch

    monkeypatch.delattr(dispatch, "TorchDispatchMode")
    with pytest.raises(CompatibilityError, match="TorchDispatchMode"):
        prospr_scores(net(), loss, [batch()], steps=1)
    assert prospr_scores(net(), loss, [batch()], steps=1, parameters=["0.weight"])  # names given: not needed


def test_instance_attributes_are_checked_where_they_are_read():
    with pytest.raises(CompatibilityError, match="_forward_pre_hooks"):
        compat.forward_pre_hooks(object())
    with pytest.raises(CompatibilityError, match="_tensor_name"):
        compat.pruned_tensor_name(object())
    with pytest.raises(CompatibilityError, match="_parameters"):
        compat.module_tables(object())
    with pytest.raises(CompatibilityError, match="_start_method"):
        compat.ddp_start_method(object())


def test_lightning_names_are_checked(monkeypatch):
    compat.check_lightning()
    monkeypatch.delattr(pl.LightningModule, "_on_before_batch_transfer")
    with pytest.raises(CompatibilityError, match=rf"_on_before_batch_transfer.*{CHECKED}"):
        compat.check_lightning()


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = net()

    def training_step(self, b, i):
        return loss(self.net, b)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class DropDataSource(pl.Callback):
    def on_fit_start(self, trainer, pl_module):
        del trainer.fit_loop._data_source


def test_the_fit_refuses_when_the_data_source_is_gone():
    data = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 3, (32,))), batch_size=8)
    trainer = quiet_trainer([DropDataSource(), ProsprPruningCallback(sparsity=0.5)], max_steps=1)
    with pytest.raises(CompatibilityError, match=r"_data_source.*train dataloader"):
        trainer.fit(Module(), train_dataloaders=data)
