"""The callback inside real training jobs: resume, weights-only checkpoints, precision,
reproducibility, and the usual Lightning callbacks and Trainer flags."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_prospr.callback as callback_module
from lightning_prospr import ProsprPruningCallback, apply_masks
from lightning_prospr.masking import effective_weight

F = nn.functional


class Data(pl.LightningDataModule):
    def setup(self, stage: str) -> None:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(192, 10, generator=gen)
        y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 0.5).long()
        self.train_set, self.val_set = TensorDataset(x[:160], y[:160]), TensorDataset(x[160:], y[160:])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=16, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=32)


class Net(pl.LightningModule):
    def __init__(self, hidden: int = 32):
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(
            nn.Linear(10, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, 3)
        )
        self.autocast_seen: list[bool] = []

    def forward(self, x):
        return self.body(x)

    def training_step(self, batch, batch_idx):
        self.autocast_seen.append(torch.is_autocast_enabled("cpu"))
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)]


NAMES = ["body.0.weight", "body.4.weight"]


def make_trainer(tmp_path, callbacks, **kwargs):
    options = dict(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def assert_zeros_follow_masks(model, masks):
    for name, mask in masks.items():
        assert torch.equal(effective_weight(model, name) == 0, ~mask.to(torch.bool)), name


def test_resume_restores_masks_without_rescoring(tmp_path, monkeypatch):
    pl.seed_everything(0)
    first = ProsprPruningCallback(sparsity=0.8, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    make_trainer(tmp_path, [first, ckpt]).fit(Net(), datamodule=Data())
    saved = {n: m.clone() for n, m in first.masks.items()}

    def no_scoring(*args, **kwargs):
        raise AssertionError("masks must be restored, not recomputed")

    monkeypatch.setattr(callback_module, "compute_masks", no_scoring)
    resumed_model, resumed = Net(), ProsprPruningCallback(sparsity=0.8, verbose=False)
    trainer = make_trainer(tmp_path, [resumed], max_epochs=4)
    trainer.fit(resumed_model, datamodule=Data(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert trainer.current_epoch == 4
    assert list(resumed.masks) == NAMES
    for name in NAMES:
        assert torch.equal(resumed.masks[name], saved[name])
    assert_zeros_follow_masks(resumed_model, saved)
    assert "restored" in resumed.report.method


def test_weights_only_checkpoint_loads_into_the_plain_module(tmp_path):
    pl.seed_everything(1)
    model, callback = Net(), ProsprPruningCallback(sparsity=0.75, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "w", save_last=True, save_weights_only=True)
    make_trainer(tmp_path, [callback, ckpt]).fit(model, datamodule=Data())
    path = tmp_path / "w" / "last.ckpt"
    assert "callbacks" not in torch.load(path, weights_only=False)

    plain = Net.load_from_checkpoint(path)  # no callback, no pruning re-parametrization
    x = torch.randn(7, 10)
    model.eval(), plain.eval()
    assert torch.equal(model(x), plain(x))

    # Lightning cannot resume `fit` from a weights-only checkpoint (no optimizer state): continue
    # from `load_from_checkpoint` instead; the zeros are in the weights.
    assert_zeros_follow_masks(plain, callback.masks)


def test_make_permanent_leaves_plain_weights_with_zeros(tmp_path):
    pl.seed_everything(2)
    model, callback = Net(), ProsprPruningCallback(sparsity=0.9, make_permanent=True, verbose=False)
    make_trainer(tmp_path, [callback]).fit(model, datamodule=Data())
    names = [n for n, _ in model.named_parameters()]
    assert "body.0.weight" in names and not any(n.endswith("_orig") for n in names)
    assert not any(n.endswith("_mask") for n, _ in model.named_buffers())
    for name, mask in callback.masks.items():
        assert torch.equal(model.get_parameter(name) == 0, ~mask)


def test_bf16_mixed_scoring_runs_under_autocast(tmp_path):
    pl.seed_everything(3)
    # (guard="floor": the guard's float64 passes would add calls, which autocast leaves alone)
    model, callback = Net(), ProsprPruningCallback(sparsity=0.5, guard="floor", verbose=False)
    make_trainer(tmp_path, [callback], max_epochs=1, precision="bf16-mixed").fit(model, datamodule=Data())
    # One call finds the weights to prune, M + 1 = 4 are the scoring unroll, 2 linearized passes
    # (dense and masked) measure the effective sparsity; then 10 training batches. All under autocast.
    assert model.autocast_seen == [True] * (1 + 4 + 2 + 10)
    assert callback.report.sparsity == pytest.approx(0.5, abs=0.01)


def test_half_precision_weights_give_float32_scores():
    from lightning_prospr import prospr_scores

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).to(torch.bfloat16)
    batch = (torch.randn(4, 6, dtype=torch.bfloat16), torch.randint(0, 3, (4,)))
    scores = prospr_scores(model, lambda m, b: F.cross_entropy(m(b[0]).float(), b[1]), [batch])
    assert all(s.dtype == torch.float32 and torch.isfinite(s).all() for s in scores.values())


def losses_and_weights(tmp_path, model, callbacks, name):
    logger = CSVLogger(tmp_path, name=name)
    trainer = make_trainer(tmp_path, callbacks, max_epochs=2, logger=logger, log_every_n_steps=1)
    trainer.fit(model, datamodule=Data())
    with open(tmp_path / name / "version_0" / "metrics.csv") as f:
        losses = [row["train_loss"] for row in csv.DictReader(f) if row.get("train_loss")]
    weights = {n: effective_weight(model, n) for n in NAMES}
    return losses, weights


def test_fit_with_callback_follows_the_same_trajectory_as_premasked_fit(tmp_path):
    """Scoring consumes no global RNG, does not advance the fit's data and leaves BatchNorm alone."""
    pl.seed_everything(4)
    init = Net().state_dict()
    with_callback = Net()
    with_callback.load_state_dict(init)
    callback = ProsprPruningCallback(sparsity=0.7, verbose=False)
    pl.seed_everything(5)
    losses_a, weights_a = losses_and_weights(tmp_path, with_callback, [callback], "a")

    premasked = Net()
    premasked.load_state_dict(init)
    apply_masks(premasked, callback.masks)
    pl.seed_everything(5)
    losses_b, weights_b = losses_and_weights(tmp_path, premasked, [], "b")

    assert len(losses_a) == 20 and losses_a == losses_b
    assert all(torch.equal(weights_a[n], weights_b[n]) for n in NAMES)


def test_works_beside_the_usual_callbacks_and_flags(tmp_path):
    pl.seed_everything(6)
    model, callback = Net(), ProsprPruningCallback(sparsity=0.6, verbose=False)
    callbacks = [
        callback,
        ModelCheckpoint(dirpath=tmp_path / "c", monitor="val_loss"),
        EarlyStopping(monitor="val_loss", patience=5),
        LearningRateMonitor(),
    ]
    trainer = make_trainer(
        tmp_path,
        callbacks,
        max_epochs=3,
        logger=CSVLogger(tmp_path),
        accumulate_grad_batches=2,
        limit_train_batches=4,
    )
    trainer.fit(model, datamodule=Data())
    assert_zeros_follow_masks(model, callback.masks)
    best = Net.load_from_checkpoint(callbacks[1].best_model_path)
    assert_zeros_follow_masks(best, callback.masks)

    dev_model, dev_callback = Net(), ProsprPruningCallback(sparsity=0.6, verbose=False)
    make_trainer(tmp_path, [dev_callback], fast_dev_run=True).fit(dev_model, datamodule=Data())
    assert_zeros_follow_masks(dev_model, dev_callback.masks)
