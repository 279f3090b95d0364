"""Saliency scores on top of the unroll: model + loss + batches -> ``{name: score}``.

ProsPr (Alizadeh et al., ICLR 2022) puts a mask :math:`c = \\mathbf{1}` on every scored weight,
starts the inner loop from :math:`w_0 = c \\odot \\theta_0`, takes ``M`` SGD steps
(:mod:`lightning_prospr.unroll`) and scores each weight by the magnitude of the meta-gradient of the
loss after the last step:

.. math::

    s = \\left| \\frac{\\partial L(w_M(c); b_M)}{\\partial c} \\right|_{c = \\mathbf{1}}

Full mode backpropagates through all ``M`` steps (Hessian-vector products included). First-order
mode drops the Hessian terms, i.e. takes :math:`\\partial w_M / \\partial w_0 \\approx I`, which gives
the closed form :math:`s = |\\theta_0 \\odot \\nabla_w L(w_M; b_M)|`. With ``M = 0`` both are exactly
SNIP, :math:`|\\theta_0 \\odot \\nabla_\\theta L(\\theta_0; b_0)|`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prospr.unroll import LossFn, StatelessLoss, UnrollError, evaluate_loss, sgd_unroll

__all__ = ["default_parameter_names", "prospr_scores", "take_batches"]

#: Module types whose ``weight`` is scored by default.
DEFAULT_SCORED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def default_parameter_names(model: nn.Module) -> list[str]:
    """Names of the weights scored by default: the ``weight`` of every Linear and Conv1d/2d/3d.

    A weight shared by several modules (tied weights) is listed once, under the first name
    :meth:`torch.nn.Module.named_parameters` gives it.
    """
    wanted = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, DEFAULT_SCORED_TYPES) and isinstance(getattr(m, "weight", None), Tensor)
    }
    return [name for name, p in model.named_parameters() if id(p) in wanted]


def take_batches(batches: Iterable[Any], count: int) -> list[Any]:
    """Draw ``count`` batches; when the iterable runs out, cycle over what it gave.

    So ``[batch]`` means "reuse one batch for every step", and a loader with at least ``count``
    batches gives a new batch to every step. An empty iterable raises ``ValueError``.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    drawn = list(itertools.islice(iter(batches), count))
    if not drawn:
        raise ValueError(
            "`batches` is empty: give at least one batch (a list with one batch reuses it for "
            "every inner step)."
        )
    return [drawn[i % len(drawn)] for i in range(count)]


def _check_hyperparameters(steps: int, lr: float, momentum: float, weight_decay: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"`steps` must be an integer >= 0 (0 is SNIP), got {steps!r}.")
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"`lr` must be a finite number > 0, got {lr!r}; the paper uses 0.1.")
    if not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise ValueError(f"`momentum` must be in [0, 1), got {momentum!r}; use 0.0 for plain SGD.")
    if not isinstance(weight_decay, (int, float)) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"`weight_decay` must be a finite number >= 0, got {weight_decay!r}.")


def resolve_parameters(model: nn.Module, parameters: Sequence[str] | None) -> list[str]:
    """Check ``parameters`` against the model (or pick the default set) and return the names."""
    named = dict(model.named_parameters())
    if parameters is None:
        names = default_parameter_names(model)
        if not names:
            raise ValueError(
                f"{type(model).__name__} has no Linear or Conv1d/2d/3d weight to prune: pass "
                "`parameters` with the names (from model.named_parameters()) of the weights to score."
            )
        return names
    if isinstance(parameters, str):
        raise TypeError(f"`parameters` must be a list of names, not a string: use [{parameters!r}].")
    names = list(dict.fromkeys(parameters))
    if not names:
        raise ValueError("`parameters` is empty: pass None for the default set, or some names.")
    unknown = [n for n in names if n not in named]
    if unknown:
        pruned = [n for n in unknown if f"{n}_orig" in named]
        hint = (
            f" {pruned} already carry a torch.nn.utils.prune re-parametrization: score "
            "before pruning, or call torch.nn.utils.prune.remove first."
            if pruned
            else f" Known names include {list(named)[:8]}."
        )
        raise ValueError(f"`parameters` names {unknown}, which are not parameters of the model.{hint}")
    return names


