"""The Lightning adapter: ProsPr pruning at the start of `Trainer.fit`, with no change to the module.

Everything numeric lives in the engine ([`compute_masks`][lightning_prospr.pipeline.compute_masks]);
the callback builds its [`PruningSettings`][lightning_prospr.settings.PruningSettings], takes the
batches and the loss from the fit ([`lightning_data`][lightning_prospr.lightning_data],
[`lightning_loss`][lightning_prospr.lightning_loss]), lets the ranks agree
([`strategies`][lightning_prospr.strategies]), and keeps the masks in checkpoints.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from lightning_prospr.compat import check_lightning
from lightning_prospr.lightning_data import draw_batches, example_input
from lightning_prospr.lightning_loss import ModuleLoss, logging_disabled
from lightning_prospr.lightning_report import advance, publish, scoring_progress
from lightning_prospr.lightning_shrink import (
    check_shrink_options,
    shrink_before_load,
    shrink_in_fit,
    stop_shrink_before_load,
)
from lightning_prospr.masking import apply_masks, plain_state_dict, remove_masks
from lightning_prospr.pipeline import compute_masks
from lightning_prospr.report import SparsityReport
from lightning_prospr.rng import isolated_rng
from lightning_prospr.settings import PruningSettings
from lightning_prospr.strategies import agree_on_masks, check_strategy, sum_over_ranks

__all__ = ["ProsprPruningCallback"]

check_lightning()


class ProsprPruningCallback(Callback):
    """Prune a LightningModule at initialization with ProsPr, then train it under the masks.

    At `on_fit_start` the callback draws batches from the train dataloader the fit uses (a
    `LightningDataModule`, the module's own `train_dataloader`, or loaders passed to `fit`), moves
    them with the strategy (your `transfer_batch_to_device` runs), runs `steps` unrolled SGD steps
    with your `training_step` as the loss, scores each weight by $|\\partial L_M / \\partial c|$ and
    keeps the global top `1 - sparsity`. The masks are registered with
    `torch.nn.utils.prune.custom_from_mask`, so the optimizers from `configure_optimizers` keep
    training the surviving weights and the pruned ones stay exactly 0.

    Args:
        sparsity: fraction of the scored weights to remove, in [0, 1).
        method: `"prospr"` (default), or a baseline: `"snip"`, `"grasp"`, `"synflow"`,
            `"magnitude"`, `"random"` ([`METHODS`][lightning_prospr.methods.METHODS]).
        steps: ProsPr's inner SGD steps $M \\ge 1$.
        lr: ProsPr's inner learning rate.
        momentum: ProsPr's inner momentum (as `torch.optim.SGD`).
        weight_decay: ProsPr's inner weight decay.
        mode: `"full"` (the exact meta-gradient), `"first_order"` (no Hessian terms: cheaper in
            time and memory, for large models) or `"recompute"` (the exact meta-gradient in bounded
            memory, rebuilding one inner step at a time).
        parameters: names (as in `pl_module.named_parameters()`) of the weights to prune; `None`
            prunes every weight matrix that multiplies activations in a watched pass of the loss
            ([`prunable`][lightning_prospr.prunable]: Linear, Conv and ConvTranspose weights,
            Hugging Face `Conv1D`, attention and RNN matrices; not embeddings, biases or norms).
        structured: prune whole output channels (one mask per channel, the classifier excluded).
        head_sparsity: with `structured=True`, the fraction of each attention module's heads to
            remove, apart from `sparsity` (which then counts the other channels); `None`: heads
            compete as channel groups
            ([`PruningSettings`][lightning_prospr.settings.PruningSettings]).
        allocation: the layer densities: `"global"` (one top-k over all layers), `"uniform"` (the
            same density in every layer), `"erk"` (RigL's Erdős–Rényi-Kernel rule) or
            `"balanced"` (the same number of weights in every layer); the scores choose within
            each layer ([`allocation`][lightning_prospr.allocation]).
        spread: with a per-layer `allocation`, spread each layer's kept weights evenly over its
            output units, so that none is left empty
            ([`spread_ranks`][lightning_prospr.selection.spread_ranks]).
        pattern: `"N:M"` semi-structured masks, e.g. `"2:4"` for sparse tensor cores (N of every M
            consecutive weights along each layer's input dimension;
            [`semi_structured`][lightning_prospr.semi_structured]); `sparsity` must be $1 - N/M$,
            with `guard="off"`.
        rounds: iterative pruning in this many rounds on an exponential density schedule,
            re-scoring the masked network each round; `None`: 1, and 100 for SynFlow (the report's
            description says which).
        unrolls: ProsPr and SNIP: average the scores of this many independent unrolls, each on
            new batches.
        grasp_batches: GraSP: sum its loss over this many batches.
        guard: the layer-collapse guard: `"connected"` (every layer keeps `layer_floor` weights and
            a path from the input to the loss), `"floor"` (the floor only) or `"off"` (plain top-k).
        layer_floor: the guard's minimum of weights kept per layer.
        seed: seed of `method="random"`.
        reuse_batch: use one batch for every inner step and the final loss, instead of a new batch
            per step (`steps + 1` batches); not for the data-free methods.
        shrink: with `structured=True`, remove the pruned channels physically before training
            ([`shrink`][lightning_prospr.shrinking.shrink]): a smaller dense network, trained with
            optimizers that `configure_optimizers` makes again for it. Checkpoints hold the small
            network; `fit(ckpt_path=...)` shrinks the fresh module the same way before loading.
        make_permanent: at the end of `fit`, bake the masks into the weights and remove the
            re-parametrization (plain `weight` parameters with zeros), like Lightning's
            `ModelPruning(make_pruning_permanent=True)`.
        density_plot: save a bar chart of the per-layer density as `prospr_density.png` in the log
            directory, and send it to TensorBoard loggers (needs matplotlib).
        verbose: print the per-layer table on rank 0.

    The loss is `training_step(batch, batch_idx)` (a tensor or a dict with `"loss"`; `self.log`
    calls are ignored during scoring). A module may instead define
    `prospr_loss(self, batch, batch_idx) -> Tensor`, which is then used; modules with
    `automatic_optimization = False` must.

    Under DDP, rank `r` of `W` takes batches `r, r + W, ...` of the loader, scores are summed over
    ranks, and every rank applies rank 0's masks. The masks are saved in the callback's state:
    resuming with `fit(ckpt_path=...)` re-applies them without scoring again, and a second `fit`
    with the same callback keeps them (it never prunes twice). The module's `state_dict` holds the
    effective (masked) `weight` tensors, so every checkpoint, also a weights-only one, loads into the
    plain module without the callback.

    Example:
        ```python
        trainer = Trainer(callbacks=[ProsprPruningCallback(sparsity=0.9)])
        trainer.fit(model, datamodule=dm)
        ```
    """

    def __init__(
        self,
        sparsity: float,
        method: str = "prospr",
        steps: int = 3,
        lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        mode: str = "full",
        parameters: list[str] | None = None,
        structured: bool = False,
        head_sparsity: float | None = None,
        allocation: str = "global",
        spread: bool = False,
        pattern: str | None = None,
        rounds: int | None = None,
        unrolls: int = 1,
        grasp_batches: int = 1,
        guard: str = "connected",
        layer_floor: int = 1,
        seed: int = 0,
        reuse_batch: bool = False,
        shrink: bool = False,
        make_permanent: bool = False,
        density_plot: bool = False,
        verbose: bool = True,
    ) -> None:
        self.settings = PruningSettings(
            sparsity, method, steps, lr, momentum, weight_decay, mode, parameters, structured,
            allocation, pattern, rounds, unrolls, grasp_batches, guard, layer_floor, seed,
            head_sparsity, spread,
        )  # fmt: skip
        if reuse_batch and not self.settings.method_spec.data:
            raise ValueError(
                f"`reuse_batch` does not apply to the data-free method={method!r}; leave it False."
            )
        check_shrink_options(shrink, structured, make_permanent)
        self.reuse_batch = bool(reuse_batch)
        self.shrink = bool(shrink)
        self.make_permanent = bool(make_permanent)
        self.density_plot = bool(density_plot)
        self.density_plot_path: str | None = None
        self.verbose = bool(verbose)
        self._masks: dict[str, Tensor] | None = None
        self._channel_masks: dict[str, Tensor] = {}
        self._shrunk = False
        self._handles: list[RemovableHandle] = []
        self.report: SparsityReport | None = None

    @property
    def masks(self) -> dict[str, Tensor] | None:
        """The keep-masks (`{parameter name: bool tensor}`) once computed or restored, else None."""
        return self._masks

    @property
    def description(self) -> str:
        """The run in one line, every default spelled out
        ([`describe`][lightning_prospr.settings.PruningSettings.describe])."""
        return self.settings.describe()

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_strategy(trainer.strategy, shrink=self.shrink)
            if self.shrink and not self._shrunk:
                shrink_before_load(trainer, pl_module, self.state_key, self._restored_shrunk)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        stop_shrink_before_load(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stop_shrink_before_load(pl_module)
        if self._shrunk:  # a resume: the module was shrunk before the checkpoint's tensors loaded
            self._report(trainer)
            return
        if self._masks is None:
            self._masks = self._compute_masks(trainer, pl_module)
            if self.shrink:
                shrunk = shrink_in_fit(trainer, pl_module, self._channel_masks)
                self._shrunk, self._masks = True, {}  # nothing left to mask
                assert self.report is not None
                self.report = replace(self.report, shrunk=shrunk)
                self._report(trainer)
                return
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

    def state_dict(self) -> dict[str, Any]:
        if self._masks is None:
            return {}
        state: dict[str, Any] = {
            "masks": {n: m.detach().cpu() for n, m in self._masks.items()},
            "sparsity": self.settings.sparsity,
        }
        if self._shrunk:  # what rebuilds the small network's shape: the removed channels
            state["channel_masks"] = {n: m.detach().cpu() for n, m in self._channel_masks.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "masks" in state_dict and not self._shrunk:
            self._masks = {n: m.bool() for n, m in state_dict["masks"].items()}
            self.report = None

    # ------------------------------------------------------------------ helpers

    def _take_off(self, pl_module: pl.LightningModule, bake: bool) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._masks is not None:
            remove_masks(pl_module, list(self._masks), bake=bake)

    def _restored_shrunk(self, channel_masks: dict[str, Tensor]) -> None:
        """The module was shrunk as the checkpoint's was (a resume)."""
        self._channel_masks, self._shrunk, self._masks = channel_masks, True, {}
        self.report = SparsityReport.from_masks({}, method=f"{self.description}, shrunk, restored")

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
        start = time.perf_counter()
        loss_fn = ModuleLoss(trainer, pl_module)
        bar = scoring_progress(trainer, self.settings.loss_passes + 1)  # + 1: the pass finding the weights
        loss_fn.on_call = lambda: advance(bar)
        with isolated_rng():
            batches = draw_batches(
                trainer, pl_module, 1 if self.reuse_batch else self.settings.batches_per_run
            )
            try:
                with logging_disabled(pl_module):
                    result = compute_masks(
                        pl_module,
                        loss_fn,
                        batches,
                        self.settings,
                        example_input=example_input(pl_module, batches[0][1]),
                        score_hook=sum_over_ranks(trainer),
                    )
            finally:
                if bar is not None:
                    bar.close()
        masks = agree_on_masks(trainer, result.masks)
        if result.guard.changed:
            rank_zero_warn(
                "ProsprPruningCallback: the layer-collapse guard changed the plain top-k to keep every layer "
                f"alive and connected ({result.guard.summary()}); pass guard='off' for plain top-k."
            )
        effective = result.effective.masks if result.effective is not None else None
        self.report = SparsityReport.from_masks(
            masks, time.perf_counter() - start, self.description, result.channel_masks, result.macs, effective
        )
        self._channel_masks = agree_on_masks(trainer, result.channel_masks)
        return {**masks, **agree_on_masks(trainer, result.coupled)}

    def _report(self, trainer: pl.Trainer) -> None:
        assert self.report is not None
        path = publish(self.report, trainer, self.verbose, self.density_plot)
        self.density_plot_path = path or self.density_plot_path
