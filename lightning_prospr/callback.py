"""The Lightning adapter: ProsPr pruning at the start of ``Trainer.fit``, with no change to the module.

Everything numeric lives in the engine (:mod:`~lightning_prospr.scores`,
:mod:`~lightning_prospr.selection`, :mod:`~lightning_prospr.masking`); this module decides where the
batches come from, which loss is differentiated, how ranks agree, and what goes into checkpoints.
"""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lightning_prospr.compat import before_batch_transfer, check_lightning, train_data_source
from lightning_prospr.errors import UnrollError
from lightning_prospr.masking import (
    apply_masks,
    current_masks,
    plain_state_dict,
    remove_masks,
)
from lightning_prospr.pipeline import _example_input as _batch_input
from lightning_prospr.pipeline import batches_needed, check_options, compute_masks
from lightning_prospr.report import SparsityReport, density_figure
from lightning_prospr.rng import isolated_rng
from lightning_prospr.scores import _check_hyperparameters
from lightning_prospr.selection import check_sparsity

__all__ = ["ProsprPruningCallback"]

check_lightning()

#: Seconds of scoring before the progress bar appears.
PROGRESS_DELAY = 1.0


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def _logging_disabled(pl_module: pl.LightningModule) -> Iterator[None]:
    """``self.log`` raises in ``on_fit_start``; silence it while ``training_step`` serves as a loss."""
    pl_module.log = _noop  # type: ignore[method-assign]
    pl_module.log_dict = _noop  # type: ignore[method-assign]
    try:
        yield
    finally:
        del pl_module.log
        del pl_module.log_dict


