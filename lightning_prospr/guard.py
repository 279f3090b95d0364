"""The layer-collapse guard: masks that keep every layer alive and the network connected.

At extreme sparsity a global top-k can remove every weight of a layer (layer collapse), after which
the network's output no longer depends on its input and it cannot train. The guard repairs a mask
set in place of plain top-k, keeping the number of removed weights exactly the same:

1. **Floor**: every scored tensor keeps at least ``min(layer_floor, numel)`` weights (its best-scored).
2. **Connectivity** (given the model, its loss and a batch): a weight is *on a path* when the
   linearized network (every scored weight replaced by :math:`|\\theta| \\odot m`, biases, BatchNorm
   shifts and running means set to 0, running variances to 1, the batch's floating-point tensors
   all ones), run through the user's own loss, has :math:`\\partial R / \\partial q \\ne 0` there,
   with :math:`R` the sum of the predictions handed to the loss (:func:`path_gradients`): a
   positive network carries signal from input to output exactly along paths of kept weights. Every
   tensor that is on a path in the dense network must keep at least one weight on a path. A
   tensor with none gets its best-scored pruned weight whose addition would complete a path. When
   no single weight can (the signal stops before the tensor), the signal is extended where it
   stops: the first such tensor none of whose kept weights reads a live input gets its best-scored
   weight that does, and so on, one tensor further each time, until a path exists.

The additions come first, all of them; then they are paid for, one removed kept weight each: first
kept weights that lie on no path once the repairs are in place (removing them cannot change any
path), lowest score first, never taking a tensor below its floor; then the lowest-scored weights of
tensors that keep more than their floor, skipping any whose removal would take a tensor off the
paths it is on. Weights the guard added are never the ones removed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_prospr.scores import parameter_key, preserved_state
from lightning_prospr.unroll import LossFn, StatelessLoss

__all__ = ["GuardReport", "Paths", "guard_masks", "path_gradients"]


@dataclass
class GuardReport:
    """What the guard changed (weights ``added`` and ``removed`` per tensor) and what it checked."""

    added: dict[str, int] = field(default_factory=dict)
    removed: dict[str, int] = field(default_factory=dict)
    connectivity_checked: bool = False
    connected: bool = True
    #: Why the connectivity check did not run, when it could not (``None`` when it ran or was off).
    skipped: str | None = None
    #: Tensors exempt from the connectivity check: no path reaches them even in the dense network.
    unchecked: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)

    def summary(self) -> str:
        parts = [f"{name} +{count}" for name, count in self.added.items()]
        parts += [f"{name} -{count}" for name, count in self.removed.items()]
        return ", ".join(parts)


def _is_shift(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf.startswith("bias") or leaf in ("running_mean", "beta")


@torch.no_grad()
def _linearized(model: nn.Module, scored: set[str]) -> dict[str, Tensor]:
    fixed: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        if name not in scored:
            fixed[name] = torch.zeros_like(p, dtype=torch.float64) if _is_shift(name) else p.abs().double()
    for name, b in model.named_buffers():
        if not b.is_floating_point():
            fixed[name] = b.clone()
        elif name.rsplit(".", 1)[-1] == "running_var":
            fixed[name] = torch.ones_like(b, dtype=torch.float64)
        elif _is_shift(name) or name.endswith("_mask"):
            fixed[name] = torch.zeros_like(b, dtype=torch.float64) if _is_shift(name) else b.double()
        else:
            fixed[name] = b.abs().double()
    return fixed


def _positive_batch(batch: Any, one_sample: bool) -> Any:
    """``batch`` with every floating-point tensor replaced by float64 ones (integer inputs such as
    token ids and labels kept), cut to its first sample when ``one_sample``."""

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


def _batch_sizes(batch: Any) -> set[int]:
    if isinstance(batch, Tensor):
        return {batch.shape[0]} if batch.dim() >= 1 else set()
    if isinstance(batch, (list, tuple)):
        return set().union(*(_batch_sizes(v) for v in batch)) if batch else set()
    if isinstance(batch, Mapping):
        return set().union(*(_batch_sizes(v) for v in batch.values())) if batch else set()
    return set()


#: Loss functions whose first argument is the prediction: the linearized pass sums it instead.
_PREDICTION_LOSSES = frozenset(
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
    """Whether a float64 tensor meets a lower-precision floating-point one among ``args``."""
    kinds = {a.dtype for a in args if isinstance(a, Tensor) and a.is_floating_point() and a.dim() > 0}
    return torch.float64 in kinds and len(kinds) > 1


class _Predictions(TorchFunctionMode):
    """Inside the linearized loss pass: collect the predictions handed to loss functions, and keep
    the pass in float64: through the casts of the user's code (``x.float()``, ``.to(self.dtype)``),
    and where a float64 tensor meets a float32 one the batch brought in a container this module
    does not know (its values are then the batch's own, not ones)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[Tensor] = []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in _PREDICTION_LOSSES:
            prediction = args[0] if args else kwargs.get("input")
            if isinstance(prediction, Tensor) and prediction.is_floating_point():
                self.found.append(prediction)
        if _mixes_float64(args):
            args = tuple(_to_float64(a) for a in args)
        out = func(*args, **kwargs)
        if (
            func in _CASTS
            and isinstance(out, Tensor)
            and out.is_floating_point()
            and args
            and isinstance(args[0], Tensor)
            and args[0].dtype == torch.float64
        ):
            out = out.double()
        return out


@dataclass
class Paths:
    """Signal flow in the linearized network under some masks.

    Attributes:
        grads: :math:`\\partial R / \\partial q` per masked tensor (non-zero exactly where a weight,
            kept or not, would lie on an input-to-output path).
        upstream: per masked tensor, a bool tensor broadcastable to the weight: ``True`` where the
            weight's input feature carries signal from the input (Linear, Conv and ConvTranspose
            layers and Hugging Face's ``Conv1D`` only).
        total: :math:`R`.
    """

    grads: dict[str, Tensor]
    upstream: dict[str, Tensor]
    total: float

    def on_path(self, name: str, mask: Tensor) -> int:
        """Kept weights of ``name`` that lie on an input-to-output path."""
        return int(((self.grads[name] != 0) & mask).sum())


def _input_features(module: nn.Module, inputs: tuple[Any, ...], weight: Tensor) -> Tensor | None:
    """Which input features of ``module`` (the layer owning ``weight``) carry signal, shaped to
    broadcast against the weight; ``None`` for a layer this cannot tell."""
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
    if type(module).__name__ == "Conv1D" and weight.dim() == 2:  # transformers': weight (in, out)
        return (x.abs().reshape(-1, x.shape[-1]).sum(0) > 0).reshape(-1, 1)
    return None


def path_gradients(
    model: nn.Module, masks: Mapping[str, Tensor], loss_fn: LossFn, batch: Any, one_sample: bool = True
) -> Paths:
    """Where signal flows from the batch to the loss in the linearized network with ``masks``.

    The loss pass is the user's own, ``loss_fn(model, batch)``, with the model's tensors replaced
    through :func:`torch.func.functional_call` (the model never needs a ``forward``): every scored
    weight by :math:`|\\theta| \\odot m`, every other parameter and buffer by its absolute value,
    biases, BatchNorm shifts and running means by 0 and running variances by 1, in float64 and in
    eval mode; every floating-point tensor of the batch becomes ones (token ids and labels are
    kept), cut to the first sample when ``one_sample`` and all of the batch's tensors share their
    first dimension.
    :math:`R` is the sum of the predictions that the pass hands to loss functions
    (``F.cross_entropy``, ``F.mse_loss``, ... and the modules that call them), or the loss itself
    when it calls none of those. A positive network carries signal along exactly the paths of kept
    weights, so :math:`\\partial R / \\partial q \\ne 0` marks the weights on a path.

    The model is left as it was (tensors are substituted, never written; modes and RNG restored).
    """
    named = dict(model.named_parameters())
    keys = {n: parameter_key(named, n) for n in masks}
    fixed = _linearized(model, set(keys.values()))
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
    sizes = _batch_sizes(batch)
    batch = _positive_batch(batch, one_sample and len(sizes) == 1 and next(iter(sizes)) > 1)
    try:
        with preserved_state(model, device), torch.enable_grad():
            model.eval()
            predictions = _Predictions()
            with predictions:
                loss = probe(params, batch)
            if predictions.found:
                total = torch.stack([p.sum().to(torch.float64) for p in predictions.found]).sum()
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
            n: (g if g is not None else torch.zeros_like(leaves[n])).detach()
            for n, g in zip(leaves, grads, strict=True)
        },
        upstream,
        float(total.detach()),
    )


