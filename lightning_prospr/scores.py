"""ProsPr and SNIP scores on top of the unroll: model + loss + batches -> `{name: score}`.

ProsPr (Alizadeh et al., ICLR 2022) puts a mask $c = \\mathbf{1}$ on every scored weight, starts
the inner loop from $w_0 = c \\odot \\theta_0$, takes $M$ SGD steps
([`unroll`][lightning_prospr.unroll]) and scores each weight by the magnitude of the meta-gradient
of the loss after the last step:

$$
s = \\left| \\frac{\\partial L(w_M(c); b_M)}{\\partial c} \\right|_{c = \\mathbf{1}}
$$

Full mode backpropagates through all $M$ steps (Hessian-vector products included); recompute mode
computes the same derivative holding one step's graph at a time. First-order mode drops the
Hessian terms, i.e. takes $\\partial w_M / \\partial w_0 \\approx I$, which gives the closed form
$s = |\\theta_0 \\odot \\nabla_w L(w_M; b_M)|$. With $M = 0$ the score is SNIP's,
$|\\theta_0 \\odot \\nabla_\\theta L(\\theta_0; b_0)|$ ([`snip_scores`][lightning_prospr.scores.snip_scores]).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prospr.batches import take_batches
from lightning_prospr.cpu_memory import release_freed_memory
from lightning_prospr.errors import (
    UnrollError,
    is_out_of_memory,
    raise_if_compiled_double_backward,
    raise_if_not_twice_differentiable,
)
from lightning_prospr.model_state import preserved_state
from lightning_prospr.prunable import output_dim, parameter_key, resolve_parameters
from lightning_prospr.stateless import LossFn, StatelessLoss
from lightning_prospr.unroll import evaluate_loss, sgd_adjoint, sgd_unroll

__all__ = ["channel_sums", "prospr_scores", "snip_scores"]


def channel_sums(scores: Tensor, dim: int = 0) -> Tensor:
    """One score per output channel (along `dim`, 0 but for Hugging Face's `Conv1D`): the sum of the
    channel's scores, with size 1 along every other dimension (`(out, 1, ..., 1)` for `dim=0`)."""
    return scores.sum(dim=tuple(d for d in range(scores.dim()) if d != dim), keepdim=True)


def _mask_shape(weight: Tensor, dim: int | None) -> tuple[int, ...]:
    """One mask entry per weight (`dim=None`), or per output channel along `dim`."""
    if dim is None:
        return tuple(weight.shape)
    return tuple(n if d == dim else 1 for d, n in enumerate(weight.shape))


def prospr_scores(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    steps: int = 3,
    lr: float = 0.1,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    mode: str = "full",
    parameters: Sequence[str] | None = None,
    structured: bool = False,
    within: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """ProsPr saliency of each scored weight: $|\\partial L_M / \\partial c|$ at $c = 1$.

    Args:
        model: any `nn.Module`. It is left exactly as it was: parameters, buffers (BatchNorm
            running statistics), `requires_grad`, `.grad`, train/eval mode, and the global RNG.
        loss_fn: `loss_fn(model, batch) -> scalar tensor`; called with the model's parameters
            replaced by the unrolled ones (through `torch.func.functional_call`).
        batches: an iterable of batches, already on the model's device. Step $t$ uses batch $t$
            and the final loss uses batch $M$, so `steps + 1` batches are drawn; if the iterable
            runs out it is cycled (`[batch]` reuses one batch throughout).
        steps: number of inner SGD steps $M \\ge 1$ (for $M = 0$, SNIP, see
            [`snip_scores`][lightning_prospr.scores.snip_scores]).
        lr: the inner learning rate, as in `torch.optim.SGD`.
        momentum: the inner momentum, as in `torch.optim.SGD`.
        weight_decay: the inner weight decay, as in `torch.optim.SGD`.
        mode: `"full"` (backpropagate through every step), `"first_order"` (drop the Hessian
            terms: cheaper, the paper's approximation for large models) or `"recompute"` (the
            scores of full mode, keeping only the iterates and rebuilding one step's graph at a
            time, [`sgd_adjoint`][lightning_prospr.unroll.sgd_adjoint]: the memory of about one
            step instead of $M$, for roughly one more forward and backward pass per step).
        parameters: names from `model.named_parameters()` of the weights to score; `None` scores
            every weight matrix that multiplies activations in a watched pass of `loss_fn` on the
            first batch ([`prunable_parameters`][lightning_prospr.prunable.prunable_parameters]).
        structured: one mask per output channel instead of one per weight; the scores then
            have shape `(out_channels, 1, ..., 1)` (`(1, out_channels)` for Hugging Face's
            `Conv1D`, whose weight is `(in, out)`).
        within: fixed keep-masks (bool, the weight's shape or broadcastable to it) that the network
            carries during the whole unroll, e.g. from an earlier round of iterative pruning.

    Every parameter with `requires_grad=True` is updated in the inner loop (biases and norm layers
    too), and the model runs in train mode. Frozen parameters stay constant.

    Returns:
        `{name: score}` with each weight's shape (per-channel shape when `structured`), on its
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
    from lightning_prospr.settings import PruningSettings

    PruningSettings(0.0, steps=steps, lr=lr, momentum=momentum, weight_decay=weight_decay, mode=mode)
    return _scores(
        model, loss_fn, batches, steps, (lr, momentum, weight_decay), mode, parameters, structured, within
    )


def snip_scores(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    parameters: Sequence[str] | None = None,
    structured: bool = False,
    within: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """SNIP (Lee et al., ICLR 2019): connection sensitivity on the first batch of `batches`.

    $$
    s = \\left| \\theta \\odot \\nabla_\\theta L(\\theta; b_0) \\right|
    $$

    ProsPr's meta-gradient with no inner step: $|\\partial L / \\partial c|$ at $c = 1$, computed by
    the same engine as [`prospr_scores`][lightning_prospr.scores.prospr_scores]. The model runs in
    train mode (BatchNorm uses batch statistics, on cloned buffers; dropout is active with the global
    RNG restored afterwards).

    Args:
        model: any `nn.Module`; left exactly as it was.
        loss_fn: `loss_fn(model, batch) -> scalar tensor`, as for `prospr_scores`.
        batches: an iterable of batches on the model's device; only the first is used.
        parameters: names of the weights to score; `None` is the default set.
        structured: one score per output channel.
        within: fixed keep-masks the network carries.

    Returns:
        `{name: score >= 0}` with each weight's shape and device, float32 for half-precision
        weights and the weight's dtype otherwise.
    """
    return _scores(model, loss_fn, batches, 0, (0.1, 0.0, 0.0), "full", parameters, structured, within)


def _scores(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    steps: int,
    sgd: tuple[float, float, float],
    mode: str,
    parameters: Sequence[str] | None,
    structured: bool,
    within: Mapping[str, Tensor] | None,
) -> dict[str, Tensor]:
    """The engine behind both: the signed meta-gradients, then their magnitudes."""
    drawn = take_batches(batches, steps + 1)
    names = resolve_parameters(model, parameters, loss_fn, drawn[0])
    named = dict(model.named_parameters())
    keys = {n: parameter_key(named, n) for n in names}
    device = named[keys[names[0]]].device
    dims = {n: output_dim(model, n) for n in names} if structured else None

    def compute() -> dict[str, Tensor]:
        with preserved_state(model, device), torch.enable_grad():
            return _meta_gradients(model, loss_fn, drawn, named, keys, steps, sgd, mode, dims, within)

    return _magnitudes(_with_memory_advice(compute, len(names), steps, mode, device), snip=steps == 0)


def _with_memory_advice(
    compute: Callable[[], dict[str, Tensor]], tensors: int, steps: int, mode: str, device: torch.device
) -> dict[str, Tensor]:
    """`compute()`, with an allocation failure turned into `torch.OutOfMemoryError` with advice,
    raised once the traceback (and the graph it holds) is gone, and the unroll's memory given back."""
    out_of_memory = None
    raw: dict[str, Tensor] = {}
    try:
        raw = compute()
    except RuntimeError as err:  # out of memory (torch.OutOfMemoryError, or the CPU or MPS allocator's)
        raise_if_compiled_double_backward(err, "ProsPr's full mode (unlike mode='first_order')")
        raise_if_not_twice_differentiable(err, "ProsPr's full mode (unlike mode='first_order')")
        if not is_out_of_memory(err):
            raise
        out_of_memory = str(err)
    if out_of_memory is not None:
        gc.collect()
    if device.type == "cpu":
        release_freed_memory()  # the unroll's graphs, which glibc's heap would otherwise keep
    if out_of_memory is None:
        return raw
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
        f"Out of memory while scoring {tensors} tensors with M={steps} unrolled steps "
        f"({mode.replace('_', '-')} mode). Everything the unroll held has been freed and the model is "
        "unchanged. Try, in this order: mode='recompute' (the same scores, holding one inner step's "
        "graph instead of M), mode='first_order' (no second-order graph), fewer `steps`, or a smaller "
        f"scoring batch.{allocator} Original error: {out_of_memory}"
    )


def _magnitudes(raw: Mapping[str, Tensor], snip: bool) -> dict[str, Tensor]:
    scores = {}
    for name, r in raw.items():
        score = r.detach().abs()
        if score.dtype in (torch.float16, torch.bfloat16):
            score = score.float()
        if not torch.isfinite(score).all():
            if snip:
                raise UnrollError(
                    f"the SNIP score of {name!r} is not finite (NaN or inf); check the model and data "
                    "for NaN/inf."
                )
            raise UnrollError(
                f"the meta-gradient of {name!r} is not finite; lower `lr`, use fewer `steps`, or "
                "use mode='first_order'."
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
    sgd: tuple[float, float, float],
    mode: str,
    dims: Mapping[str, int] | None,
    within: Mapping[str, Tensor] | None,
) -> dict[str, Tensor]:
    """d L_M / d c for each scored weight (signed, not yet reduced); one per output channel along
    `dims[name]` when `dims` is given (structured)."""
    model.train()
    trainable = [n for n, p in named.items() if p.requires_grad]
    multipliers = {keys[n]: m.to(named[keys[n]].dtype) for n, m in (within or {}).items() if n in keys}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    loss = StatelessLoss(model, loss_fn, buffers, multipliers, second_order=mode != "first_order")
    if mode == "recompute":
        return _recomputed(loss, named, keys, trainable, drawn, sgd, dims)
    return _unrolled(loss, named, keys, trainable, drawn, steps, sgd, mode == "first_order", dims)


def _recomputed(
    loss: StatelessLoss,
    named: dict[str, nn.Parameter],
    keys: dict[str, str],
    trainable: list[str],
    drawn: list[Any],
    sgd: tuple[float, float, float],
    dims: Mapping[str, int] | None,
) -> dict[str, Tensor]:
    """w_0 = c * theta_0, so dL/dc = theta_0 * dL/dw_0 (summed over each channel when structured)."""
    lr, momentum, weight_decay = sgd
    adjoint = sgd_adjoint(
        loss, {n: p.detach() for n, p in named.items()}, trainable, list(keys.values()), drawn,
        lr=lr, momentum=momentum, weight_decay=weight_decay,
    )  # fmt: skip
    out = {}
    for name, key in keys.items():
        product = named[key].detach() * adjoint[key]
        out[name] = product if dims is None else channel_sums(product, dims[name])
    return out


def _unrolled(
    loss: StatelessLoss,
    named: dict[str, nn.Parameter],
    keys: dict[str, str],
    trainable: list[str],
    drawn: list[Any],
    steps: int,
    sgd: tuple[float, float, float],
    first_order: bool,
    dims: Mapping[str, int] | None,
) -> dict[str, Tensor]:
    """The unroll on the tape (full mode), or with constant gradients (first order)."""
    lr, momentum, weight_decay = sgd
    scored = set(keys.values())
    # The starting point shares storage with the model's parameters: no copy, never written to.
    start = {n: p.detach().requires_grad_(n in trainable or n in scored) for n, p in named.items()}
    masks = {}
    if not first_order:
        for name, key in keys.items():
            shape = _mask_shape(named[key], None if dims is None else dims[name])
            masks[name] = torch.ones(
                shape, dtype=named[key].dtype, device=named[key].device, requires_grad=True
            )
            start[key] = masks[name] * named[key].detach()
    final = sgd_unroll(
        loss, start, trainable, drawn[:steps], lr=lr, momentum=momentum, weight_decay=weight_decay,
        create_graph=not first_order,
    )  # fmt: skip
    last = evaluate_loss(loss, final, drawn[steps], steps, steps)
    # First order: the closed form theta_0 * grad L(w_M), i.e. d w_M / d w_0 taken as the identity.
    inputs = [final[key] for key in keys.values()] if first_order else [masks[name] for name in keys]
    grads = torch.autograd.grad(last, inputs, allow_unused=True)
    out = {}
    for (name, key), grad in zip(keys.items(), grads, strict=True):
        theta = named[key].detach()
        if first_order:
            grad = theta * (torch.zeros_like(theta) if grad is None else grad)
            out[name] = grad if dims is None else channel_sums(grad, dims[name])
        else:
            shape = _mask_shape(theta, None if dims is None else dims[name])
            out[name] = theta.new_zeros(shape) if grad is None else grad
    return out
