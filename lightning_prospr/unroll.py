"""The differentiable inner loop: functional SGD over a ``{name: tensor}`` dict.

This module knows nothing about Lightning or pruning. It runs ``M`` plain SGD steps on a set of
tensors held *outside* the model, calling the model through :func:`torch.func.functional_call`, so
the model's own parameters and buffers are never written to.

One inner step, with learning rate :math:`\\alpha`, momentum :math:`\\mu` and weight decay
:math:`\\lambda`, follows :class:`torch.optim.SGD` exactly (no dampening, no Nesterov):

.. math::

    g_t = \\nabla_w L(w_t; b_t) + \\lambda w_t, \\qquad
    v_t = \\begin{cases} g_t & t = 0 \\\\ \\mu v_{t-1} + g_t & t > 0 \\end{cases}, \\qquad
    w_{t+1} = w_t - \\alpha v_t

With ``create_graph=True`` every step stays on the autograd tape, so a gradient of a loss at
:math:`w_M` can flow back through all ``M`` steps (second order). With ``create_graph=False`` each
step's gradient is a constant (first order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["StatelessLoss", "UnrollError", "sgd_unroll"]

LossFn = Callable[[nn.Module, Any], Tensor]


class UnrollError(RuntimeError):
    """A failure inside the unrolled inner loop, with the step and batch it happened at."""


class _LossModule(nn.Module):
    """Holds the user's model as a child so one ``functional_call`` substitutes its tensors."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self._loss_fn(self.model, batch)


class StatelessLoss:
    """``loss_fn(model, batch)`` evaluated with the model's tensors replaced by given ones.

    Args:
        model: any ``nn.Module``; it is not modified.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``. Inside the call ``model``'s parameters
            and buffers are the tensors passed to :meth:`__call__`.
        buffers: the buffers to use (for example clones of the model's BatchNorm statistics, so that
            train-mode updates land on the clones and not on the model).
        multipliers: optional fixed factors (e.g. keep-masks) by parameter name: the model sees
            ``params[name] * multipliers[name]`` on every call.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        buffers: Mapping[str, Tensor],
        multipliers: Mapping[str, Tensor] | None = None,
    ) -> None:
        self._module = _LossModule(model, loss_fn)
        self._buffers = {f"model.{name}": b for name, b in buffers.items()}
        self._multipliers = dict(multipliers or {})

    def __call__(self, params: Mapping[str, Tensor], batch: Any) -> Tensor:
        tensors = dict(self._buffers)
        for name, t in params.items():
            factor = self._multipliers.get(name)
            tensors[f"model.{name}"] = t if factor is None else t * factor
        return functional_call(self._module, tensors, (batch,), tie_weights=True, strict=False)


def check_loss(loss: Any, where: str, source: str = "loss_fn") -> Tensor:
    """Validate that ``loss`` (returned by ``source``) is a finite scalar tensor with a gradient path."""
    if loss is None:
        raise UnrollError(
            f"{source} returned None {where}; it must return a scalar loss tensor "
            "(a training_step that skips the batch cannot be used for scoring)."
        )
    if not isinstance(loss, Tensor):
        raise UnrollError(
            f"{source} returned {type(loss).__name__} {where}; it must return a scalar loss tensor."
        )
    if loss.numel() != 1:
        raise UnrollError(
            f"{source} returned a tensor of shape {tuple(loss.shape)} {where}; it must be a scalar "
            "(reduce it, e.g. with .mean())."
        )
    if not loss.requires_grad:
        raise UnrollError(
            f"{source} returned a tensor without a gradient {where}; compute the loss from the "
            "model's output and do not call .detach() or .item() on it, nor use torch.no_grad()."
        )
    if not torch.isfinite(loss.detach()).all():
        raise UnrollError(
            f"{source} returned a non-finite loss ({loss.item()}) {where}; lower `lr`, use fewer "
            "`steps`, or check the model and data for NaN/Inf."
        )
    return loss.reshape(())


@contextmanager
def _context(step: int, total: int, what: str) -> Iterator[None]:
    where = f"at inner step {step} of {total} ({what}, batch {step})"
    try:
        yield
    except UnrollError as err:
        if "at inner step" in str(err):
            raise
        raise UnrollError(f"{err} [{where}]") from err
    except torch.OutOfMemoryError:
        raise
    except Exception as err:
        raise UnrollError(f"{type(err).__name__} raised by the loss {where}: {err}") from err


def evaluate_loss(
    loss: StatelessLoss, params: Mapping[str, Tensor], batch: Any, step: int, total: int
) -> Tensor:
    """``loss(params, batch)`` with the step context attached to any error it raises."""
    what = "final loss" if step == total else "inner SGD step"
    with _context(step, total, what):
        return check_loss(loss(params, batch), f"at inner step {step} of {total} ({what}, batch {step})")


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
    """Run ``len(batches)`` SGD steps on ``params[name] for name in trainable``.

    Args:
        loss: the stateless loss to descend.
        params: every tensor the model needs, by parameter name; entries not in ``trainable`` stay
            constant. Trainable entries must require grad.
        trainable: the names that the inner loop updates.
        batches: one batch per step, in order.
        lr, momentum, weight_decay: as in :class:`torch.optim.SGD`.
        create_graph: keep each step on the tape (second order). If ``False`` the gradients are
            constants and the returned tensors are fresh leaves that require grad.

    Returns:
        ``params`` after the last step (a new dict; the input tensors are not modified).
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
            if weight_decay:
                grad = grad + weight_decay * w
            if momentum:
                grad = grad if name not in velocity else momentum * velocity[name] + grad
                velocity[name] = grad
            new = w - lr * grad
            if not create_graph:
                new = new.detach().requires_grad_(True)
            params[name] = new
        del value, grads
    return params
