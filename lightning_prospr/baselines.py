"""Pruning-at-initialization baselines with the calling convention of `prospr_scores`.

Every scorer returns `{name: score}` for the weights named by `parameters` (by default the weight
matrices of [`prunable`][lightning_prospr.prunable]), with **higher = more important**, so that
[`global_masks`][lightning_prospr.selection.global_masks] (which keeps the global top-k) selects the
weights each method keeps. With $\\theta$ the weights at initialization and $L$ the loss:

- **SNIP**: $\\lvert\\theta \\odot \\nabla_\\theta L\\rvert$ on one batch
  ([`snip_scores`][lightning_prospr.scores.snip_scores]: ProsPr with no inner step).
- **GraSP**: $\\theta \\odot H g$ with $g = \\nabla_\\theta L_T$, $H = \\nabla^2_\\theta L_T$, $L_T$
  the loss on logits divided by $T$ (the negation of the paper's score, which removes the
  *highest* $-\\theta \\odot H g$).
- **SynFlow**: $\\lvert\\theta \\odot \\partial R / \\partial \\theta\\rvert$, data-free, with
  $R = \\mathbf{1}^\\top f(\\mathbf{1}; \\lvert\\theta\\rvert)$; also iterative
  ([`iterative_synflow_masks`][lightning_prospr.baselines.iterative_synflow_masks]).
- **magnitude**: $\\lvert\\theta\\rvert$.
- **random**: i.i.d. uniform $[0, 1)$ from a private generator.

Like `prospr_scores`, every scorer leaves the model exactly as it was (parameters, buffers,
`requires_grad`, `.grad`, train/eval flags and the global RNG): tensors are substituted through
`torch.func.functional_call`, never written into the model. For a weight that already carries a
`torch.nn.utils.prune` mask, $\\theta$ is its `weight_orig` (the mask still applies in the forward
pass), and the score is keyed by the plain name, as in `prospr_scores`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_prospr.batches import take_batches
from lightning_prospr.cpu_memory import release_freed_memory
from lightning_prospr.errors import (
    UnrollError,
    check_loss,
    loss_context,
    raise_if_compiled_double_backward,
    raise_if_not_twice_differentiable,
)
from lightning_prospr.execution import scoring_execution
from lightning_prospr.linearized import absolute_tensors
from lightning_prospr.model_state import preserved_state
from lightning_prospr.prunable import output_dim, parameter_key, resolve_parameters
from lightning_prospr.rng import forked_torch_rng
from lightning_prospr.selection import check_sparsity, global_masks, pruned_count, select_masks
from lightning_prospr.stateless import LossFn, StatelessLoss

__all__ = [
    "grasp_scores",
    "iterative_synflow_masks",
    "magnitude_scores",
    "random_scores",
    "synflow_scores",
]

_HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------- helpers


def _score_dtype(weight: Tensor) -> torch.dtype:
    """float32 for half-precision weights, the weight's dtype otherwise."""
    return torch.float32 if weight.dtype in _HALF else weight.dtype


def _finish(name: str, raw: Tensor, dtype: torch.dtype, method: str, hint: str) -> Tensor:
    score = raw.detach().to(dtype)
    if not torch.isfinite(score).all():
        raise UnrollError(f"the {method} score of {name!r} is not finite (NaN or inf); {hint}")
    return score


def _evaluate(
    loss: StatelessLoss, params: Mapping[str, Tensor], batch: Any, method: str, index: int
) -> Tensor:
    where = f"while computing {method} scores (batch {index})"
    with loss_context(where):
        return check_loss(loss(params, batch), where, source=loss.source, hint=loss.hint)


def _scored(
    model: nn.Module, parameters: Sequence[str] | None, loss_fn: Any = None, batch: Any = None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """`(named_parameters, {name: key})`; `key` is `name + "_orig"` for a pruned weight. The
    default set is watched in `loss_fn(model, batch)` when a loss is given
    ([`resolve_parameters`][lightning_prospr.prunable.resolve_parameters])."""
    names = resolve_parameters(model, parameters, loss_fn, batch)
    named: dict[str, Tensor] = dict(model.named_parameters())
    return named, {n: parameter_key(named, n) for n in names}


def _grad_or_zeros(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like, strict=True)]


# ------------------------------------------------------------------------------------------ GraSP


