"""Bad input gets a clear error before any work; faults leave the user's model as it was."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from shared import ce_loss as ce
from shared import quiet_trainer
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_prospr import (
    ProsprPruningCallback,
    UnrollError,
    apply_masks,
    current_masks,
    global_masks,
    prospr_scores,
)
from lightning_prospr.masking import effective_weight

F = nn.functional


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


BATCH = (torch.randn(16, 4), torch.randint(0, 3, (16,)))


# ---------------------------------------------------------------- engine arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": -1}, "`steps` must be an integer >= 1"),
        ({"steps": 1.5}, "`steps` must be an integer >= 1"),
        ({"steps": 0}, "M = 0 is SNIP: use method='snip'"),
        ({"mode": "exact"}, "`mode` must be one of 'full', 'first_order', 'recompute'"),
        ({"lr": 0.0}, "`lr` must be a finite number > 0"),
        ({"lr": float("nan")}, "`lr` must be a finite number > 0"),
        ({"momentum": 1.0}, "`momentum` must be in"),
        ({"weight_decay": -1.0}, "`weight_decay` must be a finite number >= 0"),
        ({"parameters": []}, "`parameters` is empty"),
        ({"parameters": ["9.weight"]}, r"`parameters` names \['9.weight'\]"),
    ],
)
def test_engine_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prospr_scores(mlp(), ce, [BATCH], **kwargs)


def test_parameters_as_a_string_is_refused():
    with pytest.raises(TypeError, match=r"use \['0.weight'\]"):
        prospr_scores(mlp(), ce, [BATCH], parameters="0.weight")


def test_model_without_prunable_weights():
    model = nn.Sequential(nn.Embedding(5, 3), nn.LayerNorm(3))
    with pytest.raises(ValueError, match="no trainable weight matrix to prune"):
        prospr_scores(model, lambda m, b: m(b).sum(), [torch.tensor([1, 2])])


def test_empty_batches():
    with pytest.raises(ValueError, match="`batches` is empty"):
        prospr_scores(mlp(), ce, [])


@pytest.mark.parametrize(
    ("loss_fn", "match"),
    [
        (lambda m, b: None, "loss_fn returned None while finding the weights to prune"),
        (lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), r"shape \(16,\)"),
        (lambda m, b: ce(m, b).detach(), "without a gradient"),
        (lambda m, b: ce(m, b).item(), "loss_fn returned float"),
        (lambda m, b: ce(m, b) * float("inf"), "non-finite loss"),
    ],
)
def test_bad_losses(loss_fn, match):
    with pytest.raises(UnrollError, match=match):
        prospr_scores(mlp(), loss_fn, [BATCH], steps=3)


def test_divergent_unroll_is_reported():
    linear = nn.Linear(4, 3)
    with pytest.raises(UnrollError, match=r"non-finite loss.*at inner step [123] of 3"):
        prospr_scores(linear, ce, [(BATCH[0] * 1e10, BATCH[1])], steps=3, lr=1e35)


def _failing_at_third_call(fail):
    """``ce``, except that its third call runs ``fail()`` instead (inside the unroll)."""
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        if len(calls) == 3:
            fail()
        return ce(m, batch)

    return loss_fn


def _cuda_out_of_memory() -> None:
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def _impossible_allocation() -> None:
    torch.empty(2**58)  # 1 EiB: the CPU allocator really fails (a plain RuntimeError from torch)


def test_out_of_memory_is_reraised_with_advice_and_the_model_is_intact():
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(
        torch.OutOfMemoryError, match=r"mode='recompute'.*mode='first_order'.*fewer `steps`.*smaller"
    ) as info:
        prospr_scores(model, _failing_at_third_call(_cuda_out_of_memory), [BATCH], steps=3)
    assert "Tried to allocate 20.00 GiB" in str(info.value)
    assert info.value.__context__ is None  # the traceback holding the unroll's graph was dropped
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_cpu_allocation_failure_in_the_loss_gets_the_out_of_memory_advice():
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(torch.OutOfMemoryError, match=r"mode='recompute'.*LD_PRELOAD=libtcmalloc") as info:
        prospr_scores(model, _failing_at_third_call(_impossible_allocation), [BATCH], steps=3)
    assert "DefaultCPUAllocator: can't allocate memory" in str(info.value)  # the original error
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class _FailingBackward(torch.autograd.Function):
    """Identity whose backward pass raises ``error()`` (or allocates 1 EiB when ``error`` is None)."""

    @staticmethod
    def forward(ctx, x, error):
        ctx.error = error
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        if ctx.error is None:
            _impossible_allocation()
        raise ctx.error()


@pytest.mark.parametrize("mode", ["full", "recompute"])
def test_allocation_failure_in_a_backward_pass_gets_the_out_of_memory_advice(mode):
    """Outside the loss (autograd's backward pass), on CPU: the same advice, the model intact."""
    model = mlp()
    before = copy.deepcopy(model.state_dict())

    def loss_fn(m, batch):
        return F.cross_entropy(_FailingBackward.apply(m(batch[0]), None), batch[1])

    with pytest.raises(torch.OutOfMemoryError, match=r"Out of memory while scoring 2 tensors with M=3"):
        prospr_scores(model, loss_fn, [BATCH], steps=3, mode=mode)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_other_errors_in_a_backward_pass_are_not_called_out_of_memory():
    def loss_fn(m, batch):
        output = _FailingBackward.apply(m(batch[0]), lambda: RuntimeError("boom"))
        return F.cross_entropy(output, batch[1])

    with pytest.raises(RuntimeError, match="boom") as info:
        prospr_scores(mlp(), loss_fn, [BATCH], steps=3)
    assert not isinstance(info.value, torch.OutOfMemoryError)


# ---------------------------------------------------------------- special models


def test_frozen_weights_are_neither_updated_nor_pruned_unless_asked():
    model = mlp()
    model[0].requires_grad_(False)
    assert list(prospr_scores(model, ce, [BATCH])) == ["3.weight"]
    asked = prospr_scores(model, ce, [BATCH], parameters=["0.weight", "3.weight"])
    assert set(asked) == {"0.weight", "3.weight"} and asked["0.weight"].abs().sum() > 0
    # Frozen parameters stay constant in the unroll: same scores as if layer 0 had lr 0, which we
    # get by folding its weight and bias into a fixed function of the input.
    w, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    rest = copy.deepcopy(model[1:])
    folded = prospr_scores(
        rest, lambda m, bt: ce(m, (bt[0] @ w.T + b, bt[1])), [BATCH], parameters=["3.weight"]
    )
    assert torch.allclose(folded["3.weight"], asked["3.weight"], rtol=1e-5, atol=1e-7)


def test_tied_weights_one_mask_counted_once_applied_everywhere():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(6, 6, bias=False)
            self.out = nn.Linear(6, 6, bias=False)
            self.out.weight = self.inp.weight

        def forward(self, x):
            return self.out(torch.tanh(self.inp(x)))

    torch.manual_seed(0)
    model = Tied()
    batch = (torch.randn(8, 6), torch.randint(0, 6, (8,)))
    scores = prospr_scores(model, ce, [batch])
    assert list(scores) == ["inp.weight"]
    masks = global_masks(scores, 0.5)
    apply_masks(model, masks)
    assert torch.equal(effective_weight(model, "inp.weight") == 0, ~masks["inp.weight"])
    assert torch.equal(effective_weight(model, "out.weight") == 0, ~masks["inp.weight"])
    model(batch[0])
    assert torch.equal(model.out.weight, model.inp.weight)


def test_already_pruned_modules_compose():
    model = mlp()
    prune.random_unstructured(model[0], "weight", amount=0.5)
    before = current_masks(model)["0.weight"]
    scores = prospr_scores(model, ce, [BATCH])
    assert set(scores) == {"0.weight", "3.weight"}
    assert bool((scores["0.weight"][~before] == 0).all())  # no prospect for weights already gone
    masks = global_masks(scores, 0.8, within=current_masks(model))
    assert not bool((masks["0.weight"] & ~before).any())  # nested in the existing mask
    apply_masks(model, masks)
    assert torch.equal(current_masks(model)["0.weight"], masks["0.weight"])
    with pytest.raises(ValueError, match="already pruned"):
        global_masks(scores, 0.1, within={"0.weight": before})


# ---------------------------------------------------------------- callback


class Module(pl.LightningModule):
    def __init__(self, mode: str = "ok"):
        super().__init__()
        self.mode = mode
        self.net = nn.Sequential(
            nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3)
        )
        self.calls = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = (
            (batch["x"], batch["y"])
            if isinstance(batch, dict)
            else (batch.x, batch.y)
            if isinstance(batch, Pair)
            else batch
        )
        self.calls += 1
        if self.mode == "fail" and self.calls == 3:
            raise KeyError("corrupt sample")
        if self.mode == "none":
            return None
        loss = F.cross_entropy(self(x), y, reduction="none" if self.mode == "vector" else "mean")
        self.log("loss", loss.mean())
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


