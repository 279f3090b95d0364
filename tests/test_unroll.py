"""The inner loop (unroll.py): functional SGD against torch.optim.SGD, and the adjoint sweep against
backpropagation through the taped unroll."""

from __future__ import annotations

import copy

import pytest
import torch
from shared import ce_loss
from torch import nn

from lightning_prospr.errors import UnrollError
from lightning_prospr.stateless import StatelessLoss
from lightning_prospr.unroll import sgd_adjoint, sgd_unroll


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [
        (torch.randn(6, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen))
        for _ in range(4)
    ]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    loss = StatelessLoss(model, ce_loss, buffers)
    params = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    return model, batches, loss, params


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 0.0), (0.9, 1e-2)])
def test_unroll_takes_the_steps_of_torch_optim_sgd(momentum, weight_decay):
    model, batches, loss, params = setup()
    out = sgd_unroll(loss, params, list(params), batches[:3], lr=0.1, momentum=momentum,
                     weight_decay=weight_decay, create_graph=False)  # fmt: skip
    reference = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    for batch in batches[:3]:
        optimizer.zero_grad()
        ce_loss(reference, batch).backward()
        optimizer.step()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(out[name], p.detach(), rtol=1e-12, atol=1e-12)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), setup()[0].parameters(), strict=True))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_adjoint_is_the_gradient_through_the_taped_unroll(momentum):
    _, batches, loss, params = setup(3)
    final = sgd_unroll(loss, params, list(params), batches[:3], lr=0.1, momentum=momentum, weight_decay=1e-2)
    taped = torch.autograd.grad(ce_loss_of(loss, final, batches[3]), list(params.values()))
    adjoint = sgd_adjoint(loss, params, list(params), list(params), batches, lr=0.1, momentum=momentum,
                          weight_decay=1e-2)  # fmt: skip
    for (name, _), grad in zip(params.items(), taped, strict=True):
        torch.testing.assert_close(adjoint[name], grad, rtol=1e-10, atol=1e-12)


def ce_loss_of(loss: StatelessLoss, params, batch):
    return loss(params, batch)


def test_a_failing_step_names_itself():
    _, batches, loss, params = setup()
    bad = [batches[0], (batches[1][0] * float("nan"), batches[1][1])]
    with pytest.raises(
        UnrollError, match=r"non-finite loss.*at inner step 1 of 2 \(inner SGD step, batch 1\)"
    ):
        sgd_unroll(loss, params, list(params), bad, lr=0.1)
