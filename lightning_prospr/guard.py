"""The layer-collapse guard: masks that keep every layer alive and the network connected.

At extreme sparsity a global top-k can remove every weight of a layer (layer collapse), after which
the network's output no longer depends on its input and it cannot train. The guard repairs a mask
set in place of plain top-k, keeping the number of removed weights exactly the same:

1. **Floor**: every scored tensor keeps at least `min(layer_floor, numel)` weights (its best-scored).
2. **Connectivity** (given the model, its loss and a batch): a weight is *on a path* when the
   linearized network ([`linearized`][lightning_prospr.linearized]: every scored weight replaced by
   $|\\theta| \\odot m$, biases set to 0, the batch's floating-point tensors all ones,
   saturating activations made linear), run through the user's own loss, has
   $\\partial R / \\partial q \\ne 0$ there, with $R$ the sum of the predictions handed
   to the loss ([`path_gradients()`][lightning_prospr.linearized.path_gradients]): a positive network carries
   signal from input to output exactly along paths of kept weights. Every
   tensor that is on a path in the dense network must keep at least one weight on a path. A
   tensor with none gets its best-scored pruned weight whose addition would complete a path. When
   no single weight can (the signal stops before the tensor), the signal is extended where it
   stops: the first such tensor none of whose kept weights reads a live input gets its best-scored
   weight that does, and so on, one tensor further each time, until a path exists.

The additions come first, all of them; then they are paid for, one removed kept weight each: first
kept weights that lie on no path once the repairs are in place (removing them cannot change any
path), lowest score first, never taking a tensor below its floor; then the lowest-scored weights of
tensors that keep more than their floor, skipping any whose removal would take a tensor off the
paths it is on. Weights the guard added are never the ones removed. With `per_layer` (masks of a
per-layer allocation) each addition is paid for in its own tensor first, so that the layer
densities stay what the allocation chose.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prospr.linearized import Paths, Probe, path_gradients
from lightning_prospr.stateless import LossFn

__all__ = ["GuardReport", "Paths", "guard_masks", "path_gradients"]


@dataclass
class GuardReport:
    """What the guard changed (weights `added` and `removed` per tensor) and what it checked."""

    added: dict[str, int] = field(default_factory=dict)
    removed: dict[str, int] = field(default_factory=dict)
    connectivity_checked: bool = False
    connected: bool = True
    #: Why the connectivity check did not run, when it could not (`None` when it ran or was off).
    skipped: str | None = None
    #: Tensors exempt from the connectivity check: no path reaches them even in the dense network.
    unchecked: tuple[str, ...] = ()
    #: With guard='effective': kept weights that lay on no path and gave their places to live ones.
    replaced: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.replaced)

    def summary(self) -> str:
        parts = [f"{name} +{count}" for name, count in self.added.items()]
        parts += [f"{name} -{count}" for name, count in self.removed.items()]
        if self.replaced:
            parts.append(f"{self.replaced} dead weights replaced by live ones")
        return ", ".join(parts)


class _Repair:
    """The guard's state while it repairs one mask set: the masks, what it added, what it owes."""

    def __init__(self, scores: Mapping[str, Tensor], masks: Mapping[str, Tensor], layer_floor: int) -> None:
        self.masks = {n: m.bool().clone(memory_format=torch.contiguous_format) for n, m in masks.items()}
        self.scores = {n: scores[n].detach().reshape(-1).double() for n in self.masks}
        self.floors = {n: min(layer_floor, m.numel()) for n, m in self.masks.items()}
        self.protected = {
            n: torch.zeros(m.numel(), dtype=torch.bool, device=m.device) for n, m in self.masks.items()
        }
        self.kept_total = self.kept()
        self.report = GuardReport()
        self.probe: Probe | None = None
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
        """Run the dense linearized pass; on success, later calls of `paths()` use it."""
        probe = Probe(model, loss_fn, batch)
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
            candidates = (paths.grads[name].reshape(-1) != 0) & ~self.masks[name].view(-1)
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
    def pay_off_path(self, debt: int, paths: Paths, only: str | None = None) -> int:
        """With kept weights that lie on no path (removing them cannot change any path), lowest
        score first, never below a floor; from tensor `only` when given. Returns what is still owed."""
        pool = [n for n in self.masks if n in self.reachable and only in (None, n)]
        if not pool:
            return debt
        off = torch.cat(
            [self.masks[n].view(-1) & ~self.protected[n] & (paths.grads[n].reshape(-1) == 0) for n in pool]
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

    def _cheapest(self, refused: set[tuple[str, int]], only: str | None) -> tuple[str, int] | None:
        best: tuple[float, str, int] | None = None
        for name, mask in self.masks.items():
            if only not in (None, name) or int(mask.sum()) <= self.floors[name]:
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

    def pay_lowest(self, debt: int, paths: Paths | None, only: str | None = None) -> int:
        """With the lowest-scored weights of tensors above their floor (of tensor `only` when
        given), keeping every tensor that is on a path on one. Returns what is still owed, which
        is 0 unless `only` has nothing left to give."""
        on_path_before = (
            {n: paths.on_path(n, m) > 0 for n, m in self.masks.items()} if debt > 0 and paths else {}
        )
        refused: set[tuple[str, int]] = set()
        while debt > 0:
            cheapest = self._cheapest(refused, only)
            if cheapest is None and only is not None:
                return debt
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
        return 0

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
    per_layer: bool = False,
) -> tuple[dict[str, Tensor], GuardReport]:
    """Repair `masks` (from [`global_masks()`][lightning_prospr.selection.global_masks] on `scores`) so that
    no tensor collapses and, given `model`, `loss_fn` and a `batch`, every tensor keeps a
    weight on a path from the batch to the loss. The number of kept weights is unchanged.

    Args:
        scores: the scores the masks were selected from (higher = more important).
        masks: `{name: bool keep-mask}`.
        layer_floor: minimum weights kept per tensor (capped at its size); 0 disables the floor.
        model: the network, for the connectivity check (left exactly as it was; it needs no
            `forward`: the check runs `loss_fn`, see `path_gradients()`).
        loss_fn: `loss_fn(model, batch) -> loss`, the same loss that was scored.
        batch: one batch of the scoring data.
        per_layer: pay for each addition within the tensor it was made in, so that every layer keeps
            its count (for masks of a per-layer [`allocation`][lightning_prospr.allocation]);
            additions a tensor cannot pay for (it is at its floor) are paid as without it.

    Where the linearized loss pass cannot run (it raises) or finds no path at all, the check is
    skipped and `GuardReport.skipped` says why; tensors that carry no signal from the batch
    even in the dense network are exempt from it and listed in `GuardReport.unchecked`. The
    guard itself never raises for a model it cannot check.

    Returns:
        The repaired masks (new tensors) and a `GuardReport`.
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
    if per_layer:
        for name, added in list(repair.report.added.items()):
            owed = repair.pay_off_path(added, paths, only=name) if paths is not None else added
            debt -= added - repair.pay_lowest(owed, paths, only=name)
        paths = repair.paths() if debt > 0 else paths
    if debt > 0 and paths is not None:
        debt = repair.pay_off_path(debt, paths)
    repair.pay_lowest(debt, paths)
    return repair.finish()