@contextmanager
def _divided_output(module: nn.Module, temperature: float, where: str) -> Iterator[list[int]]:
    """Divide `module`'s tensor output by `temperature` while the context is open.

    Yields a one-element list counting the forward calls that were rescaled.
    """
    calls = [0]

    def hook(mod: nn.Module, args: Any, output: Any) -> Tensor:
        if not isinstance(output, Tensor):
            raise TypeError(
                f"GraSP's temperature divides the logits, but {where} returned "
                f"{type(output).__name__}, not a tensor: pass `logits_module` naming the submodule "
                "that outputs the logits, or temperature=1.0 to use none."
            )
        calls[0] += 1
        return output / temperature

    handle = module.register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def _check_grasp_arguments(temperature: Any, num_batches: Any) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"`temperature` must be a number > 0, got {type(temperature).__name__}.")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"`temperature` must be a finite number > 0, got {temperature!r}; GraSP uses 200.")
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"`num_batches` must be an integer >= 1, got {num_batches!r}.")


def grasp_scores(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    parameters: Sequence[str] | None = None,
    temperature: float = 200.0,
    num_batches: int = 1,
    logits_module: str | None = None,
) -> dict[str, Tensor]:
    """GraSP (Wang et al., ICLR 2020), as implemented in the Synaptic-Flow code.

    With $L_T$ the loss computed on the logits divided by the temperature $T$,
    $g = \\nabla_\\theta L_T$ (a constant: no graph) and
    $H g = \\nabla_\\theta (g^\\top \\nabla_\\theta L_T)$ (double backward), GraSP's score is
    $S(-\\theta) = -\\theta \\odot H g$ and GraSP **removes the weights with the highest** $S$. This
    function returns the negation

    $$
    s = \\theta \\odot H g = -S(-\\theta)
    $$

    so that keeping the global top-k of $s$ (what `global_masks` does) removes exactly the weights
    GraSP removes. The scores are signed. $g$, $H$ and $\\theta$ are over the scored weights only
    (the other parameters are constants); Synaptic-Flow's division of all scores by $|\\sum s|$ is a
    positive factor and is left out.

    The temperature assumes that the output of `model` (or of the submodule `logits_module`) is the
    logits fed to the loss: a forward hook, present only during the call, divides that tensor output
    by $T$. `temperature=1.0` registers no hook. If `loss_fn` never calls the hooked module, a
    `ValueError` is raised rather than silently scoring without temperature.

    Args:
        model: any `nn.Module`; left exactly as it was. It runs in train mode (as for SNIP); the
            first and second pass see the same random draws (dropout).
        loss_fn: `loss_fn(model, batch) -> scalar tensor`.
        batches: an iterable of batches on the model's device, cycled if it has fewer than
            `num_batches`.
        parameters: names of the weights to score; `None` is the default set.
        temperature: $T > 0$; the paper and Synaptic-Flow use 200.
        num_batches: the loss is the sum over this many batches, as in Synaptic-Flow's loop over
            its pruning loader.
        logits_module: name (from `model.named_modules()`) of the module whose output is the
            logits; `None` or `""` is `model` itself.

    Returns:
        `{name: signed score}`; float32 for half-precision weights, the weight's dtype otherwise.
    """
    _check_grasp_arguments(temperature, num_batches)
    drawn = take_batches(batches, num_batches)
    named, keys = _scored(model, parameters, loss_fn, drawn[0])
    weights = {n: named[k] for n, k in keys.items()}
    modules = dict(model.named_modules())
    target_name = logits_module or ""
    if target_name not in modules:
        raise ValueError(f"`logits_module` {logits_module!r} is not a submodule of the model.")
    where = f"the module {target_name!r}" if target_name else f"the model ({type(model).__name__})"
    device = next(iter(weights.values())).device
    with preserved_state(model, device), torch.enable_grad():
        model.train()
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        loss = StatelessLoss(model, loss_fn, buffers, second_order=True)
        leaves = set(keys.values())
        params = {n: p.detach().requires_grad_(n in leaves) for n, p in named.items()}
        scored = [params[k] for k in keys.values()]
        hooked = (
            _divided_output(modules[target_name], float(temperature), where) if temperature != 1 else None
        )
        with hooked if hooked is not None else nullcontext([0]) as calls:
            g = _summed_gradient(loss, params, scored, drawn, device)
            if temperature != 1 and calls[0] == 0:
                raise ValueError(
                    f"GraSP's temperature divides the output of {where}, but loss_fn never called it; "
                    "pass `logits_module` naming the submodule that outputs the logits, or "
                    "temperature=1.0 to use none."
                )
            hg = _hessian_gradient(loss, params, scored, drawn, g)
        del loss, buffers, params, scored
    if device.type == "cpu":
        release_freed_memory()  # the second-order graphs, which glibc's heap would otherwise keep
    hint = "check the model and data for NaN/inf, or use a larger `temperature`."
    return {
        n: _finish(n, w.detach() * h, _score_dtype(w), "GraSP", hint)
        for (n, w), h in zip(weights.items(), hg, strict=True)
    }


