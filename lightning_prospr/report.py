"""Per-layer sparsity: a summary that prints as an aligned table and flattens into logger metrics."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = ["LayerSparsity", "SparsityReport", "density_figure"]


@dataclass(frozen=True)
class LayerSparsity:
    """Kept and total weights of one pruned tensor; for structured pruning also its output channels
    and the multiply-accumulates per sample of the dense layer (`macs`, 0 when unknown); the kept
    weights that lie on an input-to-output path (`effective_kept`, `None` when unknown; see
    [`effective`][lightning_prospr.effective])."""

    name: str
    kept: int
    total: int
    channels_kept: int = 0
    channels_total: int = 0
    macs: int = 0
    effective_kept: int | None = None

    @property
    def density(self) -> float:
        """Fraction kept."""
        return self.kept / self.total if self.total else 1.0

    @property
    def sparsity(self) -> float:
        """Fraction removed."""
        return 1.0 - self.density

    @property
    def effective_sparsity(self) -> float | None:
        """Fraction removed or cut off from every input-to-output path."""
        if self.effective_kept is None:
            return None
        return 1.0 - self.effective_kept / self.total if self.total else 0.0


@dataclass(frozen=True)
class SparsityReport:
    """What a pruning run did: per-layer counts, how long scoring took, and how it was scored."""

    layers: tuple[LayerSparsity, ...]
    seconds: float = 0.0
    method: str = ""
    #: `(parameters before, after)` when the pruned channels were removed physically (`shrink`).
    shrunk: tuple[int, int] | None = None

    @classmethod
    def from_masks(
        cls,
        masks: Mapping[str, Tensor],
        seconds: float = 0.0,
        method: str = "",
        channel_masks: Mapping[str, Tensor] | None = None,
        macs: Mapping[str, int] | None = None,
        effective: Mapping[str, Tensor] | None = None,
    ) -> SparsityReport:
        """Count kept weights in `{name: bool mask}` (and kept channels, for structured masks; and
        effective weights, given the on-path masks `effective`)."""
        channel_masks = channel_masks or {}
        layers = tuple(
            LayerSparsity(
                name,
                int(mask.count_nonzero()),
                mask.numel(),
                int(channel_masks[name].count_nonzero()) if name in channel_masks else 0,
                channel_masks[name].numel() if name in channel_masks else 0,
                int((macs or {}).get(name, 0)),
                int(effective[name].count_nonzero()) if effective is not None else None,
            )
            for name, mask in masks.items()
        )
        return cls(layers, seconds, method)

    @property
    def structured(self) -> bool:
        return any(layer.channels_total for layer in self.layers)

    def dense_rebuild(self) -> dict[str, float]:
        """Weights and multiply-accumulates per sample of the pruned layers, before and after a dense
        re-build that drops the removed output channels.

        Counted per layer from its own output channels only: a layer with `k` of `n` channels
        kept keeps `k / n` of its weights and of its MACs (`out_elements x fan_in` per sample).
        The matching input channels of the next layer, biases and norm layers are not counted, so
        the reduction is a lower bound of what a re-build gets.
        """
        before = sum(layer.total for layer in self.layers)
        after = sum(layer.kept for layer in self.layers)
        macs_before = sum(layer.macs for layer in self.layers)
        macs_after = sum(
            layer.macs * layer.channels_kept / layer.channels_total
            for layer in self.layers
            if layer.channels_total
        )
        return {"weights": before, "weights_kept": after, "macs": macs_before, "macs_kept": macs_after}

    @property
    def kept(self) -> int:
        return sum(layer.kept for layer in self.layers)

    @property
    def total(self) -> int:
        return sum(layer.total for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Global fraction removed over all pruned tensors."""
        return 1.0 - self.kept / self.total if self.total else 0.0

    @property
    def effective_sparsity(self) -> float | None:
        """Global fraction removed or cut off from every input-to-output path (`None` when unknown)."""
        if not self.layers or any(layer.effective_kept is None for layer in self.layers):
            return None
        kept = sum(layer.effective_kept or 0 for layer in self.layers)
        return 1.0 - kept / self.total if self.total else 0.0

    def metrics(self, prefix: str = "prospr") -> dict[str, float]:
        """Flat metrics for loggers: global and per-layer sparsity (nominal, and effective when
        known), and scoring seconds."""
        out = {f"{prefix}/sparsity": self.sparsity, f"{prefix}/scoring_seconds": self.seconds}
        out.update({f"{prefix}/sparsity/{layer.name}": layer.sparsity for layer in self.layers})
        if self.effective_sparsity is not None:
            out[f"{prefix}/effective_sparsity"] = self.effective_sparsity
            out.update(
                {
                    f"{prefix}/effective_sparsity/{layer.name}": float(layer.effective_sparsity or 0.0)
                    for layer in self.layers
                }
            )
        if self.shrunk is not None:
            out[f"{prefix}/parameters_before"], out[f"{prefix}/parameters_after"] = map(float, self.shrunk)
        if self.structured:
            rebuild = self.dense_rebuild()
            out[f"{prefix}/weights_kept_fraction"] = rebuild["weights_kept"] / max(1, rebuild["weights"])
            if rebuild["macs"]:
                out[f"{prefix}/macs_kept_fraction"] = rebuild["macs_kept"] / rebuild["macs"]
        return out

    def table(self) -> str:
        """An aligned, human-readable table with a totals row."""
        header: tuple[str, ...] = ("", "Layer", "Kept", "Total", "Density")
        rows: list[tuple[str, ...]] = [
            (str(i), layer.name, f"{layer.kept:,}", f"{layer.total:,}", f"{100 * layer.density:.2f} %")
            for i, layer in enumerate(self.layers)
        ]
        total_row: tuple[str, ...] = (
            "",
            "Total",
            f"{self.kept:,}",
            f"{self.total:,}",
            f"{100 * (1 - self.sparsity):.2f} %",
        )
        if self.effective_sparsity is not None:
            header = (*header, "Effective")
            rows = [
                (*row, f"{100 * (1 - (layer.effective_sparsity or 0.0)):.2f} %")
                for row, layer in zip(rows, self.layers, strict=True)
            ]
            total_row = (*total_row, f"{100 * (1 - self.effective_sparsity):.2f} %")
        if self.structured:
            header = (*header, "Channels")
            rows = [
                (*row, f"{layer.channels_kept}/{layer.channels_total}")
                for row, layer in zip(rows, self.layers, strict=True)
            ]
            channels = (
                sum(la.channels_kept for la in self.layers),
                sum(la.channels_total for la in self.layers),
            )
            total_row = (*total_row, f"{channels[0]}/{channels[1]}")
        widths = [max(len(r[c]) for r in (header, *rows, total_row)) for c in range(len(header))]
        right = set(range(2, len(header)))

        def fmt(row: tuple[str, ...]) -> str:
            cells = [
                cell.rjust(w) if c in right else cell.ljust(w)
                for c, (cell, w) in enumerate(zip(row, widths, strict=True))
            ]
            return " | ".join(cells).rstrip()

        line = "-" * len(fmt(header))
        title = f"ProsPr pruning{f' ({self.method})' if self.method else ''}"
        lines = [title, fmt(header), line, *map(fmt, rows), line, fmt(total_row)]
        effective = self.effective_sparsity
        lines.append(
            f"Global sparsity: {100 * self.sparsity:.2f} %"
            + (f"   Effective: {100 * effective:.2f} %" if effective is not None else "")
            + f"   Scoring time: {self.seconds:.2f} s"
        )
        if effective is not None:
            lines.append(
                "Effective: kept weights on an input-to-output path (the others carry nothing; "
                "Vysogorets & Kempe, 2021)."
            )
        if self.structured:
            rebuild = self.dense_rebuild()
            text = f"Dense re-build: weights {rebuild['weights']:,} -> {rebuild['weights_kept']:,}"
            if rebuild["macs"]:
                text += f", MACs per sample {rebuild['macs']:,.0f} -> {rebuild['macs_kept']:,.0f}"
            lines.append(text + " (own output channels only; a lower bound on the saving)")
        if self.shrunk is not None:
            before, after = self.shrunk
            lines.append(
                f"Shrunk: the pruned channels removed, parameters {before:,} -> {after:,} "
                f"({100 * after / max(1, before):.1f} %)"
            )
        return "\n".join(lines)


def density_figure(report: SparsityReport) -> Any:
    """A bar chart of the density kept in each layer (matplotlib `Figure`; needs matplotlib)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - matplotlib is in the examples/dev extras
        raise ImportError(
            "The density chart needs matplotlib: `pip install matplotlib`, or set density_plot=False."
        ) from err
    names = [layer.name for layer in report.layers]
    density = [100 * layer.density for layer in report.layers]
    fig = Figure(figsize=(max(6.0, 0.35 * len(names) + 2), 4.2), layout="constrained")
    ax = fig.add_subplot()
    bars = ax.bar(range(len(names)), density, color="#4C72B0")
    overall = 100 * (1 - report.sparsity)
    ax.axhline(overall, color="#C44E52", linestyle="--", linewidth=1, label=f"overall {overall:.2f} %")
    ax.set_yscale("log")
    ax.set_ylabel("weights kept (%)")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_title(f"Per-layer density{f' ({report.method})' if report.method else ''}", fontsize=10)
    ax.legend(loc="best", fontsize=8)
    ax.bar_label(bars, labels=[f"{d:.2g}" for d in density], fontsize=7, padding=2)
    return fig
