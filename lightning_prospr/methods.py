"""The scoring methods, looked up by name: one registry entry each.

[`METHODS`][lightning_prospr.methods.METHODS] maps a name to a
[`Method`][lightning_prospr.methods.Method]: its scorer, the options of
[`PruningSettings`][lightning_prospr.settings.PruningSettings] it uses, what it can do (rounds,
structured pruning) and what a run costs (batches, loss passes). Adding a method is one entry here
plus its scorer:

```python
METHODS["mine"] = Method(
    "mine",
    score=lambda run, within: my_scores(run.model, run.loss_fn, run.stream.take(1), run.names),
    describe=lambda s: "mine",
    batches=lambda s: 1,
    loss_passes=lambda s: 1,
)
```

A scorer returns `{name: score}` for `run.names`, higher = more important, one score per output
channel (shape `(out, 1, ..., 1)`; `(1, out)` for Hugging Face's `Conv1D`) when
`run.settings.structured`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from lightning_prospr.baselines import (
    grasp_scores,
    iterative_synflow_masks,
    magnitude_scores,
    random_scores,
    synflow_scores,
)
from lightning_prospr.batches import BatchStream
from lightning_prospr.prunable import output_dim
from lightning_prospr.scores import channel_sums, prospr_scores, snip_scores
from lightning_prospr.settings import PruningSettings
from lightning_prospr.stateless import LossFn

__all__ = ["METHODS", "Method", "Run"]


@dataclass(frozen=True)
class Run:
    """What a scorer sees: the model, the loss, the batches, the weights to score, the settings.

    Attributes:
        model: the network (left exactly as it was by every scorer).
        loss_fn: `loss_fn(model, batch) -> loss`.
        stream: where the batches come from (`stream.take(k)`: the next k, cycled).
        names: the weights to score.
        settings: the run's settings.
        example_input: a batch of the model's input, for the data-free SynFlow.
    """

    model: nn.Module
    loss_fn: LossFn
    stream: BatchStream
    names: list[str]
    settings: PruningSettings
    example_input: Tensor | None = None


Scorer = Callable[[Run, "Mapping[str, Tensor] | None"], dict[str, Tensor]]
#: A method that runs its own rounds: `(run) -> (masks, scores for the guard)`.
Selector = Callable[[Run], "tuple[dict[str, Tensor], dict[str, Tensor]]"]


@dataclass(frozen=True)
class Method:
    """One scoring method.

    Attributes:
        name: its name in [`METHODS`][lightning_prospr.methods.METHODS] and in `method=`.
        score: `score(run, within) -> {name: score}`, where `within` holds the keep-masks of the
            previous round (weights outside them are pruned already), or `None`.
        describe: `describe(settings) -> str`, the method's part of the run's description.
        batches: batches one round draws.
        loss_passes: loss evaluations one round makes.
        options: the options of `PruningSettings` (beyond those every method takes) it uses; any
            other set to a non-default value is an error.
        data: whether it scores on data (`False`: data-free, one batch is drawn for the input).
        iterative: whether it can re-score the masked network in `rounds`.
        structured: whether it can score whole output channels.
        default_rounds: `rounds` when the settings leave it at `None`.
        select: for a method that runs its rounds itself, `select(run) -> (masks, scores)`.
    """

    name: str
    score: Scorer
    describe: Callable[[PruningSettings], str]
    batches: Callable[[PruningSettings], int] = lambda s: 1
    loss_passes: Callable[[PruningSettings], int] = lambda s: 0
    options: frozenset[str] = field(default_factory=frozenset)
    data: bool = True
    iterative: bool = False
    structured: bool = False
    default_rounds: int = 1
    select: Callable[[Run], Any] | None = None


def _averaged(score_once: Callable[[], dict[str, Tensor]], count: int) -> dict[str, Tensor]:
    """The mean of `count` independent scorings, one in memory at a time."""
    total: dict[str, Tensor] = {}
    for _ in range(count):
        part = score_once()
        total = {n: total[n] + s if n in total else s for n, s in part.items()}
    return {n: s / count for n, s in total.items()}


def _prospr(run: Run, within: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    s = run.settings
    return _averaged(
        lambda: prospr_scores(
            run.model,
            run.loss_fn,
            run.stream.take(s.steps + 1),
            steps=s.steps,
            lr=s.lr,
            momentum=s.momentum,
            weight_decay=s.weight_decay,
            mode=s.mode,
            parameters=run.names,
            structured=s.structured,
            within=within,
        ),
        s.unrolls,
    )


def _snip(run: Run, within: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    s = run.settings
    return _averaged(
        lambda: snip_scores(
            run.model,
            run.loss_fn,
            run.stream.take(1),
            parameters=run.names,
            structured=s.structured,
            within=within,
        ),
        s.unrolls,
    )


def _grasp(run: Run, within: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    count = run.settings.grasp_batches
    return grasp_scores(
        run.model, run.loss_fn, run.stream.take(count), parameters=run.names, num_batches=count
    )


def _synflow_input(run: Run) -> Tensor:
    if run.example_input is None:
        raise ValueError(
            "SynFlow is data-free and runs the model's forward on an all-ones input, so it needs the "
            "input's shape: pass `example_input` (a batch of inputs; in the callback, set the module's "
            "`example_input_array`)."
        )
    return run.example_input


def _synflow(run: Run, within: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    return synflow_scores(run.model, parameters=run.names, example_input=_synflow_input(run))


def _synflow_rounds(run: Run) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Iterative SynFlow (its own rounds, masks multiplied in); the guard gets one-shot scores."""
    s, example = run.settings, _synflow_input(run)
    masks = iterative_synflow_masks(
        run.model,
        s.sparsity,
        rounds=s.rounds_used,
        parameters=run.names,
        example_input=example,
        allocation=s.allocation,
        spread=s.spread,
    )
    return masks, synflow_scores(run.model, parameters=run.names, example_input=example)


