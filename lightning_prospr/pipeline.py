"""Batches -> scores -> masks in one call: the method, rounds, averaging, structured masks, the guard.

[`compute_masks`][lightning_prospr.pipeline.compute_masks] is what the callback runs; it is pure
PyTorch and works on any `nn.Module`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from lightning_prospr.batches import BatchStream
from lightning_prospr.channels import ChannelGroups, channel_groups
from lightning_prospr.effective import EffectiveMasks, effective_masks, replace_dead_weights
from lightning_prospr.guard import GuardReport, guard_masks
from lightning_prospr.masking import current_masks
from lightning_prospr.methods import Run
from lightning_prospr.model_state import preserved_state
from lightning_prospr.prunable import output_dim, parameter_key, resolve_parameters
from lightning_prospr.selection import select_masks
from lightning_prospr.semi_structured import input_dimension, nm_masks, parse_pattern
from lightning_prospr.settings import PruningSettings
from lightning_prospr.stateless import LossFn, StatelessLoss
from lightning_prospr.structured import select_channels

__all__ = ["MaskResult", "ScoreHook", "compute_masks", "density_schedule", "layer_macs", "pruned_names"]

#: Called on every round's scores before selection; returns the scores to select from (the
#: callback's sums them over DDP ranks).
ScoreHook = Callable[[dict[str, Tensor]], dict[str, Tensor]]


@dataclass
class MaskResult:
    """Masks and how they were made.

    Attributes:
        masks: `{name: bool keep-mask}` with each weight's shape (channel masks expanded).
        channel_masks: `{name: bool per output channel}` when structured, else empty.
        guard: what the layer-collapse guard changed.
        seconds: wall time of scoring and selection.
        macs: multiply-accumulates per sample of each pruned layer when dense (structured only).
        effective: the kept weights that lie on an input-to-output path
            ([`effective_masks`][lightning_prospr.effective.effective_masks]), or `None` when
            the linearized loss pass could not run (`effective_skipped` says why).
        effective_skipped: why `effective` is `None`.
        coupled: structured only: `{parameter: bool mask}` of the biases and norm scales and shifts
            of the removed channels, masked with them so that a removed channel is dead.
        groups: structured only: the channel groups, and the weights left whole with the reason.
    """

    masks: dict[str, Tensor]
    channel_masks: dict[str, Tensor] = field(default_factory=dict)
    guard: GuardReport = field(default_factory=GuardReport)
    seconds: float = 0.0
    macs: dict[str, int] = field(default_factory=dict)
    effective: EffectiveMasks | None = None
    effective_skipped: str | None = None
    coupled: dict[str, Tensor] = field(default_factory=dict)
    groups: ChannelGroups | None = None


def density_schedule(sparsity: float, rounds: int) -> list[float]:
    """Sparsity after each of `rounds` rounds on an exponential density schedule.

    Round $r$ keeps $d_r = (1 - s)^{r / R}$; the last round is `sparsity` exactly.

    Example:
        >>> tuple(round(s, 4) for s in density_schedule(0.99, 2))
        (0.9, 0.99)
    """
    return [1.0 - (1.0 - sparsity) ** (r / rounds) for r in range(1, rounds)] + [sparsity]


def pruned_names(
    model: nn.Module, settings: PruningSettings, loss_fn: LossFn | None = None, batch: Any = None
) -> list[str]:
    """The weights to prune: `settings.parameters`, or the default set (watched in
    `loss_fn(model, batch)`, see [`prunable`][lightning_prospr.prunable]), without the last layer
    (the classifier, which keeps all its outputs) when `settings.structured`."""
    if settings.parameters is not None or not settings.structured:
        return resolve_parameters(model, settings.parameters, loss_fn, batch)
    names = resolve_parameters(model, None, loss_fn, batch)[:-1]
    if not names:
        raise ValueError(
            "structured pruning found only one prunable layer (the classifier): pass `parameters`."
        )
    return names


def example_input_of(batch: Any) -> Tensor | None:
    """The model input of a batch when it is recognisable: a tensor, or the first of a tuple/list,
    or a usual key of a dict (for the data-free SynFlow)."""
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
    settings: PruningSettings,
    *,
    example_input: Tensor | None = None,
    score_hook: ScoreHook | None = None,
) -> MaskResult:
    """Score `model` as `settings` say and select keep-masks that remove `settings.sparsity`.

    Args:
        model: any `nn.Module`; left exactly as it was. Weights it already carries
            `torch.nn.utils.prune` masks on stay pruned: the new masks nest inside them.
        loss_fn: `loss_fn(model, batch) -> loss` (a scalar tensor or a dict with `"loss"`); the data-free
            methods use it only to find the default weights.
        batches: an iterable of batches on the model's device, drawn as the method needs
            (`settings.batches_per_run`) and cycled when it runs out.
        settings: everything else ([`PruningSettings`][lightning_prospr.settings.PruningSettings]).
        example_input: SynFlow's input, whose shape it needs (SynFlow is data-free and calls the
            model's `forward`); by default the first tensor of the first batch.
        score_hook: called on every round's scores before selection (the callback sums them over
            DDP ranks).

    Returns:
        A [`MaskResult`][lightning_prospr.pipeline.MaskResult].

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_prospr import PruningSettings, compute_masks
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> batches = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(4)]
        >>> loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])
        >>> result = compute_masks(model, loss_fn, batches, PruningSettings(sparsity=0.75))
        >>> [int(m.sum()) for m in result.masks.values()], result.guard.changed
        ([7, 7], False)
    """
    start = time.perf_counter()
    stream = BatchStream(batches)
    names = pruned_names(model, settings, loss_fn, stream.peek())
    example = example_input if example_input is not None else example_input_of(stream.peek())
    groups = None
    if settings.structured:
        groups = _channel_groups(model, loss_fn, stream.peek(), names)
        names = [n for n in names if groups.group_of(n) is not None]
    run = Run(model, loss_fn, stream, names, settings, example)
    within = {n: m.bool() for n, m in current_masks(model, names).items()} or None
    channel_masks: dict[str, Tensor] = {}
    coupled: dict[str, Tensor] = {}
    macs: dict[str, int] = {}
    if groups is not None:
        chosen = select_channels(run, groups.groups, within, score_hook, density_schedule)
        masks, coupled, channel_masks, guard = (
            chosen.masks,
            chosen.coupled,
            chosen.channel_masks,
            chosen.guard,
        )
        macs = layer_macs(model, loss_fn, stream.peek(), list(masks))
    elif settings.pattern is not None:
        masks, guard = _pattern_masks(run, within, score_hook), GuardReport()
    else:
        masks, scores = _select(run, within, score_hook)
        guard = GuardReport()
        if settings.guard != "off":
            masks, guard = _guard(run, scores, masks, within)
    seconds = time.perf_counter() - start
    effective, skipped = None, None
    try:
        effective = effective_masks(model, masks, loss_fn, stream.peek())
    except Exception as err:  # the user's loss on the linearized network: anything can happen
        skipped = f"the loss pass on the linearized network raised {type(err).__name__}: {err}"
    return MaskResult(masks, channel_masks, guard, seconds, macs, effective, skipped, coupled, groups)


def _channel_groups(model: nn.Module, loss_fn: LossFn, batch: Any, names: list[str]) -> ChannelGroups:
    """The channel groups of `names`, with one warning naming the weights left whole."""
    groups = channel_groups(model, loss_fn, batch, names)
    if not groups.groups:
        reasons = "; ".join(f"{n}: {why}" for n, why in groups.excluded.items())
        raise ValueError(f"structured pruning found no channel group it can remove ({reasons}).")
    if groups.excluded:
        by_reason: dict[str, list[str]] = {}
        for name, why in groups.excluded.items():
            by_reason.setdefault(why, []).append(name)
        shown = "; ".join(
            f"{', '.join(n[:4])}{', ...' if len(n) > 4 else ''} ({why})" for why, n in by_reason.items()
        )
        warnings.warn(
            f"structured pruning keeps {len(groups.excluded)} weight(s) whole: {shown}. Their channels are "
            "not counted in `sparsity`; pass `parameters` to prune only the others and silence this.",
            UserWarning,
            stacklevel=3,
        )
    return groups


def spread_dimensions(run: Run) -> dict[str, int] | None:
    """`{name: output dimension}` of the scored weights when `settings.spread`, else `None`."""
    if not run.settings.spread:
        return None
    return {n: output_dim(run.model, n) for n in run.names}


def _select(
    run: Run, within: dict[str, Tensor] | None, score_hook: ScoreHook | None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The rounds: score under the masks so far, select the round's sparsity inside them."""
    method, settings = run.settings.method_spec, run.settings
    if method.select is not None:
        selected = method.select(run)
        if selected is not None:
            if within:
                raise ValueError("iterative SynFlow supports neither `structured` nor pre-pruned weights.")
            return selected
    current = within
    masks: dict[str, Tensor] = {}
    scores: dict[str, Tensor] = {}
    named = dict(run.model.named_parameters())
    shapes = {n: tuple(named[parameter_key(named, n)].shape) for n in run.names}
    spread = spread_dimensions(run)
    for target in density_schedule(settings.sparsity, settings.rounds_used):
        scores = method.score(run, current)
        if score_hook is not None:
            scores = score_hook(scores)
        masks = select_masks(
            scores, target, allocation=settings.allocation, within=current, shapes=shapes, spread_dims=spread
        )
        current = masks
    return masks, scores


