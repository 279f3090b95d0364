"""Batches -> scores -> masks in one call: the method, iterative rounds, score averaging, the guard.

:func:`compute_masks` is what the callback runs; it is pure PyTorch and works on any ``nn.Module``.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from lightning_prospr.baselines import (
    check_method,
    grasp_scores,
    iterative_synflow_masks,
    magnitude_scores,
    random_scores,
    synflow_scores,
)
from lightning_prospr.guard import GuardReport, guard_masks
from lightning_prospr.scores import parameter_key, preserved_state, prospr_scores, resolve_parameters
from lightning_prospr.selection import check_sparsity, global_masks
from lightning_prospr.unroll import LossFn, StatelessLoss

__all__ = [
    "MaskResult",
    "batches_needed",
    "check_options",
    "compute_masks",
    "density_schedule",
    "layer_macs",
    "pruned_names",
]

#: Methods that take part in iterative rounds by re-scoring the masked network.
ITERATIVE_METHODS = ("prospr", "snip", "synflow")
#: Methods that score whole output channels.
STRUCTURED_METHODS = ("prospr", "snip", "magnitude", "random")


@dataclass
class MaskResult:
    """Masks and how they were made.

    Attributes:
        masks: ``{name: bool keep-mask}`` with each weight's shape (channel masks expanded).
        channel_masks: ``{name: bool per output channel}`` when structured, else empty.
        guard: what the layer-collapse guard changed.
        seconds: wall time of scoring and selection.
        macs: multiply-accumulates per sample of each pruned layer when dense (structured only).
    """

    masks: dict[str, Tensor]
    channel_masks: dict[str, Tensor] = field(default_factory=dict)
    guard: GuardReport = field(default_factory=GuardReport)
    seconds: float = 0.0
    macs: dict[str, int] = field(default_factory=dict)


def density_schedule(sparsity: float, rounds: int) -> list[float]:
    """Sparsity after each of ``rounds`` rounds on an exponential density schedule.

    Round :math:`r` keeps :math:`d_r = (1 - s)^{r / R}`; the last round is ``sparsity`` exactly.
    """
    return [1.0 - (1.0 - sparsity) ** (r / rounds) for r in range(1, rounds)] + [sparsity]


def check_options(
    method: str, structured: bool, rounds: int | None, num_batches: int, layer_floor: int
) -> int:
    """Validate how masks are to be computed (before any work); returns the number of rounds."""
    check_method(method)
    for arg, value, low in (("num_batches", num_batches, 1), ("layer_floor", layer_floor, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"`{arg}` must be an integer >= {low}, got {value!r}.")
    if rounds is None:
        rounds = 100 if method == "synflow" else 1
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"`rounds` must be an integer >= 1 (1 is one-shot), got {rounds!r}.")
    if rounds > 1 and method not in ITERATIVE_METHODS:
        raise ValueError(
            f"`rounds`={rounds} needs a method that re-scores the masked network: one of "
            f"{', '.join(ITERATIVE_METHODS)} (method={method!r} scores the same weights every round)."
        )
    if structured and method not in STRUCTURED_METHODS:
        raise ValueError(
            f"`structured=True` supports method in {', '.join(STRUCTURED_METHODS)}, not {method!r}."
        )
    if structured and method == "synflow" and rounds > 1:
        raise ValueError("iterative SynFlow supports neither `structured` nor pre-pruned weights.")
    return rounds


def pruned_names(
    model: nn.Module,
    parameters: Sequence[str] | None,
    structured: bool,
    loss_fn: LossFn | None = None,
    batch: Any = None,
) -> list[str]:
    """The weights to prune: ``parameters``, or the default set (watched in ``loss_fn(model,
    batch)``, see :mod:`~lightning_prospr.prunable`), without the last layer (the classifier,
    which keeps all its outputs) when ``structured``."""
    if parameters is not None or not structured:
        return resolve_parameters(model, parameters, loss_fn, batch)
    names = resolve_parameters(model, None, loss_fn, batch)[:-1]
    if not names:
        raise ValueError(
            "structured pruning found only one prunable layer (the classifier): pass `parameters`."
        )
    return names


def batches_needed(method: str, steps: int, num_batches: int, rounds: int | None) -> int:
    """Batches :func:`compute_masks` draws before it cycles: ``steps + 1`` per ProsPr unroll, one per
    SNIP or GraSP unroll, for ``num_batches`` unrolls in each of ``rounds`` rounds; one for the
    data-free methods (their example input)."""
    per_unroll = {"prospr": steps + 1, "snip": 1, "grasp": 1}.get(method)
    if per_unroll is None:
        return 1
    return per_unroll * num_batches * (rounds or 1)


def _example_input(batch: Any) -> Tensor | None:
    """The model input of a batch when it is recognisable: a tensor, or the first of a tuple/list."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, Mapping):
        for key in ("x", "input", "inputs", "image", "images", "input_ids"):
            if isinstance(batch.get(key), Tensor):
                return batch[key]
    return None


