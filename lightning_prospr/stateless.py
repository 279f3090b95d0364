"""The user's loss as a function of given tensors: `loss(params, batch)`, the model untouched."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

from lightning_prospr.execution import scoring_execution

__all__ = ["LossFn", "StatelessLoss"]

#: `loss_fn(model, batch) -> loss`: a scalar tensor, or a dict with a `"loss"` entry.
LossFn = Callable[[nn.Module, Any], Any]


class _LossModule(nn.Module):
    """Holds the user's model as a child so one `functional_call` substitutes its tensors."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch: Any) -> Any:
        return self._loss_fn(self.model, batch)


class StatelessLoss:
    """`loss_fn(model, batch)` evaluated with the model's tensors replaced by given ones.

    Args:
        model: any `nn.Module`; it is not modified.
        loss_fn: `loss_fn(model, batch) -> loss`. Inside the call `model`'s parameters and buffers
            are the tensors passed to `__call__`.
        buffers: the buffers to use (for example clones of the model's BatchNorm statistics, so that
            train-mode updates land on the clones and not on the model).
        multipliers: optional fixed factors (e.g. keep-masks) by parameter name: the model sees
            `params[name] * multipliers[name]` on every call.
        second_order: the loss will be differentiated twice: run attention with its math backend
            and every operator in a twice-differentiable form
            ([`scoring_execution`][lightning_prospr.execution.scoring_execution]).

    The model always runs eagerly and without activation checkpointing inside the call.
    `loss_fn.source` and `loss_fn.hint`, where it has them, name the loss in error messages and end
    them with advice (the callback's loss: `"training_step"`, "or define `prospr_loss`").
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        buffers: Mapping[str, Tensor],
        multipliers: Mapping[str, Tensor] | None = None,
        second_order: bool = False,
    ) -> None:
        self._second_order = second_order
        self._module = _LossModule(model, loss_fn)
        self.source: str = getattr(loss_fn, "source", "loss_fn")
        self.hint: str = getattr(loss_fn, "hint", "")
        self._buffers = {f"model.{name}": b for name, b in buffers.items()}
        self._multipliers = dict(multipliers or {})

    def __call__(self, params: Mapping[str, Tensor], batch: Any) -> Any:
        tensors = dict(self._buffers)
        for name, t in params.items():
            factor = self._multipliers.get(name)
            tensors[f"model.{name}"] = t if factor is None else t * factor
        with scoring_execution(second_order=self._second_order, model=self._module.model):
            return functional_call(self._module, tensors, (batch,), tie_weights=True, strict=False)
