"""How many weights each layer keeps: one global top-k, the same density everywhere, ERK, or the
same count everywhere.

Pruning at initialization decides two things: how dense each layer is, and which weights of a layer
survive. Frankle et al. (ICLR 2021, "Pruning Neural Networks at Initialization: Why are We Missing
the Mark?") found that the first matters most: shuffling the kept positions within each layer keeps
or improves the accuracy of SNIP, GraSP and SynFlow masks. `allocation` chooses the layer densities:

- `"global"`: the method's scores of all layers compete in one top-k, so the scores decide the
  densities as well (the paper's ProsPr, SNIP, GraSP, SynFlow).
- `"uniform"`: every layer keeps the same fraction $1 - s$.
- `"erk"`: the Erdős–Rényi-Kernel rule of RigL (Evci et al., ICML 2020): layer $l$ with weight shape
  $(n_1, \\dots, n_k)$ gets density

  $$
  d_l = \\min\\Bigl(1,\\; \\varepsilon \\, \\frac{\\sum_i n_i}{\\prod_i n_i}\\Bigr),
  $$

  with $\\varepsilon$ chosen so that the layers keep exactly the budget; a layer the formula would
  make denser than 1 is kept whole and the others are re-scaled.
- `"balanced"`: every layer keeps the same *number* of weights, $d_l = \\min(1, \\varepsilon / n_l)$
  for a layer of $n_l$ weights, re-scaled the same way. Iterative SynFlow, the strongest baseline
  at extreme sparsity, ends near this: its conservation law gives every layer the same total
  score, and at 99.8 % on LeNet-5 its five layers keep 14 to 36 weights each (10 seeds).

With `"uniform"`, `"erk"` and `"balanced"` the scores choose only *within* each layer. The counts
are integers that add up to the global budget exactly
([`layer_budgets`][lightning_prospr.allocation.layer_budgets]).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["ALLOCATIONS", "erk_densities", "layer_budgets"]

#: The layer-wise allocations (see the module docstring).
ALLOCATIONS = ("global", "uniform", "erk", "balanced")


def _erk_factor(shape: Sequence[int]) -> float:
    """$\\sum_i n_i / \\prod_i n_i$ of a weight shape (RigL's ERK numerator over denominator)."""
    return sum(shape) / math.prod(shape)


def _rule(allocation: str, shape: Sequence[int], units: int) -> float:
    """A layer's density before scaling: ERK's factor, 1 (uniform), or 1 / units (balanced)."""
    if allocation == "erk":
        return _erk_factor(shape)
    return 1.0 / units if allocation == "balanced" else 1.0


def _shares(
    weights: Mapping[str, float], units: Mapping[str, int], capacity: Mapping[str, int], kept: int
) -> dict[str, float]:
    """Real-valued kept counts $\\min(c_l, \\varepsilon w_l u_l)$ summing to `kept`: layers that would
    exceed their capacity are filled and $\\varepsilon$ is solved again over the rest."""
    full: set[str] = set()
    while True:
        free = [n for n in units if n not in full]
        budget = kept - sum(capacity[n] for n in full)
        mass = sum(weights[n] * units[n] for n in free)
        scale = budget / mass if mass > 0 else 0.0
        over = [n for n in free if scale * weights[n] * units[n] > capacity[n]]
        if not over:
            shares = {n: float(capacity[n]) for n in full}
            shares.update({n: scale * weights[n] * units[n] for n in free})
            return {n: shares[n] for n in units}
        full.update(over)


def _round_to_total(shares: Mapping[str, float], capacity: Mapping[str, int], kept: int) -> dict[str, int]:
    """Integer counts from real shares by the largest remainder, exactly `kept` in all, none above
    its capacity; ties go to the layer that comes first."""
    counts = {n: min(capacity[n], math.floor(s + 1e-9)) for n, s in shares.items()}
    left = kept - sum(counts.values())
    # remainders rounded to 1e-9, so that float noise does not break a tie (balanced shares of
    # equal size, computed as scale * (1 / n) * n, differ in their last bits)
    order = sorted(shares, key=lambda n: -round(shares[n] - math.floor(shares[n] + 1e-9), 9))
    while left > 0:  # one pass gives each remainder its unit; more only after float noise
        for name in (n for n in order if counts[n] < capacity[n]):
            if left == 0:
                break
            counts[name] += 1
            left -= 1
    while left < 0:  # rounding up overshot (a share within 1e-9 below an integer)
        name = max((n for n in order if counts[n] > 0), key=lambda n: counts[n] - shares[n])
        counts[name] -= 1
        left += 1
    return counts


def layer_budgets(
    shapes: Mapping[str, Sequence[int]],
    kept: int,
    allocation: str,
    *,
    units: Mapping[str, int] | None = None,
    capacity: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """How many units (weights, or output channels when structured) each layer keeps.

    Args:
        shapes: `{name: weight shape}`, in layer order (the order breaks rounding ties).
        kept: the units kept over all layers, exactly.
        allocation: `"uniform"` (every layer the same density), `"erk"` or `"balanced"` (the
            module docstring).
        units: selectable units per layer; by default the weights, `prod(shape)` (pass the output
            channels, `shape[0]`, for structured pruning: the densities are then of channels).
        capacity: the most a layer can keep (by default all its units; fewer where weights are
            pruned already, for nested rounds). A layer the rule would give more is filled, and
            the rest re-scaled.

    Returns:
        `{name: units kept}`, summing to `kept`.

    Example:
        LeNet-300-100 (784-300-100-10) at 98 % sparsity keeps 5,324 of 266,200 weights. ERK's
        factors $\\sum n_i / \\prod n_i$ times the layer sizes are 1084, 400 and 110, so
        $\varepsilon = 5324 / 1594$ and the shares are 3620.6, 1336.0 and 367.4; the one weight
        the floors leave over goes to the largest remainder:

        >>> shapes = {"fc1": (300, 784), "fc2": (100, 300), "fc3": (10, 100)}
        >>> layer_budgets(shapes, 5324, "erk")
        {'fc1': 3621, 'fc2': 1336, 'fc3': 367}
        >>> layer_budgets(shapes, 5324, "uniform")
        {'fc1': 4704, 'fc2': 600, 'fc3': 20}

        `"balanced"` would give each layer 5324 / 3 weights, more than fc3's 1,000: fc3 is kept
        whole and the other two share the rest equally:

        >>> layer_budgets(shapes, 5324, "balanced")
        {'fc1': 2162, 'fc2': 2162, 'fc3': 1000}
    """
    if allocation not in ALLOCATIONS[1:]:
        raise ValueError(f"`allocation` must be 'uniform', 'erk' or 'balanced' here, got {allocation!r}.")
    units = dict(units) if units is not None else {n: math.prod(s) for n, s in shapes.items()}
    capacity = dict(capacity) if capacity is not None else dict(units)
    if not 0 <= kept <= sum(capacity.values()):
        raise ValueError(f"cannot keep {kept} units in layers that hold {sum(capacity.values())}.")
    weights = {n: _rule(allocation, shapes[n], units[n]) for n in units}
    return _round_to_total(_shares(weights, units, capacity, kept), capacity, kept)


def erk_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """The ERK density of each layer for an overall weight density `density` (before rounding).

    Example:
        >>> d = erk_densities({"fc1": (300, 784), "fc2": (100, 300), "fc3": (10, 100)}, 0.02)
        >>> {n: round(v, 4) for n, v in d.items()}
        {'fc1': 0.0154, 'fc2': 0.0445, 'fc3': 0.3674}
    """
    units = {n: math.prod(s) for n, s in shapes.items()}
    kept = density * sum(units.values())
    shares = _shares({n: _erk_factor(s) for n, s in shapes.items()}, units, units, kept)  # type: ignore[arg-type]
    return {n: shares[n] / units[n] for n in shapes}
