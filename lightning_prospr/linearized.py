"""The linearized network: the user's own loss pass on a positive, non-saturating stand-in.

The layer-collapse guard asks which weights lie on a path from the input to the loss. In a network
whose every weight and activation is non-negative, signal flows exactly along the paths of kept
weights, so $\\partial R / \\partial q \\ne 0$ marks them (SynFlow's observation). The loss
pass is the user's (`loss_fn(model, batch)`, e.g. `training_step`), run through
`torch.func.functional_call()`, so the model needs no `forward`. Inside it:

- scored weights $\\theta$ become $|\\theta| \\odot m$;
- other parameters and buffers become their absolute value, and exact zeros (a zero-initialised
  norm scale, as timm's ResNets have) become 1;
- biases, BatchNorm shifts and running means become 0 (a constant would light up units no input
  reaches), running variances 1;
- floating-point batch tensors become ones (token ids, labels and masks of integers are kept);
- saturating activations (sigmoid, hardsigmoid, tanh, hardtanh, relu6, softsign) become the
  identity: a positive network saturates them, and a flat activation would cut every path through
  it (MobileNet's squeeze-excitation gates, ReLU6);
- softmax, log-softmax and attention (`scaled_dot_product_attention`) are tempered: the scores are
  divided by their largest magnitude, so that no attention weight underflows to 0;
- layer, group and instance norm keep their scaling only (no centering), which keeps the signal
  positive;
- casts to float32 or float16 do nothing: the pass runs in float64 throughout;

and the model runs in eval mode. $R$ is the sum of the predictions handed to loss functions
(`F.cross_entropy`, `F.mse_loss`, ..., and the loss modules that call them), or the loss itself
when the pass calls none of those. Parameters that add an input-independent constant and are not
named as biases (positional tables, class tokens) count as inputs: paths that start there are
taken as paths.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_prospr.model_state import preserved_state
from lightning_prospr.prunable import is_hf_conv1d, parameter_key
from lightning_prospr.stateless import LossFn, StatelessLoss

__all__ = ["Paths", "path_gradients"]


def _is_shift(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf.startswith("bias") or leaf in ("running_mean", "beta")


def _positive(t: Tensor) -> Tensor:
    """`|t|` in float64, with exact zeros (zero-initialised scales) replaced by 1."""
    a = t.detach().abs().double()
    return torch.where(a == 0, torch.ones_like(a), a)


@torch.no_grad()
def absolute_tensors(model: nn.Module, scored: set[str], dtype: torch.dtype) -> dict[str, Tensor]:
    """SynFlow's linearized network (the reference code's `linearize`): every parameter not in
    `scored` and every floating-point buffer by its absolute value, cast to `dtype`."""
    fixed = {n: p.detach().abs().to(dtype) for n, p in model.named_parameters() if n not in scored}
    for n, b in model.named_buffers():
        fixed[n] = b.detach().abs().to(dtype) if b.is_floating_point() else b.clone()
    return fixed


@torch.no_grad()
def linearized_tensors(model: nn.Module, scored: set[str]) -> dict[str, Tensor]:
    """Every parameter not in `scored` and every buffer, as the guard's linearized network has them
    (the table above; SynFlow's own variant is
    [`absolute_tensors`][lightning_prospr.linearized.absolute_tensors])."""
    fixed: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        if name not in scored:
            fixed[name] = torch.zeros_like(p, dtype=torch.float64) if _is_shift(name) else _positive(p)
    for name, b in model.named_buffers():
        if not b.is_floating_point():
            fixed[name] = b.clone()
        elif name.rsplit(".", 1)[-1] == "running_var":
            fixed[name] = torch.ones_like(b, dtype=torch.float64)
        elif _is_shift(name):
            fixed[name] = torch.zeros_like(b, dtype=torch.float64)
        elif name.endswith("_mask"):  # a torch.nn.utils.prune mask: kept as it is
            fixed[name] = b.double()
        else:
            fixed[name] = _positive(b)
    return fixed


def positive_batch(batch: Any, one_sample: bool) -> Any:
    """`batch` with every floating-point tensor replaced by float64 ones (integer inputs such as
    token ids and labels kept), cut to its first sample when `one_sample`."""

    def convert(value: Any) -> Any:
        if isinstance(value, Tensor):
            if one_sample and value.dim() >= 1:
                value = value[:1]
            if value.is_floating_point():
                return torch.ones_like(value, dtype=torch.float64)
            return value
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
            return type(value)(*(convert(v) for v in value))
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.replace(
                value,
                **{f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init},
            )
        if isinstance(value, (list, tuple)):
            return type(value)(convert(v) for v in value)
        if isinstance(value, Mapping):
            return type(value)((k, convert(v)) for k, v in value.items())  # type: ignore[call-arg]
        return value

    return convert(batch)


def batch_sizes(batch: Any) -> set[int]:
    """The first dimensions of the tensors in `batch`."""
    if isinstance(batch, Tensor):
        return {batch.shape[0]} if batch.dim() >= 1 else set()
    if isinstance(batch, (list, tuple)):
        return set().union(*(batch_sizes(v) for v in batch)) if batch else set()
    if isinstance(batch, Mapping):
        return set().union(*(batch_sizes(v) for v in batch.values())) if batch else set()
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return batch_sizes([getattr(batch, f.name) for f in dataclasses.fields(batch)])
    return set()


# ------------------------------------------------------------------------------- the stand-ins


def _identity(input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return input


def _tempered(scores: Tensor, dim: int) -> Tensor:
    """`scores` divided by their largest finite magnitude along `dim` (at least 1, detached)."""
    finite = torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores))
    return scores / finite.abs().amax(dim=dim, keepdim=True).clamp_min(1.0).detach()


def _softmax_dim(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    return -1 if dim is None else int(dim)


def _softmax(input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    dim = _softmax_dim((input, *args), kwargs)
    return torch.softmax(_tempered(input, dim), dim)


def _log_softmax(input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    dim = _softmax_dim((input, *args), kwargs)
    return torch.log_softmax(_tempered(input, dim), dim)


def _attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """`F.scaled_dot_product_attention` without dropout and with a tempered softmax."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    scores = query @ key.transpose(-2, -1) * (scale if scale is not None else 1 / math.sqrt(query.shape[-1]))
    scores = _tempered(scores, -1)
    if is_causal:
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, -math.inf)
    if attn_mask is not None:
        scores = (
            scores.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else scores + attn_mask
        )
    return torch.softmax(scores, -1) @ value


