"""`ProsprPruningCallback(structured=True, shrink=True)`: a smaller network before training, new
optimizers from `configure_optimizers`, checkpoints that hold the small network, resume, DDP."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from shared import quiet_trainer, run_ddp_script
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prospr import ProsprPruningCallback
from lightning_prospr.shrinking import shrink

F = nn.functional


def loader() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, 12, 12, generator=gen)
    return DataLoader(TensorDataset(x, torch.randint(0, 4, (64,), generator=gen)), batch_size=16)


class ConvNet(pl.LightningModule):
    """conv-BN-ReLU x 2 with a residual add between two convolutions, then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.a = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(32)
        self.b = nn.Conv2d(32, 16, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.stem(x)))
        h = F.relu(h + self.bn_b(self.b(F.relu(self.bn_a(self.a(h))))))
        return self.head(h.mean(dim=(2, 3)))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1)}

    def train_dataloader(self):
        return loader()


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_shrink_trains_a_smaller_network_with_new_optimizers(tmp_path: Path):
    torch.manual_seed(0)
    module = ConvNet()
    dense = params(module)
    callback = ProsprPruningCallback(sparsity=0.5, method="snip", structured=True, shrink=True, verbose=False)
    trainer = quiet_trainer([callback], max_epochs=1, limit_train_batches=3, default_root_dir=tmp_path)
    trainer.fit(module)
    assert params(module) < 0.6 * dense
    # 24 of 48 channels of the two groups (stem + b share the stream; a alone) are gone
    assert (
        module.stem.out_channels == module.b.out_channels == module.bn.num_features == module.head.in_features
    )
    assert module.stem.out_channels + module.a.out_channels == 24
    # the optimizers and schedulers were made again, for the new parameters, and they trained
    held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert held == {id(p) for p in module.parameters()}
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is trainer.optimizers[0]
    assert trainer.global_step == 3
    assert callback.report is not None and callback.report.shrunk == (dense, params(module))
    assert "Shrunk: the pruned channels removed" in callback.report.table()
    assert callback.masks == {}  # nothing is masked: the network is smaller


def test_checkpoints_hold_the_small_network_and_resume_shrinks_first(tmp_path: Path):
    torch.manual_seed(0)
    module = ConvNet()
    callback = ProsprPruningCallback(
        sparsity=0.5, method="magnitude", structured=True, shrink=True, verbose=False
    )
    trainer = quiet_trainer([callback], max_epochs=1, limit_train_batches=2, default_root_dir=tmp_path)
    trainer.fit(module)
    path = tmp_path / "small.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["state_dict"]["a.weight"].shape[0] == module.a.out_channels < 32
    state = checkpoint["callbacks"][callback.state_key]
    assert set(state["channel_masks"]) >= {"stem.weight", "a.weight", "b.weight"}

    # resume: a fresh dense module, shrunk by the callback before Lightning loads the small tensors
    torch.manual_seed(1)
    fresh = ConvNet()
    again = ProsprPruningCallback(
        sparsity=0.5, method="magnitude", structured=True, shrink=True, verbose=False
    )
    resumed = quiet_trainer([again], max_epochs=2, limit_train_batches=2, default_root_dir=tmp_path)
    resumed.fit(fresh, ckpt_path=path)
    assert (
        fresh.stem.out_channels == module.stem.out_channels and fresh.a.out_channels == module.a.out_channels
    )
    assert resumed.global_step == 4  # 2 restored + the second epoch's 2

    # inference without the callback: shrink a plain module with the saved channel masks, then load
    plain = ConvNet()
    shrink(plain, state["channel_masks"], torch.randn(1, 3, 12, 12))
    plain.load_state_dict(checkpoint["state_dict"])
    x = torch.randn(2, 3, 12, 12)
    module.eval(), plain.eval()
    assert torch.allclose(module(x), plain(x), atol=1e-6)


def test_shrink_needs_structured_masks():
    with pytest.raises(ValueError, match=r"`shrink=True` removes pruned channels.*structured=True"):
        ProsprPruningCallback(sparsity=0.5, shrink=True)
    with pytest.raises(ValueError, match="`make_permanent` does not apply with shrink=True"):
        ProsprPruningCallback(sparsity=0.5, structured=True, shrink=True, make_permanent=True)


