"""ProsPr scores checked against independent computations.

The reference for L_M(c) below shares no code with the engine: it copies the model, multiplies the
scored weights by c in place, and trains the copy with ``torch.optim.SGD`` and ``loss.backward()``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from shared import ce_loss
from torch import nn

import lightning_prospr.scores as scores_module
from lightning_prospr import default_parameter_names, prospr_scores, snip_scores

F = nn.functional


def small_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))


def small_convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.Conv2d(3, 2, 3, stride=2),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 3),
    )


def make_batches(model_kind: str, count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shape = (8, 5) if model_kind == "mlp" else (6, 2, 5, 5)
    return [
        (
            torch.randn(shape, generator=gen, dtype=torch.float64),
            torch.randint(0, 3, (shape[0],), generator=gen),
        )
        for _ in range(count)
    ]


def reference_loss_after_steps(model, names, c, batches, steps, lr, momentum, weight_decay):
    """L_M(c) with torch.optim.SGD on a deep copy whose scored weights were scaled by c."""
    net = copy.deepcopy(model).train()
    params = dict(net.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].mul_(c[name])
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    for t in range(steps):
        opt.zero_grad()
        ce_loss(net, batches[t]).backward()
        opt.step()
    with torch.no_grad():
        return ce_loss(net, batches[steps]).item()


def finite_difference_scores(model, batches, steps, lr, momentum, weight_decay, h=1e-6):
    names = default_parameter_names(model)
    ones = {n: torch.ones_like(p) for n, p in model.named_parameters() if n in names}
    out = {}
    for name in names:
        grad = torch.zeros_like(ones[name])
        for i in range(grad.numel()):
            plus = {n: v.clone() for n, v in ones.items()}
            minus = {n: v.clone() for n, v in ones.items()}
            plus[name].view(-1)[i] += h
            minus[name].view(-1)[i] -= h
            lp = reference_loss_after_steps(model, names, plus, batches, steps, lr, momentum, weight_decay)
            lm = reference_loss_after_steps(model, names, minus, batches, steps, lr, momentum, weight_decay)
            grad.view(-1)[i] = (lp - lm) / (2 * h)
        out[name] = grad.abs()
    return out


def max_relative_error(a: dict, b: dict) -> float:
    num = max((a[n] - b[n]).abs().max().item() for n in b)
    den = max(b[n].abs().max().item() for n in b)
    return num / den


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_full_mode_matches_finite_differences(kind, momentum):
    torch.manual_seed(1)
    model = (small_mlp() if kind == "mlp" else small_convnet()).double()
    batches = make_batches(kind, 4)
    steps, lr, wd = 3, 0.1, 0.01
    scores = prospr_scores(model, ce_loss, batches, steps=steps, lr=lr, momentum=momentum, weight_decay=wd)
    reference = finite_difference_scores(model, batches, steps, lr, momentum, wd)
    assert set(scores) == set(reference)
    err = max_relative_error(scores, reference)
    print(f"{kind} momentum={momentum}: max relative error {err:.2e}")
    assert err < 1e-5
    # The meta-gradient is genuinely second order: it differs from the first-order one.
    first = prospr_scores(
        model, ce_loss, batches, steps=steps, lr=lr, momentum=momentum, weight_decay=wd, mode="first_order"
    )
    assert max_relative_error(first, reference) > 1e-3


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_first_order_matches_closed_form(momentum):
    """First order: |theta_0 * grad L(w_M)| with w_M from plain SGD on the unmasked model."""
    torch.manual_seed(2)
    model = small_convnet().double()
    batches = make_batches("conv", 4, seed=3)
    steps, lr, wd = 3, 0.05, 1e-3
    names = default_parameter_names(model)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}

    net = copy.deepcopy(model).train()
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
    for t in range(steps):
        opt.zero_grad()
        ce_loss(net, batches[t]).backward()
        opt.step()
    opt.zero_grad()
    ce_loss(net, batches[steps]).backward()
    expected = {n: (theta0[n] * p.grad).abs() for n, p in net.named_parameters() if n in names}

    scores = prospr_scores(
        model, ce_loss, batches, steps=steps, lr=lr, momentum=momentum, weight_decay=wd, mode="first_order"
    )
    assert max_relative_error(scores, expected) < 1e-10


def test_snip_is_the_gradient_times_the_weight():
    torch.manual_seed(3)
    model = small_mlp().double()
    batch = make_batches("mlp", 1)[0]
    net = copy.deepcopy(model).train()
    ce_loss(net, batch).backward()
    names = default_parameter_names(model)
    snip = {n: (p.detach() * p.grad).abs() for n, p in net.named_parameters() if n in names}
    scores = snip_scores(model, ce_loss, [batch])
    assert max_relative_error(scores, snip) < 1e-12


def test_single_batch_is_reused_for_every_step():
    torch.manual_seed(4)
    model = small_mlp().double()
    batch = make_batches("mlp", 1)[0]
    reused = prospr_scores(model, ce_loss, [batch], steps=3)
    explicit = prospr_scores(model, ce_loss, [batch] * 4, steps=3)
    for name in reused:
        assert torch.equal(reused[name], explicit[name])
    other = prospr_scores(model, ce_loss, make_batches("mlp", 4), steps=3)
    assert not all(torch.equal(reused[n], other[n]) for n in reused)


def test_default_set_lists_each_matrix_once_and_leaves_tied_embeddings_out():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(7, 4)
            self.conv = nn.Conv1d(4, 4, 3)
            self.norm = nn.LayerNorm(4)
            self.shared_a = nn.Linear(4, 4)
            self.shared_b = nn.Linear(4, 4)
            self.shared_b.weight = self.shared_a.weight  # tied: listed once, under its first name
            self.head = nn.Linear(4, 7)
            self.head.weight = self.embed.weight  # tied to the embedding: left out

    names = default_parameter_names(Tied())
    assert names == ["conv.weight", "shared_a.weight"]


def test_scores_on_any_module_with_tied_weights():
    """A model that is neither Conv nor Linear-only, with a tied embedding / output weight."""

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(11, 6)
            self.rnn = nn.GRU(6, 6, batch_first=True)
            self.head = nn.Linear(6, 11, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, tokens):
            h, _ = self.rnn(self.embed(tokens))
            return self.head(h)

    torch.manual_seed(5)
    model = TinyLM().double()
    tokens = torch.randint(0, 11, (4, 5))

    def lm_loss(m, t):
        logits = m(t[:, :-1])
        return F.cross_entropy(logits.reshape(-1, 11), t[:, 1:].reshape(-1))

    names = ["embed.weight", "rnn.weight_ih_l0"]
    scores = prospr_scores(model, lm_loss, [tokens], steps=2, parameters=names)
    assert list(scores) == names
    assert all(torch.isfinite(s).all() and s.abs().sum() > 0 for s in scores.values())


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("structured", [False, True])
def test_recompute_gives_the_full_mode_scores(momentum, structured, monkeypatch):
    """The bounded-memory reverse sweep equals backprop through the stored unroll."""

    class WithDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = small_convnet()
            self.drop = nn.Dropout(0.3)
            self.frozen = nn.Linear(3, 3)
            self.frozen.requires_grad_(False)

        def forward(self, x):
            return self.frozen(self.drop(self.body(x)))

    torch.manual_seed(6)
    model = WithDropout().double()
    batches = make_batches("conv", 4, seed=7)
    names = [*default_parameter_names(model), "frozen.weight"]
    kwargs = dict(
        steps=3, lr=0.1, momentum=momentum, weight_decay=0.01, parameters=names, structured=structured
    )
    torch.manual_seed(8)
    full = prospr_scores(model, ce_loss, batches, **kwargs)
    torch.manual_seed(8)

    def no_stored_unroll(*args, **kwargs):
        raise AssertionError("mode='recompute' must not store the unrolled graph")

    monkeypatch.setattr(scores_module, "sgd_unroll", no_stored_unroll)
    recomputed = prospr_scores(model, ce_loss, batches, mode="recompute", **kwargs)
    assert set(full) == set(recomputed) == set(names)
    assert max_relative_error(recomputed, full) < 1e-10


def test_full_mode_through_fused_attention_layers():
    """nn.TransformerEncoderLayer calls fused attention kernels that have no double backward; the
    engine switches to the math backend while it differentiates twice."""
    torch.manual_seed(9)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(8 * 5, 3))
    batch = (torch.randn(4, 5, 8), torch.randint(0, 3, (4,)))
    full = prospr_scores(model, ce_loss, [batch], steps=2)
    recomputed = prospr_scores(model, ce_loss, [batch], steps=2, mode="recompute")
    assert "0.linear1.weight" in full and all(torch.isfinite(s).all() for s in full.values())
    assert max_relative_error(recomputed, full) < 1e-4