class ProsprPruningCallback(Callback):
    r"""Prune a LightningModule at initialization with ProsPr, then train it under the masks.

    At ``on_fit_start`` the callback draws batches from the train dataloader the fit uses (a
    ``LightningDataModule``, the module's own ``train_dataloader``, or loaders passed to ``fit``),
    moves them with the strategy (your ``transfer_batch_to_device`` runs), runs ``steps`` unrolled
    SGD steps with your ``training_step`` as the loss, scores each weight by
    :math:`|\partial L_M / \partial c|` and keeps the global top ``1 - sparsity``. The masks are
    registered with :func:`torch.nn.utils.prune.custom_from_mask`, so the optimizers from
    ``configure_optimizers`` keep training the surviving weights and the pruned ones stay exactly 0.

    Args:
        sparsity: fraction of the scored weights to remove, in [0, 1).
        steps: inner SGD steps ``M`` of the unroll; ``0`` is SNIP.
        lr: inner SGD learning rate.
        momentum: inner SGD momentum (as :class:`torch.optim.SGD`).
        weight_decay: inner SGD weight decay.
        first_order: drop the Hessian terms (cheaper in time and memory, for large models).
        recompute: exact full mode in bounded memory: the meta backward pass rebuilds one inner
            step at a time instead of holding all ``M`` (about one extra forward and backward pass
            per step).
        parameters: names (as in ``pl_module.named_parameters()``) of the weights to prune;
            ``None`` prunes every weight matrix that multiplies activations in a watched pass of
            the loss (:mod:`~lightning_prospr.prunable`: Linear, Conv and ConvTranspose weights,
            Hugging Face ``Conv1D``, attention and RNN matrices; not embeddings, biases or norms).
        reuse_batch: use one batch for every inner step and the final loss, instead of a new batch
            per step (``steps + 1`` batches).
        method: ``"prospr"`` (default), or a baseline: ``"snip"``, ``"grasp"``, ``"synflow"``,
            ``"magnitude"``, ``"random"``.
        structured: prune whole output channels (one mask per channel, the classifier excluded).
        rounds: iterative pruning in this many rounds on an exponential density schedule,
            re-scoring the masked network each round; ``None`` is 1 (100 for SynFlow).
        num_batches: average the scores of this many independent unrolls, each on new batches.
        layer_floor: the layer-collapse guard's minimum of weights kept per layer (0: none).
        keep_connected: the guard also keeps every layer on an input-to-output path of kept
            weights (needs the input: the batch's first tensor or ``example_input_array``).
        seed: seed of ``method="random"``.
        make_permanent: at the end of ``fit``, bake the masks into the weights and remove the
            re-parametrization (plain ``weight`` parameters with zeros), like Lightning's
            ``ModelPruning(make_pruning_permanent=True)``.
        density_plot: save a bar chart of the per-layer density as ``prospr_density.png`` in the
            log directory, and send it to TensorBoard loggers (needs matplotlib).
        verbose: print the per-layer table on rank 0.

    The loss is ``training_step(batch, batch_idx)`` (a tensor or a dict with ``"loss"``; ``self.log``
    calls are ignored during scoring). A module may instead define
    ``prospr_loss(self, batch, batch_idx) -> Tensor``, which is then used; modules with
    ``automatic_optimization = False`` must.

    Under DDP, rank ``r`` of ``W`` takes batches ``r, r + W, ...`` of the loader, scores are summed
    over ranks, and every rank applies rank 0's masks. The masks are saved in the callback's state:
    resuming with ``fit(ckpt_path=...)`` re-applies them without scoring again, and a second ``fit``
    with the same callback keeps them (it never prunes twice). The module's ``state_dict`` holds
    the effective (masked) ``weight`` tensors, so every checkpoint, also a weights-only one, loads
    into the plain module without the callback. (Lightning itself cannot resume ``fit`` from a
    weights-only checkpoint: it has no optimizer state.)

    Example::

        trainer = Trainer(callbacks=[ProsprPruningCallback(sparsity=0.9)])
        trainer.fit(model, datamodule=dm)
    """

    def __init__(
        self,
        sparsity: float,
        steps: int = 3,
        lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        first_order: bool = False,
        recompute: bool = False,
        parameters: list[str] | None = None,
        reuse_batch: bool = False,
        method: str = "prospr",
        structured: bool = False,
        rounds: int | None = None,
        num_batches: int = 1,
        layer_floor: int = 1,
        keep_connected: bool = True,
        seed: int = 0,
        make_permanent: bool = False,
        density_plot: bool = False,
        verbose: bool = True,
    ) -> None:
        check_sparsity(sparsity)
        _check_hyperparameters(steps, lr, momentum, weight_decay)
        check_options(method, structured, rounds, num_batches, layer_floor)
        if parameters is not None and (isinstance(parameters, str) or not parameters):
            raise ValueError(
                f"`parameters` must be a non-empty list of parameter names or None, got {parameters!r}."
            )
        self.sparsity = float(sparsity)
        self.steps = steps
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.first_order = bool(first_order)
        self.recompute = bool(recompute)
        self.parameters = list(parameters) if parameters is not None else None
        self.reuse_batch = bool(reuse_batch)
        self.method = method
        self.structured = bool(structured)
        self.rounds = rounds
        self.num_batches = num_batches
        self.layer_floor = layer_floor
        self.keep_connected = bool(keep_connected)
        self.seed = seed
        self.make_permanent = bool(make_permanent)
        self.density_plot = bool(density_plot)
        self.density_plot_path: str | None = None
        self.verbose = bool(verbose)
        self._masks: dict[str, Tensor] | None = None
        self._handles: list[RemovableHandle] = []
        self.report: SparsityReport | None = None

    # ------------------------------------------------------------------ public state

    @property
    def masks(self) -> dict[str, Tensor] | None:
        """The keep-masks (``{parameter name: bool tensor}``) once computed or restored, else None."""
        return self._masks

    @property
    def description(self) -> str:
        """A short description of the scoring run, e.g. ``"ProsPr M=3, lr=0.1, full"``."""
        extras = []
        if self.structured:
            extras.append("structured")
        if (self.rounds or 1) > 1 and self.method != "synflow":
            extras.append(f"{self.rounds} rounds")
        if self.num_batches > 1:
            extras.append(f"{self.num_batches} unrolls")
        if (self.method == "prospr" and self.steps == 0) or self.method == "snip":
            text = "SNIP (M=0)"
        elif self.method == "prospr":
            text = f"ProsPr M={self.steps}, lr={self.lr:g}, {'first-order' if self.first_order else 'full'}"
        else:
            text = {"grasp": "GraSP", "synflow": f"SynFlow, {self.rounds or 100} rounds"}.get(
                self.method, self.method
            )
        return ", ".join([text, *extras])

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            _check_strategy(trainer.strategy)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._masks is None:
            self._masks = self._compute_masks(trainer, pl_module)
        else:
            self._check_restored(pl_module)
            if self.report is None:
                self.report = SparsityReport.from_masks(self._masks, method=f"{self.description}, restored")
        # A second fit, or a resume in the same process, finds our masks in place: swap them for the
        # ones we hold (weights untouched), so they are never applied twice.
        self._take_off(pl_module, bake=False)
        device = next(pl_module.parameters()).device
        apply_masks(pl_module, {n: m.to(device) for n, m in self._masks.items()})
        self._handles = plain_state_dict(pl_module, list(self._masks))
        self._report(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.make_permanent:
            self._take_off(pl_module, bake=True)

    def _take_off(self, pl_module: pl.LightningModule, bake: bool) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._masks is not None:
            remove_masks(pl_module, list(self._masks), bake=bake)

    def state_dict(self) -> dict[str, Any]:
        if self._masks is None:
            return {}
        return {"masks": {n: m.detach().cpu() for n, m in self._masks.items()}, "sparsity": self.sparsity}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "masks" in state_dict:
            self._masks = {n: m.bool() for n, m in state_dict["masks"].items()}
            self.report = None

    # ------------------------------------------------------------------ helpers

    def _check_restored(self, pl_module: pl.LightningModule) -> None:
        assert self._masks is not None
        named = dict(pl_module.named_parameters())
        missing = [n for n in self._masks if n not in named and f"{n}_orig" not in named]
        if missing:
            raise MisconfigurationException(
                f"ProsprPruningCallback restored masks for {missing}, which this module does not have "
                "as parameters; resume with the same model architecture as the checkpoint."
            )

    def _compute_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        within = current_masks(pl_module)  # masks the module carried already: nest inside them
        custom = getattr(pl_module, "prospr_loss", None)
        if custom is None and not pl_module.automatic_optimization:
            raise MisconfigurationException(
                f"{type(pl_module).__name__} uses manual optimization (automatic_optimization = False), "
                "so its training_step cannot serve as the ProsPr loss: define "
                "`prospr_loss(self, batch, batch_idx) -> Tensor` on the module."
            )
        start = time.perf_counter()
        with isolated_rng():
            batches = self._draw_batches(trainer, pl_module)
            per_unroll = self.steps + 1 + (self.steps if self.recompute and not self.first_order else 0)
            passes = {"prospr": per_unroll, "snip": 1, "grasp": 2}.get(self.method, 0)
            # + 1: the pass that finds the default set of weights
            bar = self._progress(trainer, passes * self.num_batches * (self.rounds or 1) + 1)
            loss_fn = _ModuleLoss(trainer, custom is not None, bar)

            def sum_over_ranks(scores: dict[str, Tensor]) -> dict[str, Tensor]:
                if trainer.world_size == 1:
                    return scores
                return {n: trainer.strategy.reduce(v, reduce_op="sum") for n, v in scores.items()}

            try:
                with _logging_disabled(pl_module):
                    result = compute_masks(
                        pl_module,
                        loss_fn,
                        batches,
                        self.sparsity,
                        method=self.method,
                        steps=self.steps,
                        lr=self.lr,
                        momentum=self.momentum,
                        weight_decay=self.weight_decay,
                        first_order=self.first_order,
                        recompute=self.recompute,
                        parameters=self.parameters,
                        structured=self.structured,
                        rounds=self.rounds,
                        num_batches=self.num_batches,
                        layer_floor=self.layer_floor,
                        keep_connected=self.keep_connected,
                        example_input=_example_input(pl_module, batches[0][1]),
                        within=within,
                        seed=self.seed,
                        score_hook=sum_over_ranks,
                    )
            finally:
                if bar is not None:
                    bar.close()
        masks = result.masks
        if trainer.world_size > 1:
            masks = trainer.strategy.broadcast(masks, src=0)
        if result.guard.changed:
            rank_zero_warn(
                "ProsprPruningCallback: the layer-collapse guard changed the plain top-k to keep every layer "
                f"alive and connected ({result.guard.summary()}); pass layer_floor=0, keep_connected=False "
                "for plain top-k."
            )
        self.report = SparsityReport.from_masks(
            masks, time.perf_counter() - start, self.description, result.channel_masks, result.macs
        )
        return masks

    def _draw_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[tuple[int, Any]]:
        """The batches the scoring needs (1 with ``reuse_batch``) for this rank, moved to the device."""
        loader = _train_dataloader(trainer)
        count = (
            1 if self.reuse_batch else batches_needed(self.method, self.steps, self.num_batches, self.rounds)
        )
        rank, world = trainer.global_rank, trainer.world_size
        raw = list(itertools.islice(_iter_batches(loader), rank, rank + world * count, world))
        if not raw:
            raise MisconfigurationException(
                f"The train dataloader gave no batch for ProsPr scoring on rank {rank}; it needs "
                f"at least {world} batch(es) ({count} per rank wanted; fewer are cycled)."
            )
        moved = []
        for i in range(count):
            batch = raw[i % len(raw)]
            batch = trainer.precision_plugin.convert_input(batch)
            batch = before_batch_transfer(pl_module, batch)
            batch = trainer.strategy.batch_to_device(batch, dataloader_idx=0)
            moved.append((i, batch))
        return moved

    def _report(self, trainer: pl.Trainer) -> None:
        assert self.report is not None
        if self.verbose:
            rank_zero_info(self.report.table())
        for logger in trainer.loggers:
            logger.log_metrics(self.report.metrics(), step=trainer.global_step)
        if self.density_plot and trainer.is_global_zero:
            self._plot(trainer)

    def _plot(self, trainer: pl.Trainer) -> None:
        """The per-layer density chart: a PNG next to the logs, and an image for TensorBoard."""
        assert self.report is not None
        figure = density_figure(self.report)
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.density_plot_path = str(folder / "prospr_density.png")
        figure.savefig(self.density_plot_path, dpi=120)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("prospr/density", figure, global_step=trainer.global_step)

    def _progress(self, trainer: pl.Trainer, total: int) -> Any:
        """A bar over the scoring's loss evaluations, shown when the Trainer shows one and scoring
        lasts more than ``PROGRESS_DELAY`` seconds; ``None`` otherwise."""
        if total < 1 or trainer.progress_bar_callback is None or not trainer.is_global_zero:
            return None
        return Tqdm(
            total=total,
            desc="ProsPr scoring",
            unit="pass",
            delay=PROGRESS_DELAY,
            leave=False,
            file=sys.stderr,
        )


def _check_strategy(strategy: Any) -> None:
    """Refuse, before any work, the strategies that shard the parameters (FSDP, DeepSpeed,
    ModelParallel): scoring substitutes whole parameters into the module, which a sharded module
    does not hold, and FSDP cannot differentiate twice (full and recompute mode)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
        raise MisconfigurationException(
            f"ProsprPruningCallback does not support {type(strategy).__name__}: it shards the parameters, "
            "and scoring needs each rank to hold whole ones (FSDP also cannot differentiate twice, which "
            "full and recompute mode do). Supported: a single device and DDP (strategy='ddp', "
            "'ddp_spawn', 'ddp_fork', ...), in every mode: train the pruned model with one of them."
        )


class _ModuleLoss:
    """The scoring loss of a LightningModule: ``training_step`` (or ``prospr_loss``) on a
    ``(batch_idx, batch)`` item, under the precision plugin's autocast, as one tensor.

    Whether that tensor is a finite scalar with a gradient is checked by the engine, which calls
    it ``training_step`` (or ``prospr_loss``) in its messages (:attr:`source`).
    """

    def __init__(self, trainer: pl.Trainer, custom: bool, bar: Any) -> None:
        self.precision = trainer.precision_plugin
        self.custom = custom
        self.bar = bar
        self.source = "prospr_loss" if custom else "training_step"

    def __call__(self, model: Any, item: tuple[int, Any]) -> Any:
        batch_idx, batch = item
        if self.bar is not None and self.bar.n < self.bar.total:
            self.bar.update(1)
        with self.precision.train_step_context():
            out = (
                model.prospr_loss(batch, batch_idx) if self.custom else model.training_step(batch, batch_idx)
            )
        if isinstance(out, Mapping):
            if "loss" not in out:
                raise UnrollError(
                    f"{self.source} returned a dict without a 'loss' key (keys: {list(out)}) on batch "
                    f"{batch_idx} of ProsPr scoring; return the loss under 'loss' or define "
                    "`prospr_loss(self, batch, batch_idx)` on the module."
                )
            out = out["loss"]
        if out is None:
            raise UnrollError(
                f"{self.source} returned None on batch {batch_idx} of ProsPr scoring, so there is no loss "
                "to differentiate; make it return the loss for every batch, or define "
                "`prospr_loss(self, batch, batch_idx)` on the module."
            )
        return out


def _train_dataloader(trainer: pl.Trainer) -> Any:
    """The train dataloader(s) of whichever source this fit uses (datamodule, module or ``fit`` arg)."""
    source = train_data_source(trainer)
    if source is None or not source.is_defined():
        raise MisconfigurationException(
            "ProsprPruningCallback found no train dataloader: pass `train_dataloaders` or a "
            "`datamodule` to `Trainer.fit`, or define `train_dataloader` on the module."
        )
    return source.dataloader()


def _iter_batches(loader: Any) -> Iterable[Any]:
    """Batches of a loader, or of a collection of loaders combined the way the fit loop does."""
    if isinstance(loader, (Mapping, list, tuple)):
        combined = CombinedLoader(loader, mode="max_size_cycle")
        return (batch for batch, _, _ in combined)
    return loader


def _example_input(pl_module: pl.LightningModule, batch: Any) -> Tensor | None:
    """The model's input for data-free checks: ``example_input_array``, else the batch's first tensor."""
    example = getattr(pl_module, "example_input_array", None)
    if isinstance(example, Tensor):
        return example.to(pl_module.device)
    return _batch_input(batch)
