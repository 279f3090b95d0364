"""Tables and plots of benchmark rows: mean ± std over seeds, comparisons, timing."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.data import VAL_SIZE

__all__ = [
    "Catalog",
    "render_ablations",
    "render_comparison",
    "render_effective",
    "render_markdown",
    "render_plot",
    "render_study",
    "render_timing",
    "render_verdict",
    "row_label",
    "summarize",
]


@dataclass(frozen=True)
class Catalog:
    """The names a benchmark's rows use, in display order, and their labels.

    Attributes:
        models: model names, in table order.
        methods: method names, in table order (also the plot's colours).
        ours: the methods compared against the best of the others (the ProsPr variants).
        model_labels: display names of the models.
        dataset_of: the data set of each model.
        dataset_labels: display names of the data sets.
        ablations: sanity checks of another method's mask (``prospr+shuffle``): neither ours nor a
            baseline, compared with the method they ablate.
    """

    models: tuple[str, ...]
    methods: tuple[str, ...]
    ours: tuple[str, ...]
    model_labels: Mapping[str, str] = field(default_factory=dict)
    dataset_of: Mapping[str, str] = field(default_factory=dict)
    dataset_labels: Mapping[str, str] = field(default_factory=dict)
    ablations: tuple[str, ...] = ()


def row_label(row: Mapping[str, str]) -> str:
    """The method of a row as the tables name it: ``method[+allocation][+guard][+ablation]``, the
    defaults (global, connected, none) left out, e.g. ``prospr+erk`` (rows without those columns, from
    before them, are their ``method``)."""
    tags = [row.get("allocation") or "global", row.get("guard") or "connected", row.get("ablation") or "none"]
    return "+".join([row["method"], *(t for t in tags if t not in ("global", "connected", "none"))])


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(
    rows: Iterable[dict[str, str]], metric: str = "test_acc"
) -> dict[tuple[str, str, float], list[float]]:
    """``{(model, method label, sparsity): [metric of each seed]}``, skipping empty values."""
    out: dict[tuple[str, str, float], list[float]] = defaultdict(list)
    for row in rows:
        if row.get(metric, "") != "":
            out[(row["model"], row_label(row), float(row["sparsity"]))].append(float(row[metric]))
    return out


def _ordered(values: Iterable[str], order: Sequence[str]) -> list[str]:
    found = set(values)
    return [v for v in order if v in found] + sorted(found - set(order))


def render_markdown(rows: Sequence[dict[str, str]], catalog: Catalog, metric: str = "test_acc") -> str:
    """One table per model: rows = method, columns = sparsity, cells = mean ± std over seeds (%).

    The best mean of each column is in bold (ties included); a cell with fewer seeds than the most
    common count says how many it has. The dense accuracy heads the table.
    """
    stats = summarize(rows, metric)
    what = "test accuracy" if metric == "test_acc" else "validation accuracy"
    lines: list[str] = []
    for model in _ordered({k[0] for k in stats}, catalog.models):
        dataset = catalog.dataset_of.get(model, "")
        cells = {k[1:]: v for k, v in stats.items() if k[0] == model}
        counts = [len(v) for v in cells.values()]
        usual = max(set(counts), key=counts.count) if counts else 0
        title = f"{catalog.model_labels.get(model, model)} on {catalog.dataset_labels.get(dataset, dataset)}"
        lines += [f"### {title}", ""]
        dense = cells.get(("dense", 0.0))
        if dense:
            mean, std = _mean_std(dense)
            lines += [f"Dense: **{mean:.2f} ± {std:.2f} %** ({len(dense)} seeds).", ""]
        sparsities = sorted({s for (m, s) in cells if m != "dense"})
        methods = _ordered({m for (m, _) in cells if m != "dense"}, catalog.methods)
        lines.append(f"Mean ± std {what} (%) over {usual} seeds; columns are sparsities.")
        lines.append("")
        lines.append("| method | " + " | ".join(f"{100 * s:g} %" for s in sparsities) + " |")
        lines.append("|---|" + "---:|" * len(sparsities))
        best = {
            s: max(statistics.fmean(cells[(m, s)]) for m in methods if (m, s) in cells) for s in sparsities
        }
        for method in methods:
            row = [method]
            for s in sparsities:
                values = cells.get((method, s))
                if not values:
                    row.append("-")
                    continue
                mean, std = _mean_std(values)
                text = f"{mean:.2f} ± {std:.2f}"
                if round(mean, 2) == round(best[s], 2):
                    text = f"**{text}**"
                if len(values) != usual:
                    text += f" (n={len(values)})"
                row.append(text)
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def render_timing(rows: Sequence[dict[str, str]], catalog: Catalog) -> str:
    """Mean scoring and training seconds per model and method (over sparsities and seeds)."""
    groups: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        groups[(row["model"], row_label(row))].append(
            (float(row["score_seconds"]), float(row["train_seconds"]))
        )
    lines = ["| model | method | runs | scoring s (mean) | training s (mean) |", "|---|---|---:|---:|---:|"]
    for model in _ordered({k[0] for k in groups}, catalog.models):
        for method in _ordered({k[1] for k in groups if k[0] == model}, catalog.methods):
            values = groups[(model, method)]
            lines.append(
                f"| {catalog.model_labels.get(model, model)} | {method} | {len(values)} | "
                f"{statistics.fmean(v[0] for v in values):.2f} | "
                f"{statistics.fmean(v[1] for v in values):.1f} |"
            )
    return "\n".join(lines) + "\n"


def render_plot(
    rows: Sequence[dict[str, str]],
    path: Path,
    catalog: Catalog,
    metric: str = "test_acc",
    floor: float | None = 50.0,
) -> None:
    """Accuracy against density (log axis, sparsity growing to the right), one column per model:
    the top row against the nominal density $1 - s$, the bottom row against the effective density
    (the kept weights on an input-to-output path, mean over seeds; rows with an
    ``effective_sparsity`` column only).

    Each method is a line through the mean over seeds with ± std error bars; the dense accuracy is a
    dashed line in a grey band of ± one std. Ablations are left out (they have their own table).
    With ``floor``, the accuracy axis starts there (collapsed runs sit near 10 % and would flatten
    the differences that matter); points below it are drawn on the axis as open markers.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if row_label(r) not in catalog.ablations]
    stats = summarize(rows, metric)
    effective = summarize([r for r in rows if r.get("effective_sparsity")], "effective_sparsity")
    models = _ordered({k[0] for k in stats}, catalog.models)
    ncols, nrows = max(1, len(models)), 2 if effective else 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 4.8 * nrows), squeeze=False)
    colors = plt.get_cmap("tab20")
    for col, model in enumerate(models):
        cells = {k[1:]: v for k, v in stats.items() if k[0] == model}
        dense = cells.get(("dense", 0.0))
        methods = _ordered({m for (m, _) in cells if m != "dense"}, catalog.methods)
        for row in range(nrows):
            ax = axes[row][col]
            if dense:
                mean, std = _mean_std(dense)
                ax.axhspan(mean - std, mean + std, color="0.6", alpha=0.35, lw=0)
                ax.axhline(mean, color="0.3", lw=1.0, ls="--", label=f"dense {mean:.2f} ± {std:.2f}")
            xs_all: list[float] = []
            for method in methods:
                points = []
                for (m, s), values in sorted(cells.items()):
                    if m != method:
                        continue
                    x = 1.0 - s
                    if row == 1:
                        eff = effective.get((model, method, s))
                        if not eff:
                            continue
                        x = max(1e-6, 1.0 - statistics.fmean(eff))
                    points.append((x, *_mean_std(values)))
                if not points:
                    continue
                xs, ys, es = zip(*points, strict=True)
                xs_all += xs
                ours = method in catalog.ours
                color = colors(catalog.methods.index(method) % 20 if method in catalog.methods else 19)
                shown = [max(y, floor) if floor is not None else y for y in ys]
                ax.errorbar(
                    xs, shown, yerr=es, marker="o", ms=5 if ours else 4, lw=2.0 if ours else 1.1,
                    ls="-" if ours else "--", capsize=3, label=method, color=color,
                )  # fmt: skip
                low = [(x, floor) for x, y in zip(xs, ys, strict=True) if floor is not None and y < floor]
                if low:
                    ax.scatter(
                        *zip(*low, strict=True),
                        marker="v",
                        s=36,
                        facecolors="white",
                        edgecolors=color,
                        zorder=3,
                    )
            if xs_all:  # sparsity grows to the right: the density axis runs from high to low
                ax.set_xlim(max(xs_all) * 1.4, min(xs_all) / 1.4)
            ax.set_xscale("log")
            if row == 0 and xs_all:
                ticks = sorted(set(xs_all))
                ax.set_xticks(ticks)
                ax.set_xticklabels([f"{100 * d:g}" for d in ticks])
                ax.minorticks_off()
            what = "nominal density 1 - s" if row == 0 else "effective density (kept weights on a path)"
            ax.set_xlabel(f"{what} (%), log scale")
            if row == 1:
                ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{100 * v:g}"))
            if floor is not None:
                top = _mean_std(dense)[0] if dense else 100.0
                ax.set_ylim(floor - 1.0, top + 2.0)
            label = "test accuracy (%)" if metric == "test_acc" else "validation accuracy (%)"
            dataset = catalog.dataset_labels.get(catalog.dataset_of.get(model, ""), "")
            ax.set_ylabel(label)
            ax.set_title(
                f"{catalog.model_labels.get(model, model)} on {dataset}" + (" (effective)" if row else "")
            )
            ax.grid(True, alpha=0.3)
            if row == 0:
                ax.legend(fontsize=7, loc="lower left", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _baseline_means(
    stats: Mapping[tuple[str, str, float], Sequence[float]], catalog: Catalog, model: str, sparsity: float
) -> dict[str, float]:
    """Mean of each baseline of one cell: not ours, not an ablation, not dense."""
    return {
        m: statistics.fmean(v)
        for (mm, m, ss), v in stats.items()
        if mm == model
        and ss == sparsity
        and m not in catalog.ours
        and m not in catalog.ablations
        and m != "dense"
    }


def render_comparison(
    rows: Sequence[dict[str, str]], catalog: Catalog, metric: str = "test_acc", from_sparsity: float = 0.98
) -> str:
    """Each ProsPr variant against the best baseline of each cell at ``from_sparsity`` and above.

    The best baseline is the non-ProsPr method with the highest mean (``dense`` excluded). The
    per-seed column gives the variant's value minus that baseline's, seed by seed (seeds both have).
    """
    stats = summarize(rows, metric)
    by_seed: dict[tuple[str, str, float], dict[str, float]] = defaultdict(dict)
    for row in rows:
        if row.get(metric, "") != "":
            by_seed[(row["model"], row_label(row), float(row["sparsity"]))][row["seed"]] = float(row[metric])
    lines = [
        "| model | sparsity | method | mean | best baseline | difference | per seed |",
        "|---|---:|---|---:|---|---:|---|",
    ]
    wins = total = 0
    for model in _ordered({k[0] for k in stats}, catalog.models):
        sparsities = sorted({k[2] for k in stats if k[0] == model and k[2] >= from_sparsity})
        for s in sparsities:
            baselines = _baseline_means(stats, catalog, model, s)
            if not baselines:
                continue
            rival = max(baselines, key=lambda m: baselines[m])
            for method in catalog.ours:
                values = stats.get((model, method, s))
                if not values:
                    continue
                mean = statistics.fmean(values)
                ours, theirs = by_seed[(model, method, s)], by_seed[(model, rival, s)]
                seeds = sorted(set(ours) & set(theirs), key=int)
                per_seed = ", ".join(f"{ours[k] - theirs[k]:+.2f}" for k in seeds)
                difference = mean - baselines[rival]
                won = round(difference, 2) >= 0
                wins += won
                total += 1
                cell = f"**{difference:+.2f}**" if won else f"{difference:+.2f}"
                lines.append(
                    f"| {catalog.model_labels.get(model, model)} | {100 * s:g} % | {method} | {mean:.2f} | "
                    f"{rival} {baselines[rival]:.2f} | {cell} | {per_seed} |"
                )
    what = "test accuracy" if metric == "test_acc" else "validation accuracy"
    summary = (
        f"Mean {what} (%) of each ProsPr variant against the best other method of the cell "
        f"(sparsity >= {100 * from_sparsity:g} %); matches or beats it in {wins} of {total} "
        "(variant, cell) pairs (bold)."
    )
    return summary + "\n\n" + "\n".join(lines) + "\n"


def render_study(
    rows: Sequence[dict[str, str]], catalog: Catalog, models: Sequence[str], seeds: Sequence[int], recipe: str
) -> str:
    """Validation accuracy per ProsPr setting (rows) and sparsity (columns), plus the mean."""
    table: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        setting = f"{row_label(row)} {row['scoring']}"
        table[setting][float(row["sparsity"])].append(float(row["val_acc"]))
    sparsities = sorted({float(r["sparsity"]) for r in rows})
    lines = [
        f"ProsPr settings: validation accuracy (%) on the {VAL_SIZE} held-out training images (never "
        f"the test set); {', '.join(catalog.model_labels.get(m, m) for m in models)}, seeds "
        f"{' '.join(map(str, seeds))}; training recipe: {recipe}.",
        "",
        "| setting | " + " | ".join(f"{100 * s:g} %" for s in sparsities) + " | mean |",
        "|---|" + "---:|" * (len(sparsities) + 1),
    ]
    means = {}
    for setting, by_s in sorted(table.items()):
        per = [statistics.fmean(by_s[s]) for s in sparsities if by_s.get(s)]
        means[setting] = statistics.fmean(per)
        cells = [f"{statistics.fmean(by_s[s]):.2f}" if by_s.get(s) else "-" for s in sparsities]
        lines.append(f"| {setting} | " + " | ".join(cells) + f" | {means[setting]:.2f} |")
    if means:
        best = max(means, key=lambda k: (round(means[k], 2), *_cheaper(k)))
        tied = sorted(k for k in means if round(means[k], 2) == round(means[best], 2) and k != best)
        lines += ["", f"Best mean validation accuracy: `{best}` ({means[best]:.2f} %)."]
        if tied:
            lines.append(
                f"Tied with {', '.join(f'`{k}`' for k in tied)}; ties go to the cheaper scoring "
                "(one reused batch, then fewer steps, then the paper's lr 0.1)."
            )
    return "\n".join(lines) + "\n"


def _cheaper(setting: str) -> tuple[int, int, int, float]:
    """Preference among tied ProsPr settings (larger is preferred): reuse, fewer steps, fewer
    rounds, lr near 0.1."""
    fields = dict(part.split("=", 1) for part in setting.split() if "=" in part)
    steps = int(fields.get("M", 0))
    rounds = int(fields.get("rounds", 1))
    lr = float(fields.get("lr", 0.1))
    return int("reuse" in setting.split()), -steps, -rounds, -abs(math.log10(lr) + 1.0)


def _cell(values: Sequence[float]) -> str:
    mean, std = _mean_std(values)
    return f"{mean:.2f} ± {std:.2f}"


def render_verdict(rows: Sequence[dict[str, str]], catalog: Catalog, from_sparsity: float = 0.98) -> str:
    """Per cell at ``from_sparsity`` and above: the ProsPr variant with the best mean *validation*
    accuracy, its test accuracy, against the baseline with the best mean *test* accuracy (a bar the
    baseline sets with the test set itself, so a match is not luck of the choice).

    A cell is won when the chosen variant's mean test accuracy is at least the best baseline's
    (rounded to 0.01). The last column says whether the two are within one standard deviation of
    each other (the larger of the two), where more seeds would be needed to separate them.
    """
    test, val = summarize(rows), summarize(rows, "val_acc")
    lines = [
        "| model | sparsity | ProsPr variant (by val) | test | best baseline (by test) | test | difference "
        "| within 1 std |",
        "|---|---:|---|---:|---|---:|---:|---|",
    ]
    wins = total = 0
    for model in _ordered({k[0] for k in test}, catalog.models):
        for s in sorted({k[2] for k in test if k[0] == model and k[2] >= from_sparsity}):
            ours = {
                m: statistics.fmean(v)
                for (mm, m, ss), v in val.items()
                if mm == model and ss == s and m in catalog.ours
            }
            baselines = _baseline_means(test, catalog, model, s)
            if not ours or not baselines:
                continue
            pick = max(ours, key=lambda m: ours[m])
            rival = max(baselines, key=lambda m: baselines[m])
            a, b = test[(model, pick, s)], test[(model, rival, s)]
            difference = statistics.fmean(a) - statistics.fmean(b)
            won = round(difference, 2) >= 0
            wins += won
            total += 1
            close = abs(difference) <= max(_mean_std(a)[1], _mean_std(b)[1])
            shown = f"**{difference:+.2f}**" if won else f"{difference:+.2f}"
            name = catalog.model_labels.get(model, model)
            lines.append(
                f"| {name} | {100 * s:g} % | {pick} | {_cell(a)} | {rival} | {_cell(b)} | {shown} | "
                f"{'yes' if close else 'no'} |"
            )
    summary = (
        f"The ProsPr variant chosen on validation matches or beats the best baseline in {wins} of {total} "
        f"cells at sparsity >= {100 * from_sparsity:g} % (bold); mean ± std over seeds."
    )
    return summary + "\n\n" + "\n".join(lines) + "\n"


def render_ablations(rows: Sequence[dict[str, str]], catalog: Catalog) -> str:
    """Each ablation (``x+shuffle``, ``x+reinit``) against the method it ablates, per cell: the mean
    test accuracies over the seeds both have, their difference, and the difference seed by seed
    (Frankle et al.: a method whose within-layer choice matters loses accuracy when shuffled)."""
    test = summarize(rows)
    by_seed: dict[tuple[str, str, float], dict[str, float]] = defaultdict(dict)
    for row in rows:
        if row.get("test_acc", "") != "":
            by_seed[(row["model"], row_label(row), float(row["sparsity"]))][row["seed"]] = float(
                row["test_acc"]
            )
    lines = [
        "| model | sparsity | ablation | test | original | test | difference | per seed |",
        "|---|---:|---|---:|---|---:|---:|---|",
    ]
    for model in _ordered({k[0] for k in test}, catalog.models):
        for ablation in _ordered(
            {k[1] for k in test if k[0] == model and k[1] in catalog.ablations}, catalog.methods
        ):
            original = "+".join(t for t in ablation.split("+") if t not in ("shuffle", "reinit"))
            for s in sorted({k[2] for k in test if k[0] == model and k[1] == ablation}):
                mine, theirs = by_seed[(model, ablation, s)], by_seed[(model, original, s)]
                seeds = sorted(set(mine) & set(theirs), key=int)
                if not seeds:
                    continue
                a, b = [mine[k] for k in seeds], [theirs[k] for k in seeds]
                lines.append(
                    f"| {catalog.model_labels.get(model, model)} | {100 * s:g} % | {ablation} | {_cell(a)} | "
                    f"{original} | {_cell(b)} | {statistics.fmean(a) - statistics.fmean(b):+.2f} | "
                    + ", ".join(f"{mine[k] - theirs[k]:+.2f}" for k in seeds)
                    + " |"
                )
    return "\n".join(lines) + "\n"


def render_effective(rows: Sequence[dict[str, str]], catalog: Catalog) -> str:
    """Mean effective sparsity (%) per method and nominal sparsity, one table per model."""
    stats = summarize([r for r in rows if r.get("effective_sparsity")], "effective_sparsity")
    lines: list[str] = []
    for model in _ordered({k[0] for k in stats}, catalog.models):
        cells = {k[1:]: v for k, v in stats.items() if k[0] == model and k[1] != "dense"}
        sparsities = sorted({s for (_, s) in cells})
        lines += [
            f"{catalog.model_labels.get(model, model)}: mean effective sparsity (%) over seeds.",
            "",
            "| method | " + " | ".join(f"{100 * s:g} %" for s in sparsities) + " |",
            "|---|" + "---:|" * len(sparsities),
        ]
        for method in _ordered({m for (m, _) in cells}, catalog.methods):
            values = [cells.get((method, s)) for s in sparsities]
            lines.append(
                f"| {method} | "
                + " | ".join(f"{100 * statistics.fmean(v):.2f}" if v else "-" for v in values)
                + " |"
            )
        lines.append("")
    return "\n".join(lines)
