"""DDP on CPU (gloo, 2 processes): ranks score their own batches, sum the scores, agree on masks."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from shared import run_ddp_script
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prospr import ProsprPruningCallback, global_masks, prospr_scores

F = nn.functional


def loader() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 12, generator=gen)
    y = (x[:, :4].sum(1) > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


class DDPNet(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 2))

    def forward(self, x):
        return self.body(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # keep weights fixed: compare masks only

    def train_dataloader(self):
        return loader()


class SaveMasks(pl.Callback):
    def __init__(self, pruning: ProsprPruningCallback, folder: str) -> None:
        self.pruning, self.folder = pruning, folder

    def on_fit_start(self, trainer, pl_module):  # runs after the pruning callback's on_fit_start
        torch.save(self.pruning.masks, f"{self.folder}/rank{trainer.global_rank}.pt")


def run(tmp_path, model, devices: int, strategy: str):
    pruning = ProsprPruningCallback(sparsity=0.8, steps=3, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=1,
        limit_train_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[pruning, SaveMasks(pruning, str(tmp_path))],
    )
    trainer.fit(model)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(devices)]


def test_ddp_ranks_agree_and_use_their_own_batches(tmp_path):
    torch.manual_seed(0)
    model = DDPNet()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    (tmp_path / "ddp").mkdir()
    rank0, rank1 = run(tmp_path / "ddp", model, devices=2, strategy="ddp_spawn")
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0)

    # Independent reference: rank r scores batches r, r + 2, r + 4, r + 6; the scores are summed.
    reference = DDPNet()
    reference.load_state_dict(init)
    batches = list(loader())

    def loss(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    per_rank = [prospr_scores(reference, loss, batches[r::2][:4], steps=3) for r in range(2)]
    summed = {n: per_rank[0][n] + per_rank[1][n] for n in per_rank[0]}
    expected = global_masks(summed, 0.8)
    assert all(torch.equal(rank0[n], expected[n]) for n in expected)

    # One process scores batches 0..3 only, and gets different masks.
    (tmp_path / "single").mkdir()
    single = DDPNet()
    single.load_state_dict(init)
    (alone,) = run(tmp_path / "single", single, devices=1, strategy="auto")
    assert any(not torch.equal(alone[n], rank0[n]) for n in alone)


def test_ddp_subprocess_launcher_ranks_agree(tmp_path):
    """strategy="ddp" starts rank 1 as a new process running the same script (here: a script, as
    under pytest the launcher would re-run pytest itself)."""
    rank0, rank1 = run_ddp_script("ddp_launch.py", tmp_path)
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0)
    # The same masks as the spawn launcher's reference: rank r scores batches r, r + 2, ...
    torch.manual_seed(0)
    reference = DDPNet()
    batches = list(loader())

    def loss(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    per_rank = [prospr_scores(reference, loss, batches[r::2][:4], steps=3) for r in range(2)]
    expected = global_masks({n: per_rank[0][n] + per_rank[1][n] for n in per_rank[0]}, 0.8)
    assert all(torch.equal(rank0[n], expected[n]) for n in expected)


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"])
def test_sharding_strategies_are_refused_before_any_work(strategy):
    import lightning.pytorch.strategies as strategies

    cls = getattr(strategies, strategy)
    instance = cls.__new__(cls)  # DeepSpeedStrategy's constructor needs deepspeed installed
    trainer = SimpleNamespace(strategy=instance)
    callback = ProsprPruningCallback(sparsity=0.5)
    module = DDPNet()
    before = {n: p.clone() for n, p in module.named_parameters()}
    with pytest.raises(MisconfigurationException, match=rf"does not support {strategy}.*DDP"):
        callback.setup(trainer, module, "fit")
    assert callback.masks is None
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())
    callback.setup(trainer, module, "validate")  # only fitting prunes
