"""The report inside a fit: the table in the log, the metrics for every logger, the density chart,
and the progress bar over the scoring's loss evaluations."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_prospr.report import SparsityReport, density_figure

__all__ = ["PROGRESS_DELAY", "advance", "publish", "scoring_progress"]

#: Seconds of scoring before the progress bar appears.
PROGRESS_DELAY = 1.0


def publish(report: SparsityReport, trainer: pl.Trainer, verbose: bool, density_plot: bool) -> str | None:
    """Print the table (when `verbose`), log the metrics, and with `density_plot` save the chart (a
    PNG next to the logs, and an image for TensorBoard). Returns the PNG's path, if one was saved."""
    if verbose:
        rank_zero_info(report.table())
    for logger in trainer.loggers:
        logger.log_metrics(report.metrics(), step=trainer.global_step)
    if not (density_plot and trainer.is_global_zero):
        return None
    figure = density_figure(report)
    folder = Path(trainer.log_dir or trainer.default_root_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = str(folder / "prospr_density.png")
    figure.savefig(path, dpi=120)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure("prospr/density", figure, global_step=trainer.global_step)
    return path


def scoring_progress(trainer: pl.Trainer, total: int) -> Any:
    """A bar over the scoring's loss evaluations, shown when the Trainer shows one and scoring
    lasts more than `PROGRESS_DELAY` seconds; `None` otherwise."""
    if total < 1 or trainer.progress_bar_callback is None or not trainer.is_global_zero:
        return None
    return Tqdm(
        total=total, desc="ProsPr scoring", unit="pass", delay=PROGRESS_DELAY, leave=False, file=sys.stderr
    )


def advance(bar: Any) -> None:
    """One loss evaluation done; evaluations past the count (the guard's) leave the bar full."""
    if bar is not None and bar.n < bar.total:
        bar.update(1)