def test_a_failed_shrink_leaves_the_module_as_it_was():
    """A group the check rejects is left whole at scoring; a mask the shrink cannot apply raises
    before any change (here: a module that asks to prune its classifier's outputs)."""
    torch.manual_seed(0)
    module = ConvNet()
    before = copy.deepcopy(module.state_dict())
    callback = ProsprPruningCallback(
        sparsity=0.5,
        method="magnitude",
        structured=True,
        shrink=True,
        verbose=False,
        parameters=["head.weight"],
    )
    trainer = quiet_trainer([callback], max_epochs=1, limit_train_batches=1)
    with pytest.raises(ValueError, match="structured pruning found no channel group it can remove"):
        trainer.fit(module)
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_ddp_ranks_shrink_alike_and_train_in_sync(tmp_path: Path):
    """Each rank scores its own batches; the summed scores give one set of channels, every rank
    removes them, and the re-made DDP wrapper keeps the (different-batch) gradients in sync."""
    rank0, rank1 = run_ddp_script("ddp_shrink_launch.py", tmp_path)
    assert {k: v.shape for k, v in rank0.items()} == {k: v.shape for k, v in rank1.items()}
    assert rank0["a.weight"].shape[0] + rank0["stem.weight"].shape[0] == 24
    torch.manual_seed(0)
    init = ConvNet().state_dict()
    assert any(rank0[k].shape != init[k].shape for k in init)
    # parameters in sync after 2 steps (BatchNorm's running stats are per rank in DDP)
    params = [k for k in rank0 if "running_" not in k and "num_batches" not in k]
    assert all(torch.equal(rank0[k], rank1[k]) for k in params)
    kept = [k for k in init if init[k].shape == rank0[k].shape and k.endswith("weight")]
    assert any(not torch.equal(rank0[k], init[k]) for k in kept)  # and they trained


def test_shrink_refuses_the_spawn_launcher():
    from lightning.pytorch.strategies import DDPStrategy
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    callback = ProsprPruningCallback(sparsity=0.5, structured=True, shrink=True, verbose=False)
    trainer = quiet_trainer([callback], strategy=DDPStrategy(start_method="spawn"), devices=1)
    with pytest.raises(MisconfigurationException, match="shrink=True with the spawn launcher"):
        callback.setup(trainer, ConvNet(), "fit")


class BertTagger(pl.LightningModule):
    """Hugging Face's BERT (from a config, random init, no dropout) with a classifier on token 0;
    the loss lives in `training_step` only."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(
            vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        self.bert = BertModel(config)
        self.classifier = nn.Linear(32, 3)

    def training_step(self, batch, batch_idx):
        hidden = self.bert(input_ids=batch[0]).last_hidden_state
        return F.cross_entropy(self.classifier(hidden[:, 0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        ids, labels = torch.randint(0, 40, (32, 8), generator=gen), torch.randint(0, 3, (32,), generator=gen)
        return DataLoader(TensorDataset(ids, labels), batch_size=8)


def test_shrink_removes_attention_heads_in_fit_and_on_resume(tmp_path: Path):
    """BERT in a LightningModule without `forward`: the callback removes whole heads before training,
    the optimizer holds the smaller tensors, and resuming from the checkpoint rebuilds the heads."""

    def callback() -> ProsprPruningCallback:
        return ProsprPruningCallback(
            sparsity=0.5, method="snip", structured=True, shrink=True, allocation="uniform", verbose=False
        )

    torch.manual_seed(0)
    module = BertTagger()
    with pytest.warns(UserWarning, match="keeps .* whole"):  # the hidden stream stays whole
        trainer = quiet_trainer([callback()], max_epochs=1, limit_train_batches=2, default_root_dir=tmp_path)
        trainer.fit(module)
    attention = module.bert.encoder.layer[0].attention
    assert attention.self.num_attention_heads == 2 and attention.self.value.weight.shape == (16, 32)
    assert attention.output.dense.weight.shape == (32, 16)
    held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert held == {id(p) for p in module.parameters()} and trainer.global_step == 2
    path = tmp_path / "bert.ckpt"
    trainer.save_checkpoint(path)

    torch.manual_seed(1)
    fresh = BertTagger()
    resumed = quiet_trainer([callback()], max_epochs=2, limit_train_batches=2, default_root_dir=tmp_path)
    resumed.fit(fresh, ckpt_path=path)
    again = fresh.bert.encoder.layer[0].attention.self
    assert again.num_attention_heads == 2 and again.all_head_size == 16
    assert again.query.weight.shape == (16, 32) and resumed.global_step == 4


def test_head_sparsity_removes_heads_under_the_global_allocation():
    """With the global allocation heads rarely lose to single MLP channels; `head_sparsity` removes
    them anyway: 3 of BERT's 4 heads, while `sparsity` takes half of the MLP width."""
    torch.manual_seed(0)
    module = BertTagger()
    callback = ProsprPruningCallback(
        sparsity=0.5, method="snip", structured=True, head_sparsity=0.75, shrink=True, verbose=False
    )
    with pytest.warns(UserWarning, match="keeps .* whole"):
        quiet_trainer([callback], max_steps=1).fit(module)
    layer = module.bert.encoder.layer[0]
    assert layer.attention.self.num_attention_heads == 1 and layer.attention.self.all_head_size == 8
    assert layer.intermediate.dense.weight.shape == (32, 32)
    assert "head sparsity 0.75" in callback.description
    with pytest.raises(ValueError, match="`head_sparsity` removes whole attention heads"):
        ProsprPruningCallback(sparsity=0.5, head_sparsity=0.5)
