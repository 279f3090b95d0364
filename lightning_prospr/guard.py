"""The layer-collapse guard: masks that keep every layer alive and the network connected.

At extreme sparsity a global top-k can remove every weight of a layer (layer collapse), after which
the network's output no longer depends on its input and it cannot train. The guard repairs a mask
set in place of plain top-k, keeping the number of removed weights exactly the same:

1. **Floor**: every scored tensor keeps at least ``min(layer_floor, numel)`` weights (its best-scored).
2. **Connectivity** (when an example input is given): a weight is *on a path* when the linearized
   network (every scored weight replaced by :math:`|\\theta| \\odot m`, biases, BatchNorm shifts and
   running means set to 0, running variances to 1, the input all ones) has
   :math:`\\partial R / \\partial q \\ne 0` there, with :math:`R` the sum of the outputs: a
   positive network carries signal from input to output exactly along paths of kept weights. Every
   tensor must keep at least one weight on a path. A tensor with none gets its best-scored pruned
   weight whose addition would complete a path. When no single weight can (the signal stops
   before the tensor), the signal is extended where it stops: the first such tensor none of whose
   kept weights reads a live input gets its best-scored weight that does, and so on, one tensor
   further each time, until a path exists.

The additions come first, all of them; then they are paid for, one removed kept weight each: first
kept weights that lie on no path once the repairs are in place (removing them cannot change any
path), lowest score first, never taking a tensor below its floor; then the lowest-scored weights of
tensors that keep more than their floor, skipping any whose removal would take a tensor off the
paths it is on. Weights the guard added are never the ones removed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_prospr.execution import scoring_execution
from lightning_prospr.scores import parameter_key

__all__ = ["GuardReport", "Paths", "guard_masks", "path_gradients"]


@dataclass
class GuardReport:
    """What the guard changed: weights added per tensor (``added``) and removed (``removed``)."""

    added: dict[str, int] = field(default_factory=dict)
    removed: dict[str, int] = field(default_factory=dict)
    connectivity_checked: bool = False
    connected: bool = True

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


@dataclass
class Paths:
    """Signal flow in the linearized network under some masks.

    Attributes:
        grads: :math:`\\partial R / \\partial q` per masked tensor (non-zero exactly where a weight,
            kept or not, would lie on an input-to-output path).
        upstream: per masked tensor, a bool tensor broadcastable to the weight: ``True`` where the
            weight's input feature carries signal from the input (Linear and Conv layers only).
        total: :math:`R`, the sum of the outputs.
    """

    grads: dict[str, Tensor]
    upstream: dict[str, Tensor]
    total: float

    def on_path(self, name: str, mask: Tensor) -> int:
        """Kept weights of ``name`` that lie on an input-to-output path."""
        return int(((self.grads[name] != 0) & mask).sum())


def _input_features(module: nn.Module, inputs: tuple[Any, ...], weight: Tensor) -> Tensor | None:
    x = inputs[0] if inputs and isinstance(inputs[0], Tensor) else None
    if x is None:
        return None
    if isinstance(module, nn.modules.conv._ConvNd) and x.dim() >= 2 and module.groups == 1:
        alive = x.abs().sum(dim=[d for d in range(x.dim()) if d != 1]) > 0
        return alive.reshape(1, -1, *([1] * (weight.dim() - 2)))
    if isinstance(module, nn.Linear):
        alive = x.abs().reshape(-1, x.shape[-1]).sum(0) > 0
        return alive.reshape(1, -1)
    return None


def path_gradients(model: nn.Module, masks: Mapping[str, Tensor], example_input: Tensor) -> Paths:
    """Where signal flows in the linearized network with ``masks`` applied (see :class:`Paths`).

    ``example_input`` is a batch; only its shape (without the batch dimension) and dtype are used.
    The model is run in eval mode and left as it was (tensors are substituted, never written).
    """
    named = dict(model.named_parameters())
    keys = {n: parameter_key(named, n) for n in masks}
    fixed = _linearized(model, set(keys.values()))
    leaves = {
        n: (named[k].detach().abs().double() * masks[n].to(torch.float64)).requires_grad_(True)
        for n, k in keys.items()
    }
    x = torch.ones((1, *example_input.shape[1:]), dtype=torch.float64, device=example_input.device)
    if not example_input.is_floating_point():
        x = x.to(example_input.dtype)
    upstream: dict[str, Tensor] = {}
    handles = []
    for name in masks:
        module = model.get_submodule(name.rpartition(".")[0])

        def record(mod: nn.Module, inputs: tuple[Any, ...], name: str = name) -> None:
            alive = _input_features(mod, inputs, masks[name])
            if alive is not None:
                upstream[name] = alive.detach()

        handles.append(module.register_forward_pre_hook(record))
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.enable_grad(), scoring_execution(second_order=False):
            out = functional_call(
                model,
                {**fixed, **{keys[n]: t for n, t in leaves.items()}},
                (x,),
                tie_weights=True,
                strict=False,
            )
            total = out.sum() if isinstance(out, Tensor) else torch.zeros((), dtype=torch.float64)
            grads: Sequence[Tensor | None] = [None] * len(leaves)
            if total.requires_grad:
                grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags:
            module.training = flag
    return Paths(
        {
            n: (g if g is not None else torch.zeros_like(leaves[n])).detach()
            for n, g in zip(leaves, grads, strict=True)
        },
        upstream,
        float(total.detach()),
    )


def guard_masks(
    scores: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    *,
    layer_floor: int = 1,
    model: nn.Module | None = None,
    example_input: Tensor | None = None,
) -> tuple[dict[str, Tensor], GuardReport]:
    """Repair ``masks`` (from :func:`~lightning_prospr.selection.global_masks` on ``scores``) so that
    no tensor collapses and, given ``model`` and ``example_input``, every tensor keeps a weight on an
    input-to-output path. The number of kept weights is unchanged.

    Args:
        scores: the scores the masks were selected from (higher = more important).
        masks: ``{name: bool keep-mask}``.
        layer_floor: minimum weights kept per tensor (capped at its size); 0 disables the floor.
        model: the network, for the connectivity check (left exactly as it was).
        example_input: a batch of the model's input (shape and dtype only), for the connectivity check.

    Returns:
        The repaired masks (new tensors) and a :class:`GuardReport`.
    """
    masks = {n: m.clone().bool() for n, m in masks.items()}
    flat_scores = {n: scores[n].detach().reshape(-1).double() for n in masks}
    report = GuardReport()
    kept_total = sum(int(m.sum()) for m in masks.values())
    if kept_total == 0:
        return masks, report
    floors = {n: min(layer_floor, m.numel()) for n, m in masks.items()}

    protected = {n: torch.zeros(m.numel(), dtype=torch.bool, device=m.device) for n, m in masks.items()}
    connect = model is not None and isinstance(example_input, Tensor)

    def add(name: str, index: int) -> None:
        masks[name].view(-1)[index] = True
        protected[name][index] = True
        report.added[name] = report.added.get(name, 0) + 1

    def drop(name: str, index: int) -> None:
        masks[name].view(-1)[index] = False
        report.removed[name] = report.removed.get(name, 0) + 1

    def paths_now() -> Paths | None:
        if not report.connectivity_checked or model is None or example_input is None:
            return None
        return path_gradients(model, masks, example_input)

    # 1. Floors: every tensor keeps its best-scored weights up to the floor.
    for name, mask in masks.items():
        missing = floors[name] - int(mask.sum())
        if missing > 0:
            order = torch.argsort(flat_scores[name].masked_fill(mask.view(-1), -math.inf), descending=True)
            for index in order[:missing].tolist():
                add(name, index)

    # 2. Connectivity: add one weight at a time to tensors with no kept weight on a path.
    if connect:
        assert model is not None and example_input is not None
        ones = {n: torch.ones_like(m) for n, m in masks.items()}
        dense = path_gradients(model, ones, example_input)
        report.connectivity_checked = dense.total > 0 and all(dense.on_path(n, ones[n]) for n in masks)
    if report.connectivity_checked:
        for _ in range(8 * len(masks) + 8):
            paths = paths_now()
            assert paths is not None
            dead = [n for n, m in masks.items() if paths.on_path(n, m) == 0]
            if not dead:
                break
            choice = None
            for name in dead:  # a weight that completes a path through this tensor
                candidates = (paths.grads[name].view(-1) != 0) & ~masks[name].view(-1)
                if candidates.any():
                    choice = (name, candidates)
                    break
            if choice is None:  # no path yet: extend the signal where it stops, one tensor further
                for name in dead:
                    if name not in paths.upstream:
                        continue
                    alive = paths.upstream[name].expand_as(masks[name]).reshape(-1)
                    if (alive & masks[name].view(-1)).any():
                        continue  # a kept weight here already reads a live input: the signal passes
                    candidates = alive & ~masks[name].view(-1)
                    if candidates.any():
                        choice = (name, candidates)
                        break
            if choice is None:
                break
            name, candidates = choice
            add(name, int(torch.argmax(flat_scores[name].masked_fill(~candidates, -math.inf))))

    # 3. Pay for the additions, once the repairs are in place: first with kept weights that lie on
    # no path (removing them cannot change any path), lowest score first, never below a floor; then
    # with the lowest-scored weights of tensors above their floor, keeping every tensor that is on a
    # path on one.
    debt = sum(int(m.sum()) for m in masks.values()) - kept_total
    paths = paths_now()
    if debt > 0 and paths is not None:
        off = torch.cat([masks[n].view(-1) & ~protected[n] & (paths.grads[n].view(-1) == 0) for n in masks])
        flat = torch.cat([flat_scores[n] for n in masks]).masked_fill(~off, math.inf)
        order = torch.argsort(flat)[: int(off.sum())]
        bounds, offset = [], 0
        for n in masks:
            bounds.append((n, offset, offset + masks[n].numel()))
            offset += masks[n].numel()
        for index in order.tolist():
            if debt == 0:
                break
            name, start, _ = next(b for b in bounds if b[1] <= index < b[2])
            if int(masks[name].sum()) <= floors[name]:
                continue
            drop(name, index - start)
            debt -= 1
    on_path_before = (
        {n: paths.on_path(n, m) > 0 for n, m in masks.items()} if debt > 0 and paths is not None else {}
    )
    refused: set[tuple[str, int]] = set()
    while debt > 0:
        best: tuple[float, str, int] | None = None
        for name, mask in masks.items():
            if int(mask.sum()) <= floors[name]:
                continue
            allowed = mask.view(-1) & ~protected[name]
            for n_, i_ in refused:
                if n_ == name:
                    allowed[i_] = False
            if not allowed.any():
                continue
            values = flat_scores[name].masked_fill(~allowed, math.inf)
            i = int(torch.argmin(values))
            if best is None or float(values[i]) < best[0]:
                best = (float(values[i]), name, i)
        if best is None:
            raise RuntimeError(
                "the layer-collapse guard found no weight it could give up; lower `layer_floor`."
            )
        _, name, index = best
        drop(name, index)
        after = paths_now()
        if after is not None and any(after.on_path(n, m) == 0 for n, m in masks.items() if on_path_before[n]):
            masks[name].view(-1)[index] = True  # that one held a layer on its only path: keep it
            report.removed[name] -= 1
            refused.add((name, index))
            continue
        debt -= 1
    if report.connectivity_checked:
        final = paths_now()
        assert final is not None
        report.connected = final.total > 0 and all(final.on_path(n, m) > 0 for n, m in masks.items())
    report.removed = {n: c for n, c in report.removed.items() if c}
    assert sum(int(m.sum()) for m in masks.values()) == kept_total
    return masks, report
