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

from lightning_prospr.compat import CompatibilityError
from lightning_prospr.errors import NotTwiceDifferentiableError, UnrollError
from lightning_prospr.execution import scoring_execution

__all__ = ["StatelessLoss", "UnrollError", "sgd_unroll"]

LossFn = Callable[[nn.Module, Any], Tensor]


class _LossModule(nn.Module):
    """Holds the user's model as a child so one ``functional_call`` substitutes its tensors."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self._loss_fn(self.model, batch)


def raise_if_compiled_double_backward(err: BaseException, what: str) -> None:
    """Turn AOTAutograd's refusal to differentiate a compiled backward pass into advice.

    Only reached where :func:`~lightning_prospr.execution.eager_execution` cannot help (torch < 2.6).
    ``what`` names the computation that differentiates twice, for the message.
    """
    text = str(err)
    if isinstance(err, RuntimeError) and (
        "does not currently support double backward" in text or "donated buffers" in text
    ):
        raise UnrollError(
            f"{what} differentiates the model twice, but the model runs under torch.compile, whose "
            f"compiled backward pass cannot be differentiated again on torch {torch.__version__}. "
            "Score the uncompiled model and compile it afterwards, or upgrade to torch >= 2.6 (where "
            f"scoring runs compiled models eagerly). Original error: {err}"
        ) from err


def raise_if_not_twice_differentiable(err: BaseException, what: str) -> None:
    """Turn PyTorch's "derivative for aten::X_backward is not implemented", raised by the second
    backward pass through an operator that :func:`~lightning_prospr.execution.twice_differentiable_ops`
    does not know, into advice. ``what`` names the computation that differentiates twice."""
    text = str(err)
    if isinstance(err, RuntimeError) and "derivative for" in text and "is not implemented" in text:
        op = text.split("derivative for", 1)[1].split("is not implemented", 1)[0].strip()
        raise NotTwiceDifferentiableError(
            f"{what} differentiates the loss twice, but PyTorch {torch.__version__} has no double "
            f"backward for {op}, an operator of the model or the loss. Use first_order=True (one "
            "backward pass), or replace that operator while scoring (a prospr_loss of your own); "
            f"please report it so that scoring can swap it for a twice-differentiable form. "
            f"Original error: {err}"
        ) from err


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
        second_order: the loss will be differentiated twice: run attention with its math backend
            (see :func:`~lightning_prospr.execution.twice_differentiable_attention`).

    The model always runs eagerly and without activation checkpointing inside the call (see
    :func:`~lightning_prospr.execution.scoring_execution`).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        buffers: Mapping[str, Tensor],
        multipliers: Mapping[str, Tensor] | None = None,
        second_order: bool = False,
    ) -> None:
        self._second_order = second_order
        self._module = _LossModule(model, loss_fn)
        #: What the messages call the loss: ``loss_fn.source`` where it has one (the callback's
        #: ``"training_step"``), else ``"loss_fn"``.
        self.source: str = getattr(loss_fn, "source", "loss_fn")
        self._buffers = {f"model.{name}": b for name, b in buffers.items()}
        self._multipliers = dict(multipliers or {})

    def __call__(self, params: Mapping[str, Tensor], batch: Any) -> Tensor:
        tensors = dict(self._buffers)
        for name, t in params.items():
            factor = self._multipliers.get(name)
            tensors[f"model.{name}"] = t if factor is None else t * factor
        with scoring_execution(second_order=self._second_order, model=self._module.model):
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


#: Parts of the messages of allocation failures that PyTorch raises as a plain ``RuntimeError``
#: rather than :class:`torch.OutOfMemoryError`: the CPU allocator ("DefaultCPUAllocator: can't
#: allocate memory"), MPS ("MPS backend out of memory"), some CUDA paths ("CUDA error: out of memory").
_OUT_OF_MEMORY_MESSAGES = ("can't allocate memory", "out of memory")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is a failed memory allocation, on any device."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    if not isinstance(err, RuntimeError) or isinstance(err, UnrollError):
        return False
    message = str(err)
    return any(part in message for part in _OUT_OF_MEMORY_MESSAGES)


@contextmanager
def loss_context(where: str) -> Iterator[None]:
    """Attach ``where`` (once) to an error raised while evaluating a loss; wrap foreign errors in
    :class:`UnrollError`. Out-of-memory errors pass through for the caller's advice, and a
    :class:`~lightning_prospr.compat.CompatibilityError` as it is (it is not the loss's fault)."""
    try:
        yield
    except CompatibilityError:
        raise
    except UnrollError as err:
        if where in str(err):
            raise
        raise type(err)(f"{err} [{where}]") from err  # the same kind (NotTwiceDifferentiableError)
    except Exception as err:
        if is_out_of_memory(err):
            raise
        raise UnrollError(f"{type(err).__name__} raised by the loss {where}: {err}") from err


def evaluate_loss(
    loss: StatelessLoss, params: Mapping[str, Tensor], batch: Any, step: int, total: int
) -> Tensor:
    """``loss(params, batch)`` with the step context attached to any error it raises."""
    what = "final loss" if step == total else "inner SGD step"
    where = f"at inner step {step} of {total} ({what}, batch {step})"
    with loss_context(where):
        return check_loss(loss(params, batch), where, source=loss.source)


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


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


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
    """:math:`\\partial L_M / \\partial w_0` through ``M = len(batches) - 1`` SGD steps, by recomputation.

    The same derivative as backpropagating through :func:`sgd_unroll` with ``create_graph=True``,
    but in bounded memory: the forward sweep keeps only the iterates :math:`w_t` (one copy of the
    trainable tensors per step, no graph), and the reverse sweep rebuilds one step's graph at a time
    to apply its transposed Jacobian with a Hessian-vector product. With :math:`g_t = \\nabla
    L_t(w_t) + \\lambda w_t`, :math:`v_t = \\mu v_{t-1} + g_t` and :math:`w_{t+1} = w_t - \\alpha
    v_t`, the adjoints run backwards from :math:`a_M = \\nabla L_M(w_M)`:

    .. math::

        b_t = \\mu b_{t+1} - \\alpha a_{t+1}, \\qquad
        a_t = a_{t+1} + (\\nabla^2 L_t(w_t) + \\lambda I)\\, b_t, \\qquad b_M = 0.

    Tensors in ``wrt`` that are not trainable (frozen, yet asked for) are constants of every step;
    their adjoint collects :math:`\\partial L_M / \\partial p` plus the mixed terms of each step.
    Random draws inside the loss (dropout) are replayed: each step's RNG state is saved and restored.

    Args:
        loss: the stateless loss.
        params: every tensor the model needs at the start (:math:`w_0` for the trainable ones).
        trainable: names updated by the inner SGD.
        wrt: names to differentiate with respect to (at the start).
        batches: ``M + 1`` batches: one per step, then the final loss's.
        lr, momentum, weight_decay: as in :class:`torch.optim.SGD`.

    Returns:
        ``{name: dL_M / d params[name]}`` for ``name in wrt``.
    """
    steps = len(batches) - 1
    device = next(iter(params.values())).device
    constants = [n for n in wrt if n not in trainable]
    current = {n: t.detach() for n, t in params.items()}
    iterates: list[tuple[dict[str, Tensor], tuple[Tensor, Tensor | None]]] = []
    velocity: dict[str, Tensor] = {}

    def leaves(values: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {n: t.detach().requires_grad_(n in trainable or n in wrt) for n, t in values.items()}

    for step in range(steps):
        rng = _rng_state(device)
        iterates.append(({n: current[n] for n in trainable}, rng))
        inputs = leaves(current)
        value = evaluate_loss(loss, inputs, batches[step], step, steps)
        grads = torch.autograd.grad(value, [inputs[n] for n in trainable], allow_unused=True)
        for name, grad in zip(trainable, grads, strict=True):
            w = current[name]
            grad = torch.zeros_like(w) if grad is None else grad
            if weight_decay:
                grad = grad + weight_decay * w
            if momentum:
                grad = grad if name not in velocity else momentum * velocity[name] + grad
                velocity[name] = grad
            current[name] = w - lr * grad
        del value, grads, inputs
    velocity.clear()

    inputs = leaves(current)
    value = evaluate_loss(loss, inputs, batches[steps], steps, steps)
    names = [*trainable, *constants]
    found = torch.autograd.grad(value, [inputs[n] for n in names], allow_unused=True)
    adjoint = {n: torch.zeros_like(inputs[n]) if g is None else g for n, g in zip(names, found, strict=True)}
    del value, found, inputs, current

    carried: dict[str, Tensor] = {}
    for step in reversed(range(steps)):
        point, rng = iterates.pop()
        b = {n: -lr * adjoint[n] + (momentum * carried[n] if n in carried else 0) for n in trainable}
        _set_rng_state(rng, device)
        inputs = leaves({**params, **point})
        value = evaluate_loss(loss, inputs, batches[step], step, steps)
        grads = torch.autograd.grad(
            value, [inputs[n] for n in trainable], create_graph=True, allow_unused=True
        )
        used = [(n, g) for n, g in zip(trainable, grads, strict=True) if g is not None and g.requires_grad]
        if used:
            products = torch.autograd.grad(
                [g for _, g in used], [inputs[n] for n in names], grad_outputs=[b[n] for n, _ in used],
                allow_unused=True,
            )  # fmt: skip
            for name, product in zip(names, products, strict=True):
                if product is not None:
                    adjoint[name] = adjoint[name] + product
        if weight_decay:
            for name in trainable:
                adjoint[name] = adjoint[name] + weight_decay * b[name]
        carried = b if momentum else {}
        del value, grads, used, inputs
    return {n: adjoint[n] for n in wrt}
