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

import gc
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from lightning_prospr.compat import forward_pre_hooks, pruned_tensor_name
from lightning_prospr.cpu_memory import release_freed_memory
from lightning_prospr.prunable import default_parameter_names, prunable_parameters
from lightning_prospr.unroll import (
    LossFn,
    StatelessLoss,
    UnrollError,
    evaluate_loss,
    is_out_of_memory,
    raise_if_compiled_double_backward,
    raise_if_not_twice_differentiable,
    sgd_adjoint,
    sgd_unroll,
)

__all__ = ["prospr_scores", "resolve_parameters", "take_batches"]


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


def resolve_parameters(
    model: nn.Module,
    parameters: Sequence[str] | None,
    loss_fn: LossFn | None = None,
    batch: Any = None,
) -> list[str]:
    """Check ``parameters`` against the model (or pick the default set) and return the names.

    The default set (``parameters=None``) is :func:`~lightning_prospr.prunable.prunable_parameters`
    when a loss and a batch are given (one watched loss pass), else the same rule by module type
    (:func:`~lightning_prospr.prunable.default_parameter_names`). A name may be given plainly
    (``"fc.weight"``) for a weight that carries a :mod:`torch.nn.utils.prune` re-parametrization
    (``fc.weight_orig`` and ``fc.weight_mask``).
    """
    if parameters is None:
        if loss_fn is not None:
            names = prunable_parameters(model, loss_fn, batch)
        else:
            names = default_parameter_names(model)
        if not names:
            raise ValueError(
                f"{type(model).__name__} has no trainable weight matrix to prune (no parameter of two or "
                "more dimensions is multiplied with activations in the loss): pass `parameters` with the "
                "names (from model.named_parameters()) of the weights to score."
            )
        return names
    if isinstance(parameters, str):
        raise TypeError(f"`parameters` must be a list of names, not a string: use [{parameters!r}].")
    names = [n[: -len("_orig")] if n.endswith("_orig") else n for n in dict.fromkeys(parameters)]
    if not names:
        raise ValueError("`parameters` is empty: pass None for the default set, or some names.")
    named = dict(model.named_parameters())
    unknown = [n for n in names if n not in named and f"{n}_orig" not in named]
    if unknown:
        raise ValueError(
            f"`parameters` names {unknown}, which are not parameters of {type(model).__name__}. "
            f"Known names include {list(named)[:8]}."
        )
    return names


def parameter_key(named: Mapping[str, Tensor], name: str) -> str:
    """The key of weight ``name`` in ``named_parameters()``: ``name`` or, when pruned, ``name + "_orig"``."""
    return name if name in named else f"{name}_orig"


