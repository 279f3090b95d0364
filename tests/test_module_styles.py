"""The default path (guard on) on LightningModules written in the common styles that have no usable
``forward(batch[0])``: no ``forward`` at all, ``forward(dict)``, ``forward(x, mask)``, and one with
``example_input_array`` set. Each is pruned by ``Trainer.fit`` at extreme sparsity."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from shared import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader

from lightning_prospr import ProsprPruningCallback
from lightning_prospr.models import LeNet5
from lightning_prospr.selection import pruned_count

F = nn.functional


def image_batches(count: int = 6, dict_batch: bool = False) -> list:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        x, y = torch.randn(16, 1, 28, 28, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        out.append({"image": x, "label": y} if dict_batch else (x, y))
    return out


def token_batches(count: int = 6) -> list:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, 50, (16, 12), generator=gen)
        lengths = torch.randint(4, 13, (16,), generator=gen)
        mask = (torch.arange(12)[None, :] < lengths[:, None]).float()
        out.append((tokens, mask, torch.randint(0, 3, (16,), generator=gen)))
    return out


def ones_like(batch):
    """Floating-point tensors as ones; token ids and labels as they are."""
    if isinstance(batch, dict):
        return {k: ones_like(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(ones_like(v) for v in batch)
    return torch.ones_like(batch) if batch.is_floating_point() else batch


class Base(pl.LightningModule):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=None)


class NoForward(Base):
    """``training_step`` calls ``self.net``; the module itself has no ``forward``."""

    def __init__(self):
        super().__init__()
        self.net, self.data = LeNet5(), image_batches()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def outputs(self, batch):
        return self.net(batch[0])


class DictForward(Base):
    """``forward`` takes the batch's dict, not a tensor."""

    def __init__(self):
        super().__init__()
        self.net, self.data = LeNet5(), image_batches(dict_batch=True)

    def forward(self, inputs: dict) -> torch.Tensor:
        return self.net(inputs["image"])

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch), batch["label"])

    def outputs(self, batch):
        return self(batch)


class MaskForward(Base):
    """``forward(tokens, mask)``: an embedding, a hidden layer and a masked mean over positions."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.hidden = nn.Linear(32, 64)
        self.mix = nn.Linear(64, 64)
        self.head = nn.Linear(64, 3)
        self.data = token_batches()

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.mix(F.relu(self.hidden(self.embed(tokens))))) * mask[..., None]
        return self.head(h.sum(1) / mask.sum(1, keepdim=True))

    def training_step(self, batch, batch_idx):
        tokens, mask, labels = batch
        return F.cross_entropy(self(tokens, mask), labels)

    def outputs(self, batch):
        return self(batch[0], batch[1])


class ExampleInput(NoForward):
    """A plain ``forward(x)`` and ``example_input_array`` (which the guard no longer needs)."""

    def __init__(self):
        super().__init__()
        self.example_input_array = torch.zeros(2, 1, 28, 28)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])


@pytest.mark.parametrize("sparsity", [0.99, 0.999])
@pytest.mark.parametrize("style", [NoForward, DictForward, MaskForward, ExampleInput])
def test_default_guard_on_modules_without_a_batch_forward(style, sparsity):
    torch.manual_seed(0)
    module = style()
    callback = ProsprPruningCallback(sparsity=sparsity, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer([callback], max_steps=2).fit(module)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "could not check" in m or "no path" in m], messages
    masks = callback.masks
    assert masks is not None
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == pruned_count(sparsity, total)
    assert all(int(m.sum()) >= 1 for m in masks.values())  # no layer collapsed
    # Connected, checked without the engine: a plain copy of the trained sparse network with |w| for
    # every weight and no biases still carries an all-ones input to the output. (These networks are
    # chains, so every layer lies on every input-to-output path.)
    twin = style()
    twin.load_state_dict(module.state_dict())  # the effective (masked) weights, as plain tensors
    twin.eval()
    with torch.no_grad():
        for name, p in twin.named_parameters():
            p.copy_(torch.zeros_like(p) if name.endswith("bias") else p.abs())
        assert sum(int((p == 0).sum()) for n, p in twin.named_parameters() if n in masks) >= (
            pruned_count(sparsity, total)
        )
        assert twin.outputs(ones_like(module.data[0])).sum() > 0