@dataclass
class Pair:
    x: torch.Tensor
    y: torch.Tensor

    def to(self, device):
        return Pair(self.x.to(device), self.y.to(device))


def data(n=64):
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen))


class Stream(IterableDataset):
    def __iter__(self):
        gen = torch.Generator().manual_seed(1)
        for _ in range(40):
            yield torch.randn(4, generator=gen), torch.randint(0, 3, (), generator=gen)


@pytest.mark.parametrize(
    "loader",
    [
        DataLoader([{"x": x, "y": y} for x, y in data()], batch_size=16),
        DataLoader(
            data(), batch_size=16, collate_fn=lambda items: Pair(*map(torch.stack, zip(*items, strict=True)))
        ),
        DataLoader(Stream(), batch_size=8),
        DataLoader(data(8), batch_size=16),  # one batch: cycled for every step
    ],
    ids=["dict", "custom-class", "iterable-dataset", "one-batch"],
)
def test_batch_kinds_and_loaders(loader):
    callback = ProsprPruningCallback(sparsity=0.5, verbose=False)
    make_trainer(callback).fit(Module(), train_dataloaders=loader)
    assert callback.report is not None and callback.report.sparsity == pytest.approx(0.5, abs=0.01)


def make_trainer(callback):
    return quiet_trainer([callback], max_epochs=1)