@contextmanager
def preserved_state(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Restore train/eval flags and the global RNG (CPU, and CUDA where used) on exit."""
    flags = [(m, m.training) for m in model.modules()]
    cuda_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            yield
    finally:
        for module, flag in flags:
            module.training = flag


def prospr_scores(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    steps: int = 3,
    lr: float = 0.1,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    first_order: bool = False,
    parameters: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """ProsPr saliency of each scored weight: :math:`|\\partial L_M / \\partial c|` at :math:`c = 1`.

    Args:
        model: any ``nn.Module``. It is left exactly as it was: parameters, buffers (BatchNorm
            running statistics), ``requires_grad``, ``.grad``, train/eval mode, and the global RNG.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; called with the model's parameters
            replaced by the unrolled ones (through :func:`torch.func.functional_call`).
        batches: an iterable of batches, already on the model's device. Step ``t`` uses batch
            ``t`` and the final loss uses batch ``M``, so ``steps + 1`` batches are drawn; if the
            iterable runs out it is cycled (``[batch]`` reuses one batch throughout).
        steps: number of inner SGD steps ``M``; ``0`` gives SNIP.
        lr, momentum, weight_decay: the inner SGD, as in :class:`torch.optim.SGD`.
        first_order: drop the Hessian terms (cheaper; the paper's approximation for large models).
        parameters: names from ``model.named_parameters()`` of the weights to score; ``None``
            scores the ``weight`` of every Linear and Conv1d/2d/3d.

    Every parameter with ``requires_grad=True`` is updated in the inner loop (biases and norm
    layers too), and the model runs in train mode. Frozen parameters stay constant.

    Returns:
        ``{name: score}`` with each weight's shape, on its device, in float32 for half-precision
        weights and in the weight's dtype otherwise.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_prospr import prospr_scores, global_masks
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
        >>> loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])
        >>> scores = prospr_scores(model, loss_fn, [batch], steps=3)
        >>> masks = global_masks(scores, sparsity=0.5)
        >>> sum(int(m.sum()) for m in masks.values())
        28
    """
    _check_hyperparameters(steps, lr, momentum, weight_decay)
    names = resolve_parameters(model, parameters)
    drawn = take_batches(batches, steps + 1)

    named = dict(model.named_parameters())
    device = named[names[0]].device
    trainable = [n for n, p in named.items() if p.requires_grad]
    with preserved_state(model, device), torch.enable_grad():
        model.train()
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        loss = StatelessLoss(model, loss_fn, buffers)
        masks = {n: torch.ones_like(named[n], requires_grad=not first_order) for n in names}
        start = {n: p.detach().requires_grad_(n in trainable or n in masks) for n, p in named.items()}
        if not first_order:
            for n in names:
                start[n] = masks[n] * named[n].detach()
        final = sgd_unroll(
            loss,
            start,
            trainable,
            drawn[:steps],
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            create_graph=not first_order,
        )
        last = evaluate_loss(loss, final, drawn[steps], steps, steps)
        if first_order:
            grads = torch.autograd.grad(last, [final[n] for n in names], allow_unused=True)
            raw = [
                named[n].detach() * (g if g is not None else torch.zeros_like(named[n]))
                for n, g in zip(names, grads, strict=True)
            ]
        else:
            grads = torch.autograd.grad(last, [masks[n] for n in names], allow_unused=True)
            raw = [
                g if g is not None else torch.zeros_like(named[n]) for n, g in zip(names, grads, strict=True)
            ]
        del last, final, start, loss, buffers
    scores = {}
    for name, r in zip(names, raw, strict=True):
        score = r.detach().abs()
        if score.dtype in (torch.float16, torch.bfloat16):
            score = score.float()
        if not torch.isfinite(score).all():
            raise UnrollError(
                f"the meta-gradient of {name!r} is not finite; lower `lr`, use fewer `steps`, or "
                "use first_order=True."
            )
        scores[name] = score
    return scores