def _per_channel(model: nn.Module, scores: dict[str, Tensor], structured: bool) -> dict[str, Tensor]:
    if not structured:
        return scores
    return {n: channel_sums(t, output_dim(model, n)) for n, t in scores.items()}


def _ones(settings: PruningSettings) -> int:
    return 1


METHODS: dict[str, Method] = {
    "prospr": Method(
        "prospr",
        score=_prospr,
        describe=lambda s: (
            f"ProsPr M={s.steps}, lr={s.lr:g}"
            + (f", momentum {s.momentum:g}" if s.momentum else "")
            + (f", weight decay {s.weight_decay:g}" if s.weight_decay else "")
            + f", {s.mode.replace('_', '-')} mode"
        ),
        batches=lambda s: (s.steps + 1) * s.unrolls,
        loss_passes=lambda s: (s.steps + 1 + (s.steps if s.mode == "recompute" else 0)) * s.unrolls,
        options=frozenset({"steps", "lr", "momentum", "weight_decay", "mode", "unrolls"}),
        iterative=True,
        structured=True,
    ),
    "snip": Method(
        "snip",
        score=_snip,
        describe=lambda s: "SNIP",
        batches=lambda s: s.unrolls,
        loss_passes=lambda s: s.unrolls,
        options=frozenset({"unrolls"}),
        iterative=True,
        structured=True,
    ),
    "grasp": Method(
        "grasp",
        score=_grasp,
        describe=lambda s: "GraSP",
        batches=lambda s: s.grasp_batches,
        loss_passes=lambda s: 2 * s.grasp_batches,
        options=frozenset({"grasp_batches"}),
    ),
    "synflow": Method(
        "synflow",
        score=_synflow,
        describe=lambda s: "SynFlow",
        data=False,
        iterative=True,
        default_rounds=100,
        select=lambda run: _synflow_rounds(run) if run.settings.rounds_used > 1 else None,
    ),
    "magnitude": Method(
        "magnitude",
        score=lambda run, within: _per_channel(
            run.model, magnitude_scores(run.model, parameters=run.names), run.settings.structured
        ),
        describe=lambda s: "magnitude",
        data=False,
        structured=True,
    ),
    "random": Method(
        "random",
        score=lambda run, within: _per_channel(
            run.model,
            random_scores(run.model, parameters=run.names, seed=run.settings.seed),
            run.settings.structured,
        ),
        describe=lambda s: f"random (seed {s.seed})",
        options=frozenset({"seed"}),
        data=False,
        structured=True,
    ),
}
"""The methods by name: `"prospr"`, `"snip"`, `"grasp"`, `"synflow"`, `"magnitude"`, `"random"`."""