def test_empty_train_dataloader():
    with pytest.raises(MisconfigurationException, match="gave no batch for ProsPr scoring"):
        make_trainer(ProsprPruningCallback(sparsity=0.5)).fit(Module(), train_dataloaders=DataLoader([]))


@pytest.mark.parametrize(
    ("mode", "error", "match"),
    [
        (
            "none",
            UnrollError,
            r"training_step returned None while finding the weights to prune \(batch 0\).*prospr_loss",
        ),
        ("vector", UnrollError, r"training_step returned a tensor of shape \(16,\)"),
    ],
)
def test_unusable_training_step(mode, error, match):
    with pytest.raises(error, match=match):
        make_trainer(ProsprPruningCallback(sparsity=0.5)).fit(
            Module(mode), train_dataloaders=DataLoader(data(), batch_size=16)
        )


def test_failure_inside_training_step_leaves_everything_as_it_was():
    module = Module("fail")
    module.net[1].eval()  # an unusual train/eval mix that must survive
    loader = DataLoader(data(), batch_size=16)
    trainer = make_trainer(ProsprPruningCallback(sparsity=0.5))
    module(torch.randn(2, 4)).sum().backward()  # .grad fields present
    params = {n: p.detach().clone() for n, p in module.named_parameters()}
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    training = {n: m.training for n, m in module.named_modules()}
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    with pytest.raises(
        UnrollError, match=r"KeyError raised by the loss at inner step 1 of 3.*batch 1.*corrupt sample"
    ):
        trainer.fit(module, train_dataloaders=loader)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p, params[n]) for n, p in module.named_parameters())
    assert all(torch.equal(p.grad, grads[n]) for n, p in module.named_parameters())
    assert all(torch.equal(b, buffers[n]) for n, b in module.named_buffers())
    assert {n: m.training for n, m in module.named_modules()} == training
    assert not any(n.endswith("_orig") for n, _ in module.named_parameters())
    assert trainer.optimizers[0].state_dict()["state"] == {}  # Adam never stepped
    assert "log" not in vars(module)  # self.log restored