def _summed_gradient(
    loss: StatelessLoss,
    params: dict[str, Tensor],
    scored: list[Tensor],
    drawn: list[Any],
    device: torch.device,
) -> list[Tensor]:
    """GraSP's first pass: $g = \\sum_b \\nabla L_b$, a constant. The RNG is forked so that the
    second pass replays the same random draws: both passes differentiate the same function."""
    with forked_torch_rng(device):
        g = [torch.zeros_like(t) for t in scored]
        for i, batch in enumerate(drawn):
            value = _evaluate(loss, params, batch, "GraSP", i)
            grads = _grad_or_zeros(torch.autograd.grad(value, scored, allow_unused=True), scored)
            g = [a + b.detach() for a, b in zip(g, grads, strict=True)]
            del value, grads
    return g


def _hessian_gradient(
    loss: StatelessLoss, params: dict[str, Tensor], scored: list[Tensor], drawn: list[Any], g: list[Tensor]
) -> list[Tensor]:
    """GraSP's second pass: $H g = \\sum_b \\nabla_\\theta (g \\cdot \\nabla L_b)$."""
    hg = [torch.zeros_like(t) for t in scored]
    for i, batch in enumerate(drawn):
        value = _evaluate(loss, params, batch, "GraSP", i)
        try:
            taped = torch.autograd.grad(value, scored, create_graph=True, allow_unused=True)
            z = sum(
                ((a * b).sum() for a, b in zip(g, taped, strict=True) if b is not None),
                start=value.new_zeros(()),
            )
            if z.requires_grad:
                second = _grad_or_zeros(torch.autograd.grad(z, scored, allow_unused=True), scored)
                hg = [a + b for a, b in zip(hg, second, strict=True)]
        except RuntimeError as err:
            raise_if_compiled_double_backward(err, "GraSP's Hessian-gradient product")
            raise_if_not_twice_differentiable(err, "GraSP's Hessian-gradient product")
            raise
        del value, taped, z
    return hg


# ---------------------------------------------------------------------------------------- SynFlow


def _ones_input(
    input_shape: Sequence[int] | None, example_input: Tensor | None, device: torch.device, dtype: torch.dtype
) -> Tensor:
    if (input_shape is None) == (example_input is None):
        raise ValueError(
            "SynFlow is data-free but needs the input's shape: pass exactly one of `input_shape` "
            "(without the batch dimension, e.g. (3, 32, 32)) or `example_input` (a batch)."
        )
    if example_input is not None:
        if not isinstance(example_input, Tensor) or example_input.dim() < 1:
            raise TypeError("`example_input` must be a batched tensor (its first dimension is the batch).")
        shape = (1, *example_input.shape[1:])
        kind = dtype if example_input.is_floating_point() else example_input.dtype
        return torch.ones(shape, device=device, dtype=kind)
    assert input_shape is not None
    if isinstance(input_shape, int):
        input_shape = (input_shape,)
    shape = (1, *(int(d) for d in input_shape))
    if any(d < 1 for d in shape):
        raise ValueError(f"`input_shape` must hold positive sizes, got {tuple(input_shape)!r}.")
    return torch.ones(shape, device=device, dtype=dtype)


def _output_sum(output: Any) -> Tensor:
    """`R`: the sum of every floating-point tensor in the model's output (tensor, tuple, dict)."""
    if isinstance(output, Tensor):
        return output.sum()
    if isinstance(output, Mapping):
        parts = [_output_sum(v) for v in output.values()]
    elif isinstance(output, (tuple, list)):
        parts = [_output_sum(v) for v in output]
    else:
        raise TypeError(f"SynFlow cannot sum a model output of type {type(output).__name__}.")
    parts = [p for p in parts if p.is_floating_point()]
    if not parts:
        raise TypeError("SynFlow found no floating-point tensor in the model's output to sum.")
    return torch.stack([p.to(parts[0].dtype) for p in parts]).sum()


