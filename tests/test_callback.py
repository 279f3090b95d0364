"""ProsprPruningCallback inside a real Trainer.fit on CPU."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prospr import ProsprPruningCallback, global_masks, prospr_scores
from lightning_prospr.masking import effective_weight

F = nn.functional


def dataset(n: int = 256, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=gen)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 0).long()
    return TensorDataset(x, y)


class DataModule(pl.LightningDataModule):
    def __init__(self, shuffle: bool = True) -> None:
        super().__init__()
        self.shuffle = shuffle

    def setup(self, stage: str) -> None:
        self.train_set = dataset()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=32, shuffle=self.shuffle)


class Module(pl.LightningModule):
    def __init__(self, return_dict: bool = False) -> None:
        super().__init__()
        self.return_dict = return_dict
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 4 * 4, 16),
            nn.ReLU(),
            nn.Linear(16, 3),
        )
        self.transfers = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return {"loss": loss} if self.return_dict else loss

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        self.transfers += 1
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


PRUNED = ["net.0.weight", "net.4.weight", "net.6.weight"]


def trainer(tmp_path: Path, callback: ProsprPruningCallback, **kwargs) -> pl.Trainer:
    options = dict(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path, name="run"),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def read_metrics(tmp_path: Path) -> list[dict[str, str]]:
    (path,) = tmp_path.glob("run/version_*/metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def test_fit_with_datamodule_prunes_logs_and_trains(tmp_path, caplog):
    pl.seed_everything(0)
    model = Module()
    callback = ProsprPruningCallback(sparsity=0.8)
    trainer(tmp_path, callback).fit(model, datamodule=DataModule())

    masks = callback.masks
    assert masks is not None and list(masks) == PRUNED
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.8 * total)
    for name, mask in masks.items():
        weight = effective_weight(model, name)
        assert torch.equal(weight == 0, ~mask), name  # zeros exactly where pruned, nowhere else
        module = model.get_submodule(name.rpartition(".")[0])
        assert hasattr(module, "weight_orig") and hasattr(module, "weight_mask")

    rows = read_metrics(tmp_path)
    logged = {k: float(v) for row in rows for k, v in row.items() if k.startswith("prospr/") and v}
    assert logged["prospr/sparsity"] == pytest.approx(0.8, abs=1e-3)
    for name, mask in masks.items():
        assert logged[f"prospr/sparsity/{name}"] == pytest.approx(1 - mask.float().mean().item())

    epoch_losses = [float(r["train_loss_epoch"]) for r in rows if r.get("train_loss_epoch")]
    assert len(epoch_losses) == 3 and epoch_losses[-1] < epoch_losses[0]

    kept = sum(int(m.sum()) for m in masks.values())
    assert f"Global sparsity: {100 * (1 - kept / total):.2f} %" in caplog.text  # 79.98 %: 2168 weights
    assert all(f"| {name} " in caplog.text for name in PRUNED)


def test_masks_equal_the_functional_api_on_the_same_batches(tmp_path):
    """With an unshuffled loader, the callback scores batches 0..M with training_step as the loss."""
    pl.seed_everything(1)
    model = Module(return_dict=True)
    reference = Module(return_dict=True)
    reference.load_state_dict(model.state_dict())
    loader = DataLoader(dataset(), batch_size=32, shuffle=False)

    callback = ProsprPruningCallback(sparsity=0.9, steps=2, momentum=0.5)
    trainer(tmp_path, callback, max_epochs=1).fit(model, train_dataloaders=loader)

    batches = list(itertools.islice(loader, 3))
    scores = prospr_scores(
        reference, lambda m, b: F.cross_entropy(m(b[0]), b[1]), batches, steps=2, momentum=0.5
    )
    expected = global_masks(scores, 0.9)
    assert callback.masks is not None
    for name in PRUNED:
        assert torch.equal(callback.masks[name], expected[name])
    assert model.transfers > 3  # the user's transfer_batch_to_device ran for scoring batches too


def test_module_own_train_dataloader_and_reuse_batch(tmp_path):
    class WithLoader(Module):
        def train_dataloader(self):
            return DataLoader(dataset(64), batch_size=16)

    pl.seed_everything(2)
    model = WithLoader()
    callback = ProsprPruningCallback(sparsity=0.5, reuse_batch=True)
    trainer(tmp_path, callback, max_epochs=1).fit(model)
    assert callback.masks is not None and callback.report is not None
    assert callback.report.sparsity == pytest.approx(0.5, abs=1e-3)


def test_second_fit_keeps_the_masks_and_does_not_prune_twice(tmp_path):
    pl.seed_everything(3)
    model = Module()
    callback = ProsprPruningCallback(sparsity=0.7)
    trainer(tmp_path, callback, max_epochs=1).fit(model, datamodule=DataModule())
    first = {n: m.clone() for n, m in callback.masks.items()}
    trainer(tmp_path, callback, max_epochs=1).fit(model, datamodule=DataModule())
    for name, mask in first.items():
        assert torch.equal(callback.masks[name], mask)
        assert torch.equal(effective_weight(model, name) == 0, ~mask)
        module = model.get_submodule(name.rpartition(".")[0])
        hooks = [h for h in module._forward_pre_hooks.values() if type(h).__name__ != "PruningContainer"]
        assert len(hooks) == 1  # one CustomFromMask, not a container of two


def test_checkpoint_loads_into_a_plain_module(tmp_path):
    pl.seed_everything(4)
    model = Module()
    callback = ProsprPruningCallback(sparsity=0.75)
    trn = trainer(tmp_path, callback, max_epochs=1)
    trn.fit(model, datamodule=DataModule())
    path = tmp_path / "pruned.ckpt"
    trn.save_checkpoint(path)

    plain = Module.load_from_checkpoint(path)
    assert not any(n.endswith("_orig") for n, _ in plain.named_parameters())
    x = torch.randn(5, 1, 6, 6)
    model.eval(), plain.eval()
    assert torch.equal(model(x), plain(x))
    state = torch.load(path, weights_only=False)["callbacks"]
    (masks,) = [s["masks"] for s in state.values() if "masks" in s]
    assert all(torch.equal(masks[n], callback.masks[n]) for n in PRUNED)


def test_manual_optimization_needs_prospr_loss(tmp_path):
    class Manual(Module):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            loss = F.cross_entropy(self(batch[0]), batch[1])
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    with pytest.raises(MisconfigurationException, match="prospr_loss"):
        trainer(tmp_path, ProsprPruningCallback(sparsity=0.5), max_epochs=1).fit(
            Manual(), datamodule=DataModule()
        )

    class ManualWithLoss(Manual):
        def prospr_loss(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

    callback = ProsprPruningCallback(sparsity=0.5)
    trainer(tmp_path, callback, max_epochs=1).fit(ManualWithLoss(), datamodule=DataModule())
    assert callback.masks is not None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"sparsity": 0.5, "steps": -1}, "steps"),
        ({"sparsity": 0.5, "steps": 0}, "M = 0 is SNIP"),
        (
            {"sparsity": 0.5, "mode": "second_order"},
            "`mode` must be one of 'full', 'first_order', 'recompute'",
        ),
        (
            {"sparsity": 0.5, "method": "grasp", "lr": 0.5},
            r"`lr` \(ProsPr's inner learning rate\) does not apply",
        ),
        (
            {"sparsity": 0.5, "method": "magnitude", "steps": 5},
            r"`steps` .* does not apply to method='magnitude'",
        ),
        ({"sparsity": 0.5, "method": "synflow", "mode": "recompute"}, "`mode` .* does not apply"),
        ({"sparsity": 0.5, "method": "prospr", "seed": 4}, "`seed` .* does not apply"),
        ({"sparsity": 0.5, "method": "snip", "grasp_batches": 2}, "`grasp_batches` .* does not apply"),
        ({"sparsity": 0.5, "method": "magnitude", "unrolls": 2}, "`unrolls` .* does not apply"),
        ({"sparsity": 0.5, "method": "random", "reuse_batch": True}, "`reuse_batch` does not apply"),
        (
            {"sparsity": 0.5, "guard": "off", "layer_floor": 3},
            "`layer_floor` does not apply with guard='off'",
        ),
        ({"sparsity": 0.5, "guard": "floor", "layer_floor": 0}, "use guard='off'"),
        ({"sparsity": 0.5, "guard": "maybe"}, "`guard` must be one of"),
        ({"sparsity": 0.5, "lr": 0.0}, "lr"),
        ({"sparsity": 0.5, "lr": float("inf")}, "lr"),
        ({"sparsity": 0.5, "parameters": "net.0.weight"}, "parameters"),
        ({"sparsity": 0.5, "method": "prospr++"}, "unknown pruning method 'prospr\\+\\+'"),
        ({"sparsity": 0.5, "method": "grasp", "structured": True}, "structured=True` supports"),
        ({"sparsity": 0.5, "method": "random", "rounds": 4}, "needs a method that re-scores"),
        ({"sparsity": 0.5, "unrolls": 0}, "unrolls"),
        ({"sparsity": 0.5, "layer_floor": -1}, "layer_floor"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ProsprPruningCallback(**kwargs)


def test_unknown_parameter_name_fails_before_training(tmp_path):
    callback = ProsprPruningCallback(sparsity=0.5, parameters=["net.9.weight"])
    model = Module()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"net\.9\.weight"):
        trainer(tmp_path, callback, max_epochs=1).fit(model, datamodule=DataModule())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