class _Probe:
    """:func:`path_gradients` on one batch: on one sample where the loss runs on it, else on all."""

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


class _Repair:
    """The guard's state while it repairs one mask set: the masks, what it added, what it owes."""

    def __init__(self, scores: Mapping[str, Tensor], masks: Mapping[str, Tensor], layer_floor: int) -> None:
        self.masks = {n: m.clone().bool() for n, m in masks.items()}
        self.scores = {n: scores[n].detach().reshape(-1).double() for n in self.masks}
        self.floors = {n: min(layer_floor, m.numel()) for n, m in self.masks.items()}
        self.protected = {
            n: torch.zeros(m.numel(), dtype=torch.bool, device=m.device) for n, m in self.masks.items()
        }
        self.kept_total = self.kept()
        self.report = GuardReport()
        self.probe: _Probe | None = None
        self.reachable: list[str] = []  # tensors on a path in the dense network: kept on one

    def kept(self) -> int:
        return sum(int(m.sum()) for m in self.masks.values())

    def add(self, name: str, index: int) -> None:
        self.masks[name].view(-1)[index] = True
        self.protected[name][index] = True
        self.report.added[name] = self.report.added.get(name, 0) + 1

    def drop(self, name: str, index: int) -> None:
        self.masks[name].view(-1)[index] = False
        self.report.removed[name] = self.report.removed.get(name, 0) + 1

    def paths(self) -> Paths | None:
        return self.probe(self.masks) if self.probe is not None else None

    def best(self, name: str, candidates: Tensor) -> int:
        return int(torch.argmax(self.scores[name].masked_fill(~candidates, -math.inf)))

    # 1. Floors: every tensor keeps its best-scored weights up to the floor.
    def apply_floors(self) -> None:
        for name, mask in self.masks.items():
            missing = self.floors[name] - int(mask.sum())
            if missing > 0:
                flat = self.scores[name].masked_fill(mask.view(-1), -math.inf)
                for index in torch.argsort(flat, descending=True)[:missing].tolist():
                    self.add(name, index)

    # 2. Connectivity.
    def start_probe(self, model: nn.Module, loss_fn: LossFn, batch: Any) -> None:
        """Run the dense linearized pass; on success, later calls of :meth:`paths` use it."""
        probe = _Probe(model, loss_fn, batch)
        ones = {n: torch.ones_like(m) for n, m in self.masks.items()}
        try:
            dense = probe.dense(ones)
        except Exception as err:
            self.report.skipped = (
                f"the loss pass on the linearized network raised {type(err).__name__}: {err}"
            )
            return
        self.reachable = [n for n in self.masks if dense.on_path(n, ones[n])]
        self.report.unchecked = tuple(n for n in self.masks if n not in self.reachable)
        if not self.reachable:
            self.report.skipped = (
                "no scored weight lies on a path from the batch to the loss, even in the dense "
                "linearized network"
            )
            return
        self.probe = probe
        self.report.connectivity_checked = True

    def _repair_choice(self, paths: Paths, dead: list[str]) -> tuple[str, Tensor] | None:
        for name in dead:  # a weight that completes a path through this tensor
            candidates = (paths.grads[name].view(-1) != 0) & ~self.masks[name].view(-1)
            if candidates.any():
                return name, candidates
        for name in dead:  # no path yet: extend the signal where it stops, one tensor further
            if name not in paths.upstream:
                continue
            alive = paths.upstream[name].expand_as(self.masks[name]).reshape(-1)
            if (alive & self.masks[name].view(-1)).any():
                continue  # a kept weight here already reads a live input: the signal passes
            candidates = alive & ~self.masks[name].view(-1)
            if candidates.any():
                return name, candidates
        return None

    def connect(self) -> None:
        """Add one weight at a time to reachable tensors with no kept weight on a path."""
        for _ in range(8 * len(self.masks) + 8):
            paths = self.paths()
            assert paths is not None
            dead = [n for n in self.reachable if paths.on_path(n, self.masks[n]) == 0]
            choice = self._repair_choice(paths, dead) if dead else None
            if choice is None:
                return
            self.add(choice[0], self.best(*choice))

    # 3. Pay for the additions.
    def pay_off_path(self, debt: int, paths: Paths) -> int:
        """With kept weights that lie on no path (removing them cannot change any path), lowest
        score first, never below a floor. Returns what is still owed."""
        pool = [n for n in self.masks if n in self.reachable]
        if not pool:
            return debt
        off = torch.cat(
            [self.masks[n].view(-1) & ~self.protected[n] & (paths.grads[n].view(-1) == 0) for n in pool]
        )
        flat = torch.cat([self.scores[n] for n in pool]).masked_fill(~off, math.inf)
        bounds, offset = [], 0
        for n in pool:
            bounds.append((n, offset, offset + self.masks[n].numel()))
            offset += self.masks[n].numel()
        for index in torch.argsort(flat)[: int(off.sum())].tolist():
            if debt == 0:
                break
            name, start, _ = next(b for b in bounds if b[1] <= index < b[2])
            if int(self.masks[name].sum()) <= self.floors[name]:
                continue
            self.drop(name, index - start)
            debt -= 1
        return debt

    def _cheapest(self, refused: set[tuple[str, int]]) -> tuple[str, int] | None:
        best: tuple[float, str, int] | None = None
        for name, mask in self.masks.items():
            if int(mask.sum()) <= self.floors[name]:
                continue
            allowed = mask.view(-1) & ~self.protected[name]
            for n_, i_ in refused:
                if n_ == name:
                    allowed[i_] = False
            if not allowed.any():
                continue
            values = self.scores[name].masked_fill(~allowed, math.inf)
            i = int(torch.argmin(values))
            if best is None or float(values[i]) < best[0]:
                best = (float(values[i]), name, i)
        return None if best is None else (best[1], best[2])

    def pay_lowest(self, debt: int, paths: Paths | None) -> None:
        """With the lowest-scored weights of tensors above their floor, keeping every tensor that is
        on a path on one."""
        on_path_before = (
            {n: paths.on_path(n, m) > 0 for n, m in self.masks.items()} if debt > 0 and paths else {}
        )
        refused: set[tuple[str, int]] = set()
        while debt > 0:
            cheapest = self._cheapest(refused)
            if cheapest is None:
                raise RuntimeError(
                    "the layer-collapse guard found no weight it could give up; lower `layer_floor`."
                )
            name, index = cheapest
            self.drop(name, index)
            after = self.paths()
            if after is not None and any(
                after.on_path(n, m) == 0 for n, m in self.masks.items() if on_path_before[n]
            ):
                self.masks[name].view(-1)[index] = True  # it held a layer on its only path: keep it
                self.report.removed[name] -= 1
                refused.add((name, index))
                continue
            debt -= 1

    def finish(self) -> tuple[dict[str, Tensor], GuardReport]:
        if self.report.connectivity_checked:
            final = self.paths()
            assert final is not None
            self.report.connected = all(final.on_path(n, self.masks[n]) > 0 for n in self.reachable)
        self.report.removed = {n: c for n, c in self.report.removed.items() if c}
        assert self.kept() == self.kept_total
        return self.masks, self.report