def compute_masks(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    sparsity: float,
    *,
    method: str = "prospr",
    steps: int = 3,
    lr: float = 0.1,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    first_order: bool = False,
    recompute: bool = False,
    parameters: Sequence[str] | None = None,
    structured: bool = False,
    rounds: int | None = None,
    num_batches: int = 1,
    layer_floor: int = 1,
    keep_connected: bool = True,
    example_input: Tensor | None = None,
    within: Mapping[str, Tensor] | None = None,
    seed: int = 0,
    score_hook: Any = None,
) -> MaskResult:
    """Score ``model`` with ``method`` and select keep-masks that remove ``sparsity`` of the weights.

    Args:
        model: any ``nn.Module``; left exactly as it was.
        loss_fn: ``loss_fn(model, batch) -> scalar`` (not used by the data-free methods).
        batches: an iterable of batches on the model's device. ProsPr takes ``steps + 1`` per unroll
            (cycling when it runs out); SNIP and GraSP take one per unroll.
        sparsity: fraction of the scored weights (or channels, when ``structured``) to remove.
        method: ``"prospr"``, ``"snip"``, ``"grasp"``, ``"synflow"``, ``"magnitude"`` or ``"random"``.
        steps, lr, momentum, weight_decay, first_order, recompute: ProsPr's inner loop (see
            :func:`~lightning_prospr.prospr_scores`).
        parameters: names of the weights to prune; ``None`` is the default set, the weight matrices
            that multiply activations in one watched pass of ``loss_fn`` on the first batch
            (:mod:`~lightning_prospr.prunable`; without the last layer, the classifier, when
            ``structured``).
        structured: one mask per output channel; global top-k over channels.
        rounds: iterative pruning in ``rounds`` rounds on :func:`density_schedule`, re-scoring the
            masked network each round. ``None``: 1, except 100 for SynFlow (as in its paper).
        num_batches: average the scores of this many independent unrolls (new batches each), one
            unroll in memory at a time.
        layer_floor, keep_connected: the layer-collapse guard (:mod:`~lightning_prospr.guard`):
            weights kept per tensor at least, and whether to keep every tensor on a path from the
            input to the loss (checked through ``loss_fn`` on the first batch: no ``forward``
            needed). ``layer_floor=0, keep_connected=False`` gives plain top-k.
        example_input: SynFlow's input, whose shape it needs (SynFlow is data-free and calls the
            model's ``forward``); by default the first tensor of the first batch.
        within: existing keep-masks to nest in (weights outside them count as removed).
        seed: for ``method="random"``.
        score_hook: called as ``score_hook(scores)`` on every round's scores before selection (the
            callback uses it to sum scores over DDP ranks).

    Returns:
        A :class:`MaskResult`.
    """
    start = time.perf_counter()
    check_sparsity(sparsity)
    rounds = check_options(method, structured, rounds, num_batches, layer_floor)
    stream = _BatchStream(batches)
    names = pruned_names(model, parameters, structured, loss_fn, stream.peek())
    example = example_input if example_input is not None else _example_input(stream.peek())
    if method == "synflow" and example is None:
        raise ValueError(
            "SynFlow is data-free and runs the model's forward on an all-ones input, so it needs the "
            "input's shape: pass `example_input` (a batch of inputs; in the callback, set the module's "
            "`example_input_array`)."
        )

    def score(current: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        if method in ("prospr", "snip"):
            total: dict[str, Tensor] = {}
            m = steps if method == "prospr" else 0
            for _ in range(num_batches):
                part = prospr_scores(
                    model, loss_fn, stream.take(m + 1), steps=m, lr=lr, momentum=momentum,
                    weight_decay=weight_decay, first_order=first_order, parameters=names,
                    structured=structured, masks=current, recompute=recompute,
                )  # fmt: skip
                total = {n: total[n] + s if n in total else s for n, s in part.items()}
            return {n: s / num_batches for n, s in total.items()}
        if method == "grasp":
            return grasp_scores(
                model, loss_fn, stream.take(num_batches), parameters=names, num_batches=num_batches
            )
        if method == "synflow":
            return synflow_scores(model, parameters=names, example_input=example)
        if method == "magnitude":
            found = magnitude_scores(model, parameters=names)
        else:
            found = random_scores(model, parameters=names, seed=seed)
        if structured:  # one score per output channel: the channel's summed score
            found = {n: s.sum(dim=tuple(range(1, s.dim())), keepdim=True) for n, s in found.items()}
        return found

    current = {n: m.bool() for n, m in (within or {}).items() if n in names} or None
    if method == "synflow" and rounds > 1:
        if current:  # (structured iterative SynFlow is refused by check_options)
            raise ValueError("iterative SynFlow supports neither `structured` nor pre-pruned weights.")
        masks = iterative_synflow_masks(
            model, sparsity, rounds=rounds, parameters=names, example_input=example
        )
        scores = synflow_scores(model, parameters=names, example_input=example)
    else:
        for target in density_schedule(sparsity, rounds):
            scores = score(current)
            if score_hook is not None:
                scores = score_hook(scores)
            if current is not None and structured:
                current = {
                    n: m.reshape(m.shape[0], -1).any(dim=1).reshape(scores[n].shape)
                    for n, m in current.items()
                }
            masks = global_masks(scores, target, within=current)
            current = masks
    guard = GuardReport()
    if layer_floor or keep_connected:
        connect = keep_connected and not structured
        masks, guard = guard_masks(
            scores,
            masks,
            layer_floor=layer_floor,
            model=model if connect else None,
            loss_fn=loss_fn if connect else None,
            batch=stream.peek(),
        )
        _warn_unchecked(guard)
    named = dict(model.named_parameters())
    channel_masks: dict[str, Tensor] = {}
    macs: dict[str, int] = {}
    if structured:
        channel_masks = {n: m.reshape(-1) for n, m in masks.items()}
        masks = {n: m.expand_as(named[parameter_key(named, n)]).clone() for n, m in masks.items()}
        macs = layer_macs(model, loss_fn, stream.peek(), list(masks))
    return MaskResult(masks, channel_masks, guard, time.perf_counter() - start, macs)


def _warn_unchecked(guard: GuardReport) -> None:
    """One warning when the guard could not check connectivity everywhere, with what to pass."""
    if guard.skipped is not None:
        warnings.warn(
            f"The layer-collapse guard could not check that every layer stays on a path from the "
            f"input to the loss ({guard.skipped}); it kept only its per-layer floor. Pass "
            "keep_connected=False to skip the check and this warning.",
            UserWarning,
            stacklevel=3,
        )
    elif guard.unchecked:
        shown = ", ".join(guard.unchecked[:4]) + (", ..." if len(guard.unchecked) > 4 else "")
        warnings.warn(
            f"The layer-collapse guard found no path from the batch to the loss through "
            f"{len(guard.unchecked)} scored tensor(s) even in the dense network ({shown}), so it "
            "could not check that those stay connected (the others are checked). Pass "
            "keep_connected=False to skip the check and this warning.",
            UserWarning,
            stacklevel=3,
        )


def layer_macs(model: nn.Module, loss_fn: LossFn, batch: Any, names: Sequence[str]) -> dict[str, int]:
    """Multiply-accumulates per sample of the layers owning ``names``, from one forward pass.

    A layer whose weight has ``n`` output channels and fan-in ``f`` (``weight.numel() / n``) and whose
    output holds ``e`` elements per sample costs ``e * f`` MACs (a Linear on ``(N, d)``: ``n * d``;
    a Conv: ``out_channels * H_out * W_out * in_channels / groups * kernel``). The pass runs the
    loss on cloned buffers (the model is not changed); layers not called give 0.
    """
    named = dict(model.named_parameters())
    found: dict[str, int] = dict.fromkeys(names, 0)
    handles = []
    for name in names:
        module = model.get_submodule(name.rpartition(".")[0])
        weight = named[parameter_key(named, name)]
        fan_in = weight.numel() // max(1, weight.shape[0])

        def count(mod: nn.Module, inputs: Any, output: Any, name: str = name, fan_in: int = fan_in) -> None:
            if isinstance(output, Tensor) and output.dim() >= 1 and output.shape[0]:
                found[name] += output.numel() // output.shape[0] * fan_in

        handles.append(module.register_forward_hook(count))
    try:
        with preserved_state(model, next(iter(named.values())).device):
            model.train()
            StatelessLoss(model, loss_fn, {n: b.clone() for n, b in model.named_buffers()})(named, batch)
    finally:
        for handle in handles:
            handle.remove()
    return found


class _BatchStream:
    """Hands out batches lazily; when the source runs out, cycles over those it gave."""

    def __init__(self, batches: Iterable[Any]) -> None:
        self._source: Iterator[Any] = iter(batches)
        self._seen: list[Any] = []
        self._handed = 0
        self._cycled = 0

    def peek(self) -> Any:
        """The first batch, without handing it out."""
        if not self._seen:
            self._seen.extend(itertools.islice(self._source, 1))
            if not self._seen:
                raise ValueError("`batches` is empty: give at least one batch.")
        return self._seen[0]

    def _next(self) -> Any:
        if self._handed < len(self._seen):
            self._handed += 1
            return self._seen[self._handed - 1]
        for item in itertools.islice(self._source, 1):
            self._seen.append(item)
            self._handed += 1
            return item
        self.peek()  # raises when there never was a batch
        self._cycled += 1
        return self._seen[(self._cycled - 1) % len(self._seen)]

    def take(self, count: int) -> list[Any]:
        return [self._next() for _ in range(count)]