@contextmanager
def preserved_state(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Restore train/eval flags, pruned ``weight`` attributes and the global RNG on exit.

    A :mod:`torch.nn.utils.prune` hook writes ``module.weight = weight_orig * weight_mask`` on every
    forward, also a stateless one, so those plain attributes are put back too.
    """
    flags = [(m, m.training) for m in model.modules()]
    derived = [
        (m, pruned_tensor_name(hook), getattr(m, pruned_tensor_name(hook), None))
        for m in model.modules()
        for hook in forward_pre_hooks(m).values()
        if isinstance(hook, (prune.BasePruningMethod, prune.PruningContainer))
    ]
    cuda_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            yield
    finally:
        for module, flag in flags:
            module.training = flag
        for module, attr, value in derived:
            setattr(module, attr, value)


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
    structured: bool = False,
    masks: Mapping[str, Tensor] | None = None,
    recompute: bool = False,
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
            scores every weight matrix that multiplies activations in a watched pass of ``loss_fn``
            on the first batch (:func:`~lightning_prospr.prunable.prunable_parameters`).
        structured: one mask per output channel (dim 0) instead of one per weight; the scores then
            have shape ``(out_channels, 1, ..., 1)``.
        masks: fixed keep-masks (bool, the weight's shape or broadcastable to it) that the network
            carries during the whole unroll, e.g. from an earlier round of iterative pruning.
        recompute: full mode in bounded memory: keep only the iterates and rebuild one step's graph
            at a time in the meta backward pass (:func:`~lightning_prospr.unroll.sgd_adjoint`). The
            same scores; memory of about one unrolled step instead of ``M``, for roughly one more
            forward and backward pass per step.

    Every parameter with ``requires_grad=True`` is updated in the inner loop (biases and norm
    layers too), and the model runs in train mode. Frozen parameters stay constant.

    Returns:
        ``{name: score}`` with each weight's shape (per-channel shape when ``structured``), on its
        device, in float32 for half-precision weights and in the weight's dtype otherwise.

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
    drawn = take_batches(batches, steps + 1)
    names = resolve_parameters(model, parameters, loss_fn, drawn[0])
    named = dict(model.named_parameters())
    keys = {n: parameter_key(named, n) for n in names}
    device = named[keys[names[0]]].device
    out_of_memory = None
    try:
        with preserved_state(model, device), torch.enable_grad():
            raw = _meta_gradients(
                model,
                loss_fn,
                drawn,
                named,
                keys,
                steps,
                lr,
                momentum,
                weight_decay,
                first_order,
                structured,
                masks,
                recompute,
            )
    except RuntimeError as err:  # out of memory (torch.OutOfMemoryError, or the CPU or MPS allocator's)
        raise_if_compiled_double_backward(err, "ProsPr's full mode (unlike first_order=True)")
        raise_if_not_twice_differentiable(err, "ProsPr's full mode (unlike first_order=True)")
        if not is_out_of_memory(err):
            raise
        out_of_memory = str(err)  # raised below, once the traceback (and the graph it holds) is gone
    if out_of_memory is not None:
        gc.collect()
    if device.type == "cpu":
        release_freed_memory()  # the unroll's graphs, which glibc's heap would otherwise keep
    if out_of_memory is not None:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        allocator = ""
        if device.type == "cpu":
            allocator = (
                " On CPU, glibc's malloc also keeps freed activation buffers, so the process can need "
                "up to about twice the memory its tensors do: an allocator that returns them "
                "(LD_PRELOAD=libtcmalloc_minimal.so.4) brings it down to the live tensors."
            )
        raise torch.OutOfMemoryError(
            f"Out of memory while scoring {len(names)} tensors with M={steps} unrolled steps "
            f"({'first-order' if first_order else 'full'} mode). Everything the unroll held has been "
            "freed and the model is unchanged. Try, in this order: recompute=True (the same scores, "
            "holding one inner step's graph instead of M), first_order=True (no second-order graph), "
            f"fewer `steps`, or a smaller scoring batch.{allocator} Original error: {out_of_memory}"
        )
    scores = {}
    for name, r in raw.items():
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


def _meta_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    drawn: list[Any],
    named: dict[str, nn.Parameter],
    keys: dict[str, str],
    steps: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    first_order: bool,
    structured: bool = False,
    fixed: Mapping[str, Tensor] | None = None,
    recompute: bool = False,
) -> dict[str, Tensor]:
    """d L_M / d c for each scored weight (signed, not yet reduced); see :func:`prospr_scores`."""
    model.train()
    trainable = [n for n, p in named.items() if p.requires_grad]
    scored = set(keys.values())
    multipliers = {keys[n]: m.to(named[keys[n]].dtype) for n, m in (fixed or {}).items() if n in keys}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    loss = StatelessLoss(model, loss_fn, buffers, multipliers, second_order=not first_order)
    if recompute and not first_order:
        # w_0 = c * theta_0, so dL/dc = theta_0 * dL/dw_0 (summed over each channel when structured).
        adjoint = sgd_adjoint(
            loss, {n: p.detach() for n, p in named.items()}, trainable, list(keys.values()), drawn,
            lr=lr, momentum=momentum, weight_decay=weight_decay,
        )  # fmt: skip
        out = {}
        for name, key in keys.items():
            product = named[key].detach() * adjoint[key]
            if structured:
                product = product.sum(dim=tuple(range(1, product.dim())), keepdim=True)
            out[name] = product
        return out
    # The starting point shares storage with the model's parameters: no copy, never written to.
    start = {n: p.detach().requires_grad_(n in trainable or n in scored) for n, p in named.items()}
    masks = {}
    if not first_order:
        for name, key in keys.items():
            shape = _mask_shape(named[key], structured)
            masks[name] = torch.ones(
                shape, dtype=named[key].dtype, device=named[key].device, requires_grad=True
            )
            start[key] = masks[name] * named[key].detach()
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
    if first_order:  # closed form: theta_0 * grad L(w_M), i.e. d w_M / d w_0 taken as the identity
        inputs = [final[key] for key in keys.values()]
    else:
        inputs = [masks[name] for name in keys]
    grads = torch.autograd.grad(last, inputs, allow_unused=True)
    out = {}
    for (name, key), grad in zip(keys.items(), grads, strict=True):
        theta = named[key].detach()
        if first_order:
            grad = theta * (torch.zeros_like(theta) if grad is None else grad)
            out[name] = grad.sum(dim=tuple(range(1, grad.dim())), keepdim=True) if structured else grad
        else:
            out[name] = theta.new_zeros(_mask_shape(theta, structured)) if grad is None else grad
    return out


def _mask_shape(weight: Tensor, structured: bool) -> tuple[int, ...]:
    """One mask entry per weight, or per output channel (dim 0) when ``structured``."""
    if not structured:
        return tuple(weight.shape)
    return (weight.shape[0], *([1] * (weight.dim() - 1)))