def _pattern_masks(
    run: Run, within: dict[str, Tensor] | None, score_hook: ScoreHook | None
) -> dict[str, Tensor]:
    """N:M masks from one scoring (see [`semi_structured`][lightning_prospr.semi_structured])."""
    if within:
        raise ValueError(
            "`pattern` needs dense weights: the model already carries torch.nn.utils.prune masks on "
            f"{', '.join(sorted(within))}; remove them first (torch.nn.utils.prune.remove)."
        )
    n, m = parse_pattern(str(run.settings.pattern))
    scores = run.settings.method_spec.score(run, None)
    if score_hook is not None:
        scores = score_hook(scores)
    dims = {name: input_dimension(run.model, name) for name in scores}
    masks, dense = nm_masks(scores, n, m, dims)
    if dense:
        warnings.warn(
            f"pattern={run.settings.pattern!r} leaves {len(dense)} weight(s) dense, whose input dimension is "
            f"not a multiple of {m}: {', '.join(dense)}.",
            stacklevel=3,
        )
    return masks


def _guard(
    run: Run, scores: dict[str, Tensor], masks: dict[str, Tensor], within: dict[str, Tensor] | None
) -> tuple[dict[str, Tensor], GuardReport]:
    settings = run.settings
    connect = settings.guard in ("connected", "effective") and not settings.structured
    repaired, report = guard_masks(
        scores,
        masks,
        layer_floor=settings.layer_floor,
        model=run.model if connect else None,
        loss_fn=run.loss_fn if connect else None,
        batch=run.stream.peek(),
        per_layer=settings.allocation != "global",
    )
    _warn_unchecked(report)
    if settings.guard == "effective" and report.connectivity_checked:
        named = dict(run.model.named_parameters())
        repaired, report.replaced = replace_dead_weights(
            run.model,
            run.loss_fn,
            run.stream.peek(),
            scores,
            repaired,
            settings.sparsity,
            allocation=settings.allocation,
            within=within,
            keep={n: repaired[n] & ~masks[n] for n in repaired},
            shapes={n: tuple(named[parameter_key(named, n)].shape) for n in repaired},
            spread_dims=spread_dimensions(run),
        )
    return repaired, report