def guard_masks(
    scores: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    *,
    layer_floor: int = 1,
    model: nn.Module | None = None,
    loss_fn: LossFn | None = None,
    batch: Any = None,
) -> tuple[dict[str, Tensor], GuardReport]:
    """Repair ``masks`` (from :func:`~lightning_prospr.selection.global_masks` on ``scores``) so that
    no tensor collapses and, given ``model``, ``loss_fn`` and a ``batch``, every tensor keeps a
    weight on a path from the batch to the loss. The number of kept weights is unchanged.

    Args:
        scores: the scores the masks were selected from (higher = more important).
        masks: ``{name: bool keep-mask}``.
        layer_floor: minimum weights kept per tensor (capped at its size); 0 disables the floor.
        model: the network, for the connectivity check (left exactly as it was; it needs no
            ``forward``: the check runs ``loss_fn``, see :func:`path_gradients`).
        loss_fn: ``loss_fn(model, batch) -> loss``, the same loss that was scored.
        batch: one batch of the scoring data.

    Where the linearized loss pass cannot run (it raises) or finds no path at all, the check is
    skipped and :attr:`GuardReport.skipped` says why; tensors that carry no signal from the batch
    even in the dense network are exempt from it and listed in :attr:`GuardReport.unchecked`. The
    guard itself never raises for a model it cannot check.

    Returns:
        The repaired masks (new tensors) and a :class:`GuardReport`.
    """
    repair = _Repair(scores, masks, layer_floor)
    if repair.kept_total == 0:
        return repair.masks, repair.report
    repair.apply_floors()
    if model is not None and loss_fn is not None:
        repair.start_probe(model, loss_fn, batch)
    if repair.report.connectivity_checked:
        repair.connect()
    debt = repair.kept() - repair.kept_total
    paths = repair.paths()
    if debt > 0 and paths is not None:
        debt = repair.pay_off_path(debt, paths)
    repair.pay_lowest(debt, paths)
    return repair.finish()