class _SynFlow:
    """Set up once (absolute, cast tensors; the all-ones input), then score under any masks."""

    def __init__(
        self,
        model: nn.Module,
        named: Mapping[str, Tensor],
        keys: Mapping[str, str],
        input_shape: Sequence[int] | None,
        example_input: Tensor | None,
        dtype: torch.dtype,
    ) -> None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"`dtype` must be a floating-point torch.dtype, got {dtype!r}.")
        self.model = model
        self.keys = dict(keys)
        self.dtype = dtype
        device = named[next(iter(keys.values()))].device
        self.input = _ones_input(input_shape, example_input, device, dtype)
        self.fixed = absolute_tensors(model, set(keys.values()), dtype)
        self.absolute = {n: named[k].detach().abs().to(dtype) for n, k in keys.items()}

    def scores(self, masks: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """`{name: |q * dR/dq|}` in `self.dtype` with `q = |theta| * mask`."""
        leaves = {
            n: (a if masks is None else a * masks[n].to(a.dtype)).detach().requires_grad_(True)
            for n, a in self.absolute.items()
        }
        tensors = {**self.fixed, **{self.keys[n]: t for n, t in leaves.items()}}
        with scoring_execution(second_order=False):
            output = functional_call(self.model, tensors, (self.input,), tie_weights=True, strict=False)
        total = _output_sum(output)
        if not total.requires_grad:
            raise UnrollError("SynFlow: the model's output does not depend on the scored weights.")
        grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
        hint = "R overflows: compute in float64 (the default `dtype`), or check the weights for NaN/inf."
        return {
            n: _finish(n, (leaves[n].detach() * g).abs() if g is not None else torch.zeros_like(leaves[n]),
                       self.dtype, "SynFlow", hint)
            for n, g in zip(leaves, grads, strict=True)
        }  # fmt: skip


def synflow_scores(
    model: nn.Module,
    *,
    parameters: Sequence[str] | None = None,
    input_shape: Sequence[int] | None = None,
    example_input: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> dict[str, Tensor]:
    """SynFlow (Tanaka et al., NeurIPS 2020), one shot and data-free: synaptic saliency of $R$.

    Every parameter (and, as in the reference code's `linearize`, every floating-point buffer) is
    replaced by its absolute value, the network is fed an all-ones input with batch size 1, and

    $$
    R = \\mathbf{1}^\\top f(\\mathbf{1}; |\\theta|), \\qquad
    s = \\left| \\theta \\odot \\frac{\\partial R}{\\partial |\\theta|} \\right|
    $$

    The model runs in eval mode (BatchNorm uses its running statistics, dropout is off). The
    substituted tensors are cast to `dtype`; float64, the default, keeps $R$ (a product of weight
    norms over the depth) from overflowing. The model itself is not modified. SynFlow is the one
    method that calls the model's `forward` (on that input).

    Args:
        model: any `nn.Module`; left exactly as it was.
        parameters: names of the weights to score; `None` is the default set by module type
            ([`default_parameter_names`][lightning_prospr.prunable.default_parameter_names]).
        input_shape: the shape of one input *without* the batch dimension, e.g. `(3, 32, 32)`.
        example_input: alternatively a batch whose `shape[1:]` gives the input shape (its values
            are not used; an integer tensor gives an all-ones integer input).
        dtype: the floating-point type of the computation.

    Returns:
        `{name: score >= 0}` on each weight's device, **in** `dtype` (float64 by default) and not in
        the weight's dtype: SynFlow scores of deep networks routinely exceed the float32 range.
        `global_masks` accepts them as they are.
    """
    named, keys = _scored(model, parameters)
    with preserved_state(model, named[next(iter(keys.values()))].device), torch.enable_grad():
        model.eval()
        return _SynFlow(model, named, keys, input_shape, example_input, dtype).scores()


def iterative_synflow_masks(
    model: nn.Module,
    sparsity: float,
    *,
    rounds: int = 100,
    parameters: Sequence[str] | None = None,
    input_shape: Sequence[int] | None = None,
    example_input: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    allocation: str = "global",
    spread: bool = False,
) -> dict[str, Tensor]:
    """Iterative SynFlow: `rounds` rounds of scoring and pruning on an exponential schedule.

    Round $r = 1..R$ keeps the fraction $d_r = (1 - \\text{sparsity})^{r/R}$ of the scored weights:
    it rescores with `synflow_scores`'s formula, the current masks applied multiplicatively to
    $|\\theta|$ (masked weights are 0), gives the already pruned weights the score $-\\infty$ so the
    masks nest (a weight once pruned stays pruned), and selects with `global_masks` at sparsity
    $1 - d_r$. The last round uses `sparsity` itself, so exactly `round(sparsity * N)` weights are
    removed.

    Args:
        model: any `nn.Module`; left exactly as it was.
        sparsity: fraction of the scored weights to remove, in [0, 1).
        rounds: number of rounds $R \\ge 1$ (100 in the SynFlow paper); 1 is one-shot.
        parameters: as for `synflow_scores`.
        input_shape: as for `synflow_scores`.
        example_input: as for `synflow_scores`.
        dtype: as for `synflow_scores`.
        allocation: the layer densities of every round
            ([`select_masks`][lightning_prospr.selection.select_masks]): `"global"` (the paper's)
            or a per-layer budget, `"uniform"`, `"erk"` or `"balanced"`.
        spread: spread each layer's budget evenly over its output units, every round
            ([`spread_ranks`][lightning_prospr.selection.spread_ranks]); needs a per-layer allocation.

    Returns:
        `{name: bool tensor}`, `True` where the weight is kept, on each weight's device.
    """
    check_sparsity(sparsity)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"`rounds` must be an integer >= 1, got {rounds!r}; the paper uses 100.")
    named, keys = _scored(model, parameters)
    weights = {n: named[k] for n, k in keys.items()}
    names = list(weights)
    total = sum(w.numel() for w in weights.values())
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    spread_dims = {n: output_dim(model, n) for n in names} if spread else None
    with preserved_state(model, weights[names[0]].device), torch.enable_grad():
        model.eval()
        synflow = _SynFlow(model, named, keys, input_shape, example_input, dtype)
        for r in range(1, rounds + 1):
            target = sparsity if r == rounds else 1.0 - (1.0 - sparsity) ** (r / rounds)
            scores = synflow.scores(masks)
            for n in names:
                scores[n] = scores[n].masked_fill(~masks[n], -math.inf)
            if allocation == "global" and not spread:
                new = global_masks(scores, target)
            else:
                new = select_masks(
                    scores, target, allocation=allocation, within=masks, spread_dims=spread_dims
                )
            masks = {n: new[n] & masks[n] for n in names}
    kept = sum(int(m.sum()) for m in masks.values())
    if kept != total - pruned_count(sparsity, total):  # pragma: no cover - guarded by construction
        raise RuntimeError(f"iterative SynFlow kept {kept} of {total} weights; expected a nested schedule.")
    return {n: masks[n].to(w.device) for n, w in weights.items()}


# ----------------------------------------------------------------------------- magnitude / random


def magnitude_scores(model: nn.Module, *, parameters: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Magnitude pruning at initialization: $s = |\\theta|$.

    Returns:
        `{name: |weight|}`, a copy; float32 for half-precision weights, the weight's dtype otherwise.
    """
    named, keys = _scored(model, parameters)
    return {
        n: _finish(n, named[k].detach().abs().to(_score_dtype(named[k])), _score_dtype(named[k]),
                   "magnitude", "the weight itself holds NaN/inf.")
        for n, k in keys.items()
    }  # fmt: skip


def random_scores(
    model: nn.Module, *, parameters: Sequence[str] | None = None, seed: int = 0
) -> dict[str, Tensor]:
    """Random pruning: i.i.d. $s \\sim U[0, 1)$, so the global top-k is a uniform random subset.

    The numbers come from a private `torch.Generator` seeded with `seed` (one per device, drawn in
    the order of `parameters`): the global RNG is neither read nor advanced, and the same seed gives
    the same scores on the same device.

    Returns:
        `{name: score}` on each weight's device; float32 for half-precision weights, the weight's
        dtype otherwise.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an int, got {type(seed).__name__}.")
    named, keys = _scored(model, parameters)
    generators: dict[torch.device, torch.Generator] = {}
    out = {}
    for n, k in keys.items():
        weight = named[k]
        gen = generators.get(weight.device)
        if gen is None:
            gen = generators[weight.device] = torch.Generator(device=weight.device).manual_seed(seed)
        out[n] = torch.rand(weight.shape, generator=gen, device=weight.device, dtype=_score_dtype(weight))
    return out