def _warn_unchecked(guard: GuardReport) -> None:
    """One warning when the guard could not check connectivity everywhere, with what to pass."""
    if guard.skipped is not None:
        warnings.warn(
            f"The layer-collapse guard could not check that every layer stays on a path from the "
            f"input to the loss ({guard.skipped}); it kept only its per-layer floor. Pass "
            "guard='floor' to skip the check and this warning.",
            UserWarning,
            stacklevel=4,
        )
    elif guard.unchecked:
        shown = ", ".join(guard.unchecked[:4]) + (", ..." if len(guard.unchecked) > 4 else "")
        warnings.warn(
            f"The layer-collapse guard found no path from the batch to the loss through "
            f"{len(guard.unchecked)} scored tensor(s) even in the dense network ({shown}), so it "
            "could not check that those stay connected (the others are checked). Pass "
            "guard='floor' to skip the check and this warning.",
            UserWarning,
            stacklevel=4,
        )


def layer_macs(model: nn.Module, loss_fn: LossFn, batch: Any, names: Sequence[str]) -> dict[str, int]:
    """Multiply-accumulates per sample of the layers owning `names`, from one forward pass.

    A layer whose weight has $n$ output channels and fan-in $f$ (`weight.numel() / n`) and whose
    output holds $e$ elements per sample costs $e \\cdot f$ MACs (a Linear on `(N, d)`: $n d$; a
    Conv: `out_channels * H_out * W_out * in_channels / groups * kernel`). The pass runs the loss on
    cloned buffers (the model is not changed); layers not called give 0.
    """
    named = dict(model.named_parameters())
    found: dict[str, int] = dict.fromkeys(names, 0)
    handles = []
    for name in names:
        module = model.get_submodule(name.rpartition(".")[0])
        weight = named[parameter_key(named, name)]
        fan_in = weight.numel() // max(1, weight.shape[output_dim(model, name)])

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
