"""Scoring differentiates the loss twice: every operator gets a double backward, or a clear error."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd import gradgradcheck

from lightning_prospr import prospr_scores
from lightning_prospr.errors import NotTwiceDifferentiableError
from lightning_prospr.execution import (
    EQUIVALENT_FORMS,
    NOT_TWICE_DIFFERENTIABLE,
    twice_differentiable_ops,
)

F = nn.functional


def double_backward(f, x):
    out = f(x)
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return torch.autograd.grad((g * torch.randn_like(g)).sum(), x)


@pytest.mark.parametrize("op", list(EQUIVALENT_FORMS), ids=lambda f: f.__name__)
def test_each_equivalent_form_is_needed_equal_and_twice_differentiable(op):
    x = (torch.randn(64, dtype=torch.float64) * 4).requires_grad_(True)
    with pytest.raises(RuntimeError, match="is not implemented"):
        double_backward(op, x)  # the reason it is in the table (drop it once PyTorch has one)
    form = EQUIVALENT_FORMS[op]
    assert torch.allclose(form(x), op(x), rtol=0, atol=1e-15)
    assert gradgradcheck(form, (x,))
    inplace = x.detach().clone()
    assert torch.equal(form(inplace.clone(), inplace=True), form(inplace))


def test_the_context_swaps_the_operator_only_while_open():
    x = torch.randn(16, dtype=torch.float64, requires_grad=True)
    layer = nn.Hardsigmoid()
    with twice_differentiable_ops():
        double_backward(layer, x)
    with pytest.raises(RuntimeError, match="is not implemented"):
        double_backward(layer, x)


LOSSES = {
    "ctc_loss": lambda z: F.ctc_loss(
        z.reshape(3, 1, 8).log_softmax(-1), torch.tensor([[1, 2]]), torch.tensor([3]), torch.tensor([2])
    ),
    "multi_margin_loss": lambda z: F.multi_margin_loss(z.reshape(3, 8), torch.tensor([1, 2, 3])),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_operators_without_any_form_fail_before_the_unroll_naming_the_layer(name):
    assert name in NOT_TWICE_DIFFERENTIABLE.values()
    with pytest.raises(RuntimeError, match="is not implemented"):
        double_backward(LOSSES[name], torch.randn(24, dtype=torch.float64, requires_grad=True))

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 24)

        def forward(self, x):
            return LOSSES[name](self.proj(x).mean(0))

    model = nn.Sequential()
    model.add_module("head", Head())
    batch = torch.randn(5, 4)
    with pytest.raises(
        NotTwiceDifferentiableError, match=rf"{name}.*layer 'head' \(Head\).*first_order=True"
    ):
        prospr_scores(model, lambda m, b: m(b), [batch], steps=1)
    # First-order mode needs one backward pass through it, which PyTorch has.
    assert prospr_scores(model, lambda m, b: m(b), [batch], steps=1, first_order=True)


def test_an_operator_missing_from_the_tables_still_gets_advice():
    """torch._C._nn.hardsigmoid bypasses F.hardsigmoid's form: its failure in the meta backward
    pass becomes advice instead of PyTorch's bare message."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))

    def loss(m, batch):
        h = torch._C._nn.hardsigmoid(m[0](batch[0]))
        return F.cross_entropy(m[1](h), batch[1])

    batch = (torch.randn(6, 3), torch.randint(0, 2, (6,)))
    with pytest.raises(
        NotTwiceDifferentiableError, match=r"no double backward for aten::hardsigmoid.*first_order"
    ):
        prospr_scores(model, loss, [batch], steps=2)
