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
   weight whose addition would complete a path.

Each weight added is paid for by removing a kept weight: first kept weights that lie on no path
(they cannot affect the output), lowest score first; then the lowest-scored weights of tensors that
keep more than their floor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_prospr.scores import parameter_key

__all__ = ["GuardReport", "guard_masks", "path_gradients"]


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


def path_gradients(
    model: nn.Module, masks: Mapping[str, Tensor], example_input: Tensor
) -> tuple[dict[str, Tensor], float]:
    """:math:`\\partial R / \\partial q` for each masked tensor of the linearized network, and R.

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
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.enable_grad():
            out = functional_call(
                model,
                {**fixed, **{keys[n]: t for n, t in leaves.items()}},
                (x,),
                tie_weights=True,
                strict=False,
            )
            total = out.sum() if isinstance(out, Tensor) else torch.zeros((), dtype=torch.float64)
            if not total.requires_grad:
                return {n: torch.zeros_like(t) for n, t in leaves.items()}, 0.0
            grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    finally:
        for module, flag in flags:
            module.training = flag
    return (
        {
            n: (g if g is not None else torch.zeros_like(leaves[n])).detach()
            for n, g in zip(leaves, grads, strict=True)
        },
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

    def add(name: str, index: int) -> None:
        masks[name].view(-1)[index] = True
        report.added[name] = report.added.get(name, 0) + 1

    def remove_one(paths: Mapping[str, Tensor] | None) -> None:
        """Drop the cheapest kept weight: off-path ones first, then from tensors above their floor
        that keep another weight on a path."""
        best: tuple[int, float, str, int] | None = None
        for name, mask in masks.items():
            if int(mask.sum()) <= floors[name]:
                continue
            flat = mask.view(-1)
            tier, allowed = 1, flat
            if paths is not None:
                off_path = flat & (paths[name].view(-1) == 0)
                if off_path.any():
                    tier, allowed = 0, off_path
                elif _on_path(paths[name], mask) <= 1:
                    continue
            s = flat_scores[name].masked_fill(~allowed, math.inf)
            i = int(torch.argmin(s))
            key = (tier, float(s[i]), name, i)
            if best is None or key[:2] < best[:2]:
                best = key
        if best is None:
            raise RuntimeError(
                "the layer-collapse guard found no weight it could give up; lower `layer_floor`."
            )
        _, _, name, index = best
        masks[name].view(-1)[index] = False
        report.removed[name] = report.removed.get(name, 0) + 1

    # 1. Floors.
    for name, mask in masks.items():
        missing = floors[name] - int(mask.sum())
        if missing > 0:
            order = torch.argsort(flat_scores[name].masked_fill(mask.view(-1), -math.inf), descending=True)
            for index in order[:missing].tolist():
                add(name, index)
                remove_one(None)

    # 2. Connectivity.
    if model is not None and isinstance(example_input, Tensor):
        dense, dense_total = path_gradients(
            model, {n: torch.ones_like(m) for n, m in masks.items()}, example_input
        )
        report.connectivity_checked = dense_total > 0 and all(bool((g != 0).any()) for g in dense.values())
        if report.connectivity_checked:
            for _ in range(2 * len(masks) + 1):
                grads, _total = path_gradients(model, masks, example_input)
                dead = [n for n, m in masks.items() if _on_path(grads[n], m) == 0]
                if not dead:
                    break
                progressed = False
                for name in dead:
                    reachable = (grads[name].view(-1) != 0) & ~masks[name].view(-1)
                    if not reachable.any():
                        continue
                    s = flat_scores[name].masked_fill(~reachable, -math.inf)
                    add(name, int(torch.argmax(s)))
                    remove_one(grads)
                    progressed = True
                    break  # recompute paths after every change
                if not progressed:
                    # No single weight completes a path: reconnect the first dead tensor to its best
                    # weight anyway (paths form once its neighbours are repaired).
                    name = dead[0]
                    s = flat_scores[name].masked_fill(masks[name].view(-1), -math.inf)
                    add(name, int(torch.argmax(s)))
                    remove_one(grads)
            grads, total = path_gradients(model, masks, example_input)
            report.connected = total > 0 and all(_on_path(grads[n], m) > 0 for n, m in masks.items())
    assert sum(int(m.sum()) for m in masks.values()) == kept_total
    return masks, report


def _on_path(grad: Tensor, mask: Tensor) -> int:
    return int(((grad != 0) & mask).sum())