def _rms(x: Tensor, dims: tuple[int, ...], eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)


def _layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    out = _rms(input, tuple(range(-len(normalized_shape), 0)), eps)
    return out * weight if weight is not None else out


def _group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    grouped = input.reshape(input.shape[0], num_groups, -1)
    out = _rms(grouped, (-1,), eps).reshape(input.shape)
    if weight is not None:
        out = out * weight.reshape(1, -1, *([1] * (input.dim() - 2)))
    return out


def _instance_norm(input: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    weight = args[2] if len(args) > 2 else kwargs.get("weight")
    eps = args[6] if len(args) > 6 else kwargs.get("eps", 1e-5)
    out = _rms(input, tuple(range(2, input.dim())), eps)
    if weight is not None:
        out = out * weight.reshape(1, -1, *([1] * (input.dim() - 2)))
    return out


#: Operators the linearized pass replaces, and their positive, non-saturating stand-ins.
STAND_INS: dict[Callable[..., Any], Callable[..., Any]] = {
    **dict.fromkeys(
        (
            torch.sigmoid,
            torch.sigmoid_,
            Tensor.sigmoid,
            Tensor.sigmoid_,
            F.sigmoid,
            F.hardsigmoid,
            torch.tanh,
            torch.tanh_,
            Tensor.tanh,
            Tensor.tanh_,
            F.tanh,
            F.hardtanh,
            F.relu6,
            F.softsign,
        ),
        _identity,
    ),
    **dict.fromkeys((F.softmax, torch.softmax, Tensor.softmax), _softmax),
    **dict.fromkeys((F.log_softmax, torch.log_softmax, Tensor.log_softmax), _log_softmax),
    F.scaled_dot_product_attention: _attention,
    F.layer_norm: _layer_norm,
    F.group_norm: _group_norm,
    F.instance_norm: _instance_norm,
}

#: Loss functions whose first argument is the prediction: the linearized pass sums it instead.
PREDICTION_LOSSES = frozenset(
    {
        F.cross_entropy,
        F.binary_cross_entropy_with_logits,
        F.binary_cross_entropy,
        F.mse_loss,
        F.l1_loss,
        F.smooth_l1_loss,
        F.huber_loss,
        F.soft_margin_loss,
        F.multilabel_soft_margin_loss,
        F.poisson_nll_loss,
        F.gaussian_nll_loss,
    }
)
#: Casts that would take the float64 linearized pass to another floating-point type.
_CASTS = frozenset({Tensor.float, Tensor.half, Tensor.bfloat16, Tensor.to, Tensor.type, Tensor.type_as})


def _to_float64(value: Any) -> Any:
    if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != torch.float64:
        return value.double()
    if isinstance(value, (list, tuple)) and any(isinstance(v, Tensor) for v in value):
        return type(value)(_to_float64(v) for v in value)
    return value


def _mixes_float64(args: tuple[Any, ...]) -> bool:
    """Whether a float64 tensor meets a lower-precision floating-point one among `args`."""
    kinds = {a.dtype for a in args if isinstance(a, Tensor) and a.is_floating_point() and a.dim() > 0}
    return torch.float64 in kinds and len(kinds) > 1


class _LinearizedOps(TorchFunctionMode):
    """Inside the linearized loss pass: the stand-ins of `STAND_INS`, float64 throughout
    (through the casts of the user's code, `x.float()` or `.to(self.dtype)`, and where a
    float64 tensor meets a float32 one that the batch brought in a container `positive_batch()`
    does not know), and the predictions handed to loss functions collected in `found`."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[Tensor] = []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in PREDICTION_LOSSES:
            prediction = args[0] if args else kwargs.get("input")
            if isinstance(prediction, Tensor) and prediction.is_floating_point():
                self.found.append(prediction)
        if _mixes_float64(args):
            args = tuple(_to_float64(a) for a in args)
        stand_in = STAND_INS.get(func)
        if stand_in is not None:
            kwargs.pop("dtype", None)  # a softmax's float32 request: stay in float64
            return stand_in(*args, **kwargs)
        out = func(*args, **kwargs)
        if (
            func in _CASTS
            and isinstance(out, Tensor)
            and out.is_floating_point()
            and out.dtype != torch.float64
            and args
            and isinstance(args[0], Tensor)
            and args[0].dtype == torch.float64
        ):
            return args[0].to(out.device)  # the float64 values, not rounded (or underflowed) ones
        return out


# --------------------------------------------------------------------------------- the paths


@dataclass
class Paths:
    """Signal flow in the linearized network under some masks.

    Attributes:
        grads: $\\partial R / \\partial q$ per masked tensor (non-zero exactly where a weight,
            kept or not, would lie on an input-to-output path).
        upstream: per masked tensor, a bool tensor broadcastable to the weight: `True` where the
            weight's input feature carries signal from the input (Linear, Conv and ConvTranspose
            layers and Hugging Face's `Conv1D` only).
        total: $R$.
    """

    grads: dict[str, Tensor]
    upstream: dict[str, Tensor]
    total: float

    def on_path(self, name: str, mask: Tensor) -> int:
        """Kept weights of `name` that lie on an input-to-output path."""
        return int(((self.grads[name] != 0) & mask).sum())


def _input_features(module: nn.Module, inputs: tuple[Any, ...], weight: Tensor) -> Tensor | None:
    """Which input features of `module` (the layer owning `weight`) carry signal, shaped to
    broadcast against the weight; `None` for a layer this cannot tell."""
    x = inputs[0] if inputs and isinstance(inputs[0], Tensor) else None
    if x is None or x.dim() < 2:
        return None
    convolutions = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    if isinstance(module, convolutions + transposed) and module.groups == 1:
        alive = x.abs().sum(dim=[d for d in range(x.dim()) if d != 1]) > 0
        if isinstance(module, transposed):  # weight (in, out, *kernel)
            return alive.reshape(-1, *([1] * (weight.dim() - 1)))
        return alive.reshape(1, -1, *([1] * (weight.dim() - 2)))
    if isinstance(module, nn.Linear):
        return (x.abs().reshape(-1, x.shape[-1]).sum(0) > 0).reshape(1, -1)
    if is_hf_conv1d(module) and weight.dim() == 2:  # transformers': weight (in, out)
        return (x.abs().reshape(-1, x.shape[-1]).sum(0) > 0).reshape(-1, 1)
    return None


def path_gradients(
    model: nn.Module, masks: Mapping[str, Tensor], loss_fn: LossFn, batch: Any, one_sample: bool = True
) -> Paths:
    """Where signal flows from the batch to the loss in the linearized network with `masks`.

    See the module docstring for the network. The batch is cut to its first sample when
    `one_sample` and all of its tensors share their first dimension. The model is left as it was
    (tensors are substituted, never written; train/eval flags and RNG restored).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
        >>> loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])
        >>> batch = (torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
        >>> masks = {"0.weight": torch.tensor([[True, False, False], [False, False, False]]),
        ...          "2.weight": torch.tensor([[False, True], [True, False]])}
        >>> paths = path_gradients(net, masks, loss_fn, batch)
        >>> paths.on_path("0.weight", masks["0.weight"]), paths.on_path("2.weight", masks["2.weight"])
        (1, 1)
    """
    named = dict(model.named_parameters())
    keys = {n: parameter_key(named, n) for n in masks}
    fixed = linearized_tensors(model, set(keys.values()))
    leaves = {
        n: (named[k].detach().abs().double() * masks[n].to(torch.float64)).requires_grad_(True)
        for n, k in keys.items()
    }
    upstream: dict[str, Tensor] = {}
    handles = []
    for name in masks:
        module = model.get_submodule(name.rpartition(".")[0])

        def record(mod: nn.Module, inputs: tuple[Any, ...], name: str = name) -> None:
            alive = _input_features(mod, inputs, masks[name])
            if alive is not None:
                upstream[name] = alive.detach()

        handles.append(module.register_forward_pre_hook(record))
    buffers = {n: t for n, t in fixed.items() if n not in named}
    params = {n: t for n, t in fixed.items() if n in named}
    params.update({keys[n]: t for n, t in leaves.items()})
    probe = StatelessLoss(model, loss_fn, buffers)
    device = next(iter(leaves.values())).device
    sizes = batch_sizes(batch)
    batch = positive_batch(batch, one_sample and len(sizes) == 1 and next(iter(sizes)) > 1)
    try:
        with preserved_state(model, device), torch.enable_grad():
            model.eval()
            ops = _LinearizedOps()
            with ops:
                loss = probe(params, batch)
            if isinstance(loss, Mapping):  # Lightning's {"loss": ...}
                loss = loss.get("loss")
            if ops.found:
                total = torch.stack([p.sum().to(torch.float64) for p in ops.found]).sum()
            elif isinstance(loss, Tensor) and loss.numel() == 1:
                total = loss.reshape(()).to(torch.float64)
            else:
                total = torch.zeros((), dtype=torch.float64)
            grads: Sequence[Tensor | None] = [None] * len(leaves)
            if total.requires_grad:
                grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    return Paths(
        {
            n: (g if g is not None else torch.zeros_like(leaves[n])).detach().contiguous()
            for n, g in zip(leaves, grads, strict=True)
        },
        upstream,
        float(total.detach()),
    )


class Probe:
    """`path_gradients()` on one batch: on one sample where the loss runs on it, else on all."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batch: Any) -> None:
        self.model, self.loss_fn, self.batch = model, loss_fn, batch
        self.one_sample = True

    def dense(self, masks: Mapping[str, Tensor]) -> Paths:
        """The first call: tries one sample, then the whole batch, and keeps what runs."""
        try:
            return path_gradients(self.model, masks, self.loss_fn, self.batch, one_sample=True)
        except Exception:  # the user's loss on a cut batch of ones: anything can happen
            self.one_sample = False
            return path_gradients(self.model, masks, self.loss_fn, self.batch, one_sample=False)

    def __call__(self, masks: Mapping[str, Tensor]) -> Paths:
        return path_gradients(self.model, masks, self.loss_fn, self.batch, one_sample=self.one_sample)
