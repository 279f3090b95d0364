"""How masks are computed: every setting in one frozen, validated record.

[`PruningSettings`][lightning_prospr.settings.PruningSettings] is what
[`compute_masks`][lightning_prospr.pipeline.compute_masks] takes and what
[`ProsprPruningCallback`][lightning_prospr.callback.ProsprPruningCallback] builds from its
constructor arguments. It is checked once, when it is made: a value out of range, an unknown name,
or an option that the chosen method does not use raises `ValueError` (or `TypeError`) naming the
argument and the fix, before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lightning_prospr.allocation import ALLOCATIONS
from lightning_prospr.selection import check_sparsity
from lightning_prospr.semi_structured import parse_pattern

if TYPE_CHECKING:
    from lightning_prospr.methods import Method

__all__ = ["ALLOCATIONS", "GUARDS", "MODES", "PruningSettings"]

#: ProsPr's ways to differentiate through the unroll (see `mode`).
MODES = ("full", "first_order", "recompute")
#: The layer-collapse guard's settings (see `guard`).
GUARDS = ("connected", "effective", "floor", "off")

#: The options a method may not use, checked against their defaults: (option, what it is).
_METHOD_OPTIONS = {
    "steps": "ProsPr's inner SGD steps",
    "lr": "ProsPr's inner learning rate",
    "momentum": "ProsPr's inner momentum",
    "weight_decay": "ProsPr's inner weight decay",
    "mode": "how ProsPr differentiates through its unroll",
    "unrolls": "the number of independent scorings averaged",
    "grasp_batches": "the batches GraSP sums its loss over",
    "seed": "the random method's seed",
}


def _integer(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}.")


def _choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}.")


@dataclass(frozen=True)
class PruningSettings:
    """Everything that decides the masks, but the model, the loss and the data.

    Attributes:
        sparsity: fraction of the scored weights (channels, when `structured`) to remove, in [0, 1).
        method: the scoring method, by name in the registry
            ([`METHODS`][lightning_prospr.methods.METHODS]): `"prospr"` (default), `"snip"`,
            `"grasp"`, `"synflow"`, `"magnitude"`, `"random"`.
        steps: ProsPr's inner SGD steps $M \\ge 1$ (SNIP is `method="snip"`).
        lr: ProsPr's inner learning rate.
        momentum: ProsPr's inner momentum, as in `torch.optim.SGD`.
        weight_decay: ProsPr's inner weight decay, as in `torch.optim.SGD`.
        mode: how ProsPr differentiates through the unroll: `"full"` (the exact meta-gradient,
            every step's graph held), `"first_order"` (the Hessian terms dropped: cheaper, the
            paper's approximation for large models) or `"recompute"` (the exact meta-gradient in
            the memory of one step, for about one more forward and backward pass per step).
        parameters: names (as in `model.named_parameters()`) of the weights to prune; `None` is the
            default set, the weight matrices that multiply activations
            ([`prunable_parameters`][lightning_prospr.prunable.prunable_parameters]); the
            classifier is left out of it when `structured`.
        structured: one mask per output channel instead of per weight; `sparsity` counts channels.
        allocation: how dense each layer is: `"global"` (default: one top-k over all layers, the
            scores decide), `"uniform"` (every layer keeps $1 - s$), `"erk"` (RigL's
            Erdős–Rényi-Kernel densities, $\\propto \\sum_i n_i / \\prod_i n_i$ of the weight
            shape) or `"balanced"` (every layer keeps the same number of weights, capped at its
            size); with the last three the scores choose within each layer
            ([`allocation`][lightning_prospr.allocation]). Per channel when `structured`.
        pattern: `"N:M"` semi-structured masks (`"2:4"` for sparse tensor cores): each group of M
            consecutive weights along a layer's input dimension keeps its N best-scored ones
            ([`semi_structured`][lightning_prospr.semi_structured]). `sparsity` must then be
            $1 - N / M$; it needs `guard="off"`, the global allocation and one round.
        rounds: iterative pruning in this many rounds on an exponential density schedule,
            re-scoring the masked network each round; `None` is the method's own default
            ([`rounds_used`][lightning_prospr.settings.PruningSettings.rounds_used]: 1, and 100 for
            SynFlow as in its paper), which the description prints.
        unrolls: ProsPr and SNIP: average the scores of this many independent scorings, each on
            new batches, one in memory at a time.
        grasp_batches: GraSP: its loss is summed over this many batches.
        guard: the layer-collapse guard: `"connected"` (default: every tensor keeps `layer_floor`
            weights and a weight on a path from the input to the loss), `"effective"` (that, and
            then every kept weight on a path: dead weights give their places to the best-scored
            live ones, [`replace_dead_weights`][lightning_prospr.effective.replace_dead_weights]),
            `"floor"` (the floor only) or `"off"` (plain top-k).
        layer_floor: the guard's minimum of weights kept per tensor.
        seed: the random method's seed.
        head_sparsity: with `structured`, the fraction of each attention module's heads to remove,
            chosen within the module by the heads' scores: a module of $h$ heads keeps
            $h - \\min(h - 1, \\operatorname{round}(s_h h))$ (at least one). `sparsity` and
            `allocation` then count only the other channels, and the guard leaves the heads alone.
            With grouped-query attention (the Llama family) a head here is a key/value head with
            the query heads that read it, and $h$ counts key/value heads.
            `None` (default): heads are channel groups like any other; under the global allocation
            a head's score sums several head-size rows, so heads are rarely removed (the
            shrinking guide's "Attention heads"). Needs a model whose heads are found (it is an
            error otherwise).
        spread: with a per-layer `allocation`, spread each layer's kept weights evenly over its
            output units: every unit of a layer that keeps $k$ weights over $u$ units keeps
            $\\lfloor k/u \\rfloor$ or $\\lceil k/u \\rceil$, its best-scored ones
            ([`spread_ranks`][lightning_prospr.selection.spread_ranks]). A top-$k$ by score can
            leave whole output channels empty at extreme sparsity, where a random mask keeps them
            all; the guard's additions come on top.

    Example:
        >>> from lightning_prospr import PruningSettings
        >>> PruningSettings(0.9).describe()
        'ProsPr M=3, lr=0.1, full mode, 1 round, global allocation, guard: connected, floor 1'
        >>> PruningSettings(0.9, method="synflow").rounds_used
        100
        >>> PruningSettings(0.9, method="grasp", lr=0.5)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: `lr` (ProsPr's inner learning rate) does not apply to method='grasp'; leave it at ...
    """

    sparsity: float
    method: str = "prospr"
    steps: int = 3
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    mode: str = "full"
    parameters: Sequence[str] | None = None
    structured: bool = False
    allocation: str = "global"
    pattern: str | None = None
    rounds: int | None = None
    unrolls: int = 1
    grasp_batches: int = 1
    guard: str = "connected"
    layer_floor: int = 1
    seed: int = 0
    head_sparsity: float | None = None
    spread: bool = False

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        self._check_values()
        method = self.method_spec
        self._check_applies(method)
        self._check_combinations(method)
        if self.parameters is not None:
            object.__setattr__(self, "parameters", tuple(self.parameters))

    def _check_values(self) -> None:
        from lightning_prospr.methods import METHODS

        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(f"unknown pruning method {self.method!r}: choose one of {', '.join(METHODS)}.")
        if self.method == "prospr" and self.steps == 0:
            raise ValueError("`steps` must be >= 1 for ProsPr; M = 0 is SNIP: use method='snip'.")
        _integer("steps", self.steps, 1)
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"`lr` must be a finite number > 0, got {lr!r}; the paper uses 0.1.")
        if not isinstance(self.momentum, (int, float)) or not 0 <= self.momentum < 1:
            raise ValueError(f"`momentum` must be in [0, 1), got {self.momentum!r}; use 0.0 for plain SGD.")
        wd = self.weight_decay
        if not isinstance(wd, (int, float)) or not math.isfinite(wd) or wd < 0:
            raise ValueError(f"`weight_decay` must be a finite number >= 0, got {wd!r}.")
        _choice("mode", self.mode, MODES)
        _choice("guard", self.guard, GUARDS)
        _choice("allocation", self.allocation, ALLOCATIONS)
        if self.pattern is not None:
            parse_pattern(self.pattern)
        for name, low in (("unrolls", 1), ("grasp_batches", 1), ("layer_floor", 0)):
            _integer(name, getattr(self, name), low)
        if self.rounds is not None:
            _integer("rounds", self.rounds, 1)
        if self.head_sparsity is not None:
            check_sparsity(self.head_sparsity, "head_sparsity")
        if not isinstance(self.spread, bool):
            raise TypeError(f"`spread` must be True or False, got {type(self.spread).__name__}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"`seed` must be an int, got {type(self.seed).__name__}.")
        if self.parameters is not None and (isinstance(self.parameters, str) or not self.parameters):
            raise ValueError(
                f"`parameters` must be a non-empty list of parameter names or None, got {self.parameters!r}."
            )

    def _check_applies(self, method: Method) -> None:
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for option, what in _METHOD_OPTIONS.items():
            if option not in method.options and getattr(self, option) != defaults[option]:
                raise ValueError(
                    f"`{option}` ({what}) does not apply to method={self.method!r}; leave it at its "
                    f"default ({defaults[option]!r})."
                )
        if self.guard == "off" and self.layer_floor != defaults["layer_floor"]:
            raise ValueError(
                "`layer_floor` does not apply with guard='off' (plain top-k); leave it at its default (1)."
            )
        if self.guard == "floor" and self.layer_floor == 0:
            raise ValueError(
                "guard='floor' with layer_floor=0 keeps nothing: use guard='off' for plain top-k."
            )

    def _check_combinations(self, method: Method) -> None:
        if self.rounds is not None and self.rounds > 1 and not method.iterative:
            raise ValueError(
                f"`rounds`={self.rounds} needs a method that re-scores the masked network: one of "
                f"{', '.join(_names(iterative=True))} (method={self.method!r} scores the same weights "
                "every round)."
            )
        if self.structured and self.guard == "effective":
            raise ValueError(
                "guard='effective' replaces single dead weights, and structured masks keep whole "
                "channels: use guard='connected' with structured=True."
            )
        if self.pattern is not None:
            self._check_pattern()
        if self.spread and (self.allocation == "global" or self.structured):
            raise ValueError(
                "`spread` spreads each layer's budget over its output units, so it needs single "
                "weights and a per-layer budget: pass allocation='uniform', 'erk' or 'balanced' "
                "(and structured=False), or leave spread=False."
            )
        if self.head_sparsity is not None and not self.structured:
            raise ValueError(
                "`head_sparsity` removes whole attention heads and needs structured=True; leave it "
                "None for unstructured masks."
            )
        if self.structured and not method.structured:
            raise ValueError(
                f"`structured=True` supports method in {', '.join(_names(structured=True))}, "
                f"not {self.method!r}."
            )

    def _check_pattern(self) -> None:
        n, m = parse_pattern(str(self.pattern))
        if abs(self.sparsity - (1 - n / m)) > 1e-9:
            raise ValueError(
                f"`sparsity`={self.sparsity!r} contradicts pattern={self.pattern!r}, which removes "
                f"{m - n} of every {m} weights: pass sparsity={1 - n / m!r}."
            )
        clashes = {
            "structured": (self.structured, "an N:M pattern prunes single weights, not channels"),
            "allocation": (self.allocation != "global", "the pattern gives every layer density N/M"),
            "guard": (
                self.guard != "off",
                "the guard adds weights where a path needs them, which breaks the pattern; pass guard='off'",
            ),
            "rounds": (self.rounds not in (None, 1), "a pattern is one selection, not a schedule"),
        }
        for option, (clash, why) in clashes.items():
            if clash:
                raise ValueError(f"`{option}`={getattr(self, option)!r} does not apply with pattern: {why}.")

    # ------------------------------------------------------------------ derived

    @property
    def method_spec(self) -> Method:
        """The registry's entry for `method`."""
        from lightning_prospr.methods import METHODS

        return METHODS[self.method]

    @property
    def rounds_used(self) -> int:
        """`rounds`, or the method's default when it is `None` (1; 100 for SynFlow)."""
        if self.pattern is not None:
            return 1
        return self.method_spec.default_rounds if self.rounds is None else self.rounds

    @property
    def batches_per_run(self) -> int:
        """Batches a whole run draws before it cycles (one for the data-free methods' example input)."""
        method = self.method_spec
        return method.batches(self) * self.rounds_used if method.data else 1

    @property
    def loss_passes(self) -> int:
        """Evaluations of the loss a run makes for its scores (for a progress bar)."""
        return self.method_spec.loss_passes(self) * self.rounds_used

    def describe(self) -> str:
        """What the run does, in one line, with every default spelled out."""
        parts = [self.method_spec.describe(self), f"{self.rounds_used} round{'s' * (self.rounds_used > 1)}"]
        if self.structured:
            parts.append("structured")
        if self.head_sparsity is not None:
            parts.append(f"head sparsity {self.head_sparsity:g}")
        parts.append(f"pattern {self.pattern}" if self.pattern else f"{self.allocation} allocation")
        if self.spread:
            parts.append("spread over output units")
        if self.unrolls > 1:
            parts.append(f"{self.unrolls} unrolls")
        if self.grasp_batches > 1:
            parts.append(f"{self.grasp_batches} batches")
        guard = f"guard: {self.guard}"
        parts.append(f"{guard}, floor {self.layer_floor}" if self.guard != "off" else guard)
        return ", ".join(parts)


def _names(**capability: bool) -> list[str]:
    from lightning_prospr.methods import METHODS

    ((key, value),) = capability.items()
    return [name for name, m in METHODS.items() if getattr(m, key) == value]
