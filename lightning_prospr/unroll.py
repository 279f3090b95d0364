"""The differentiable inner loop: functional SGD over a `{name: tensor}` dict.

This module knows nothing about Lightning or pruning. It runs $M$ plain SGD steps on a set of
tensors held *outside* the model, calling the model through `torch.func.functional_call`
([`StatelessLoss`][lightning_prospr.stateless.StatelessLoss]), so the model's own parameters and
buffers are never written to.

One inner step, with learning rate $\\alpha$, momentum $\\mu$ and weight decay $\\lambda$, follows
`torch.optim.SGD` exactly (no dampening, no Nesterov):

$$
g_t = \\nabla_w L(w_t; b_t) + \\lambda w_t, \\qquad
v_t = \\begin{cases} g_t & t = 0 \\\\ \\mu v_{t-1} + g_t & t > 0 \\end{cases}, \\qquad
w_{t+1} = w_t - \\alpha v_t
$$

With `create_graph=True` every step stays on the autograd tape, so a gradient of a loss at $w_M$
can flow back through all $M$ steps (second order). With `create_graph=False` each step's gradient
is a constant (first order). [`sgd_adjoint`][lightning_prospr.unroll.sgd_adjoint] computes the
second-order derivative by recomputation instead, in the memory of one step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_prospr.errors import check_loss, loss_context
from lightning_prospr.rng import TorchRngState
from lightning_prospr.stateless import StatelessLoss

__all__ = ["evaluate_loss", "sgd_adjoint", "sgd_unroll"]


def evaluate_loss(
    loss: StatelessLoss, params: Mapping[str, Tensor], batch: Any, step: int, total: int
) -> Tensor:
    """`loss(params, batch)` as a checked scalar, with the step context attached to any error."""
    what = "final loss" if step == total else "inner SGD step"
    where = f"at inner step {step} of {total} ({what}, batch {step})"
    with loss_context(where):
        return check_loss(loss(params, batch), where, source=loss.source, hint=loss.hint)


def _sgd_update(
    name: str,
    w: Tensor,
    grad: Tensor,
    velocity: dict[str, Tensor],
    lr: float,
    momentum: float,
    weight_decay: float,
) -> Tensor:
    """One `torch.optim.SGD` update of `w` (the velocity of `name` kept in `velocity`)."""
    if weight_decay:
        grad = grad + weight_decay * w
    if momentum:
        grad = grad if name not in velocity else momentum * velocity[name] + grad
        velocity[name] = grad
    return w - lr * grad


def sgd_unroll(
    loss: StatelessLoss,
    params: dict[str, Tensor],
    trainable: Sequence[str],
    batches: Sequence[Any],
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    create_graph: bool = True,
) -> dict[str, Tensor]:
    """Run `len(batches)` SGD steps on `params[name] for name in trainable`.

    Args:
        loss: the stateless loss to descend.
        params: every tensor the model needs, by parameter name; entries not in `trainable` stay
            constant. Trainable entries must require grad.
        trainable: the names that the inner loop updates.
        batches: one batch per step, in order.
        lr: the learning rate, as in `torch.optim.SGD`.
        momentum: the momentum, as in `torch.optim.SGD`.
        weight_decay: the weight decay, as in `torch.optim.SGD`.
        create_graph: keep each step on the tape (second order). If `False` the gradients are
            constants and the returned tensors are fresh leaves that require grad.

    Returns:
        `params` after the last step (a new dict; the input tensors are not modified).
    """
    params = dict(params)
    velocity: dict[str, Tensor] = {}
    total = len(batches)
    for step, batch in enumerate(batches):
        value = evaluate_loss(loss, params, batch, step, total)
        grads = torch.autograd.grad(
            value, [params[n] for n in trainable], create_graph=create_graph, allow_unused=True
        )
        for name, grad in zip(trainable, grads, strict=True):
            w = params[name]
            if grad is None:  # the loss does not depend on this tensor
                grad = torch.zeros_like(w)
            if not create_graph:
                grad = grad.detach()
            new = _sgd_update(name, w, grad, velocity, lr, momentum, weight_decay)
            params[name] = new.detach().requires_grad_(True) if not create_graph else new
        del value, grads
    return params


def sgd_adjoint(
    loss: StatelessLoss,
    params: Mapping[str, Tensor],
    trainable: Sequence[str],
    wrt: Sequence[str],
    batches: Sequence[Any],
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> dict[str, Tensor]:
    """$\\partial L_M / \\partial w_0$ through $M$ = `len(batches) - 1` SGD steps, by recomputation.

    The same derivative as backpropagating through [`sgd_unroll`][lightning_prospr.unroll.sgd_unroll]
    with `create_graph=True`, but in bounded memory: the forward sweep keeps only the iterates $w_t$
    (one copy of the trainable tensors per step, no graph), and the reverse sweep rebuilds one step's
    graph at a time to apply its transposed Jacobian with a Hessian-vector product. With
    $g_t = \\nabla L_t(w_t) + \\lambda w_t$, $v_t = \\mu v_{t-1} + g_t$ and $w_{t+1} = w_t - \\alpha v_t$,
    the adjoints run backwards from $a_M = \\nabla L_M(w_M)$:

    $$
    b_t = \\mu b_{t+1} - \\alpha a_{t+1}, \\qquad
    a_t = a_{t+1} + (\\nabla^2 L_t(w_t) + \\lambda I)\\, b_t, \\qquad b_M = 0.
    $$

    Tensors in `wrt` that are not trainable (frozen, yet asked for) are constants of every step;
    their adjoint collects $\\partial L_M / \\partial p$ plus the mixed terms of each step. Random
    draws inside the loss (dropout) are replayed: each step's RNG state is saved and restored.

    Args:
        loss: the stateless loss.
        params: every tensor the model needs at the start ($w_0$ for the trainable ones).
        trainable: names updated by the inner SGD.
        wrt: names to differentiate with respect to (at the start).
        batches: $M + 1$ batches: one per step, then the final loss's.
        lr: the learning rate, as in `torch.optim.SGD`.
        momentum: the momentum, as in `torch.optim.SGD`.
        weight_decay: the weight decay, as in `torch.optim.SGD`.

    Returns:
        `{name: dL_M / d params[name]}` for `name in wrt`.
    """
    sweep = _Adjoint(loss, params, trainable, wrt, batches, (lr, momentum, weight_decay))
    adjoint = sweep.forward()
    for step in reversed(range(sweep.steps)):
        sweep.backward_step(step, adjoint)
    return {n: adjoint[n] for n in wrt}


class _Adjoint:
    """The two sweeps of [`sgd_adjoint`][lightning_prospr.unroll.sgd_adjoint]."""

    def __init__(
        self,
        loss: StatelessLoss,
        params: Mapping[str, Tensor],
        trainable: Sequence[str],
        wrt: Sequence[str],
        batches: Sequence[Any],
        sgd: tuple[float, float, float],
    ) -> None:
        self.loss, self.params, self.trainable, self.wrt, self.batches = loss, params, trainable, wrt, batches
        self.lr, self.momentum, self.weight_decay = sgd
        self.steps = len(batches) - 1
        self.device = next(iter(params.values())).device
        self.names = [*trainable, *(n for n in wrt if n not in trainable)]
        self.iterates: list[tuple[dict[str, Tensor], TorchRngState]] = []
        self.carried: dict[str, Tensor] = {}

    def _leaves(self, values: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {n: t.detach().requires_grad_(n in self.trainable or n in self.wrt) for n, t in values.items()}

    def forward(self) -> dict[str, Tensor]:
        """The iterates $w_0 .. w_{M-1}$ (kept, with each step's RNG state), then $a_M$."""
        current = {n: t.detach() for n, t in self.params.items()}
        velocity: dict[str, Tensor] = {}
        for step in range(self.steps):
            rng = TorchRngState(self.device)
            self.iterates.append(({n: current[n] for n in self.trainable}, rng))
            inputs = self._leaves(current)
            value = evaluate_loss(self.loss, inputs, self.batches[step], step, self.steps)
            grads = torch.autograd.grad(value, [inputs[n] for n in self.trainable], allow_unused=True)
            for name, grad in zip(self.trainable, grads, strict=True):
                w = current[name]
                grad = torch.zeros_like(w) if grad is None else grad
                current[name] = _sgd_update(
                    name, w, grad, velocity, self.lr, self.momentum, self.weight_decay
                )
            del value, grads, inputs
        velocity.clear()
        inputs = self._leaves(current)
        value = evaluate_loss(self.loss, inputs, self.batches[self.steps], self.steps, self.steps)
        found = torch.autograd.grad(value, [inputs[n] for n in self.names], allow_unused=True)
        return {
            n: torch.zeros_like(inputs[n]) if g is None else g for n, g in zip(self.names, found, strict=True)
        }

    def backward_step(self, step: int, adjoint: dict[str, Tensor]) -> None:
        """Apply step `step`'s transposed Jacobian to the adjoints (in place), rebuilding its graph."""
        point, rng = self.iterates.pop()
        lr, momentum = self.lr, self.momentum
        b = {
            n: -lr * adjoint[n] + (momentum * self.carried[n] if n in self.carried else 0)
            for n in self.trainable
        }
        rng.restore()
        inputs = self._leaves({**self.params, **point})
        value = evaluate_loss(self.loss, inputs, self.batches[step], step, self.steps)
        grads = torch.autograd.grad(
            value, [inputs[n] for n in self.trainable], create_graph=True, allow_unused=True
        )
        used = [
            (n, g) for n, g in zip(self.trainable, grads, strict=True) if g is not None and g.requires_grad
        ]
        if used:
            products = torch.autograd.grad(
                [g for _, g in used], [inputs[n] for n in self.names], grad_outputs=[b[n] for n, _ in used],
                allow_unused=True,
            )  # fmt: skip
            for name, product in zip(self.names, products, strict=True):
                if product is not None:
                    adjoint[name] = adjoint[name] + product
        if self.weight_decay:
            for name in self.trainable:
                adjoint[name] = adjoint[name] + self.weight_decay * b[name]
        self.carried = b if momentum else {}
        del value, grads, used, inputs
