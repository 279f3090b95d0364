"""How the model runs while it is scored: eagerly, without activation checkpointing.

Scoring calls the model through `torch.func.functional_call()` with the unrolled tensors
substituted for its parameters, and differentiates the result once or twice. Three features that
speed up or slim down *training* break that, and are switched off for the scoring forward passes
only (training afterwards uses them as before):

- `torch.compile`: its AOTAutograd graphs cannot be differentiated twice
  (`eager_execution()`);
- activation checkpointing (`torch.utils.checkpoint`): the segment's forward pass is re-run
  during the backward pass, after `functional_call` has put the model's own parameters back, so
  the gradients would be those of the wrong weights (`without_activation_checkpointing()`);
- fused attention kernels, which have no double backward (`twice_differentiable_attention()`);
- every other operator whose backward PyTorch cannot differentiate again: an equal-valued form
  that it can, the native kernel instead of cuDNN's, or a clear error before any work is lost
  (`twice_differentiable_ops()`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_prospr.compat import (
    COMPOSABLE_CHECKPOINT,
    NON_REENTRANT_CHECKPOINT,
    REENTRANT_CHECKPOINT,
    Private,
)
from lightning_prospr.errors import NotTwiceDifferentiableError

__all__ = [
    "eager_execution",
    "scoring_execution",
    "twice_differentiable_attention",
    "twice_differentiable_ops",
    "without_activation_checkpointing",
]


@contextmanager
def eager_execution() -> Iterator[None]:
    """Run code under `torch.compile()` eagerly (`torch.compiler.set_stance("force_eager")`).

    Scoring differentiates the model twice, and AOTAutograd, behind every `torch.compile` backend
    but `"eager"`, refuses that ("torch.compile with aot_autograd does not currently support
    double backward"); every unrolled step would also hand the compiled code new tensors to guard
    on. So the model's forward passes during scoring ignore `torch.compile` (on a compiled
    LightningModule, submodule or function alike), and training afterwards runs compiled as before.
    A no-op on torch < 2.6, which has no `set_stance`, and inside a region being compiled.
    """
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None or torch.compiler.is_compiling():
        yield
        return
    with set_stance("force_eager"):
        yield


class _RunDirectly:
    """Stands in for `torch.utils.checkpoint.CheckpointFunction`: call the segment, keep its graph."""

    @staticmethod
    def apply(function: Any, preserve_rng_state: bool, *args: Any) -> Any:
        return function(*args)


def _no_recomputation(*args: Any, **kwargs: Any) -> Iterator[None]:
    """Stands in for the generator behind non-reentrant checkpointing: no hooks, nothing saved aside."""
    yield


#: The private checkpoint internals replaced while scoring, each with its stand-in (see
#: [`compat`][lightning_prospr.compat]: a missing one raises instead of being skipped).
_CHECKPOINT_INTERNALS: tuple[tuple[Private, Any], ...] = (
    (REENTRANT_CHECKPOINT, _RunDirectly),  # use_reentrant=True
    (NON_REENTRANT_CHECKPOINT, _no_recomputation),  # use_reentrant=False
    (COMPOSABLE_CHECKPOINT, _no_recomputation),  # torch.distributed's, once a model imported it
)


@contextmanager
def without_activation_checkpointing() -> Iterator[None]:
    """Run segments wrapped in `torch.utils.checkpoint.checkpoint()` as plain code.

    A checkpointed segment keeps only its inputs and re-runs its forward pass when the backward pass
    needs its activations. During scoring that re-run would happen after
    `torch.func.functional_call()` has put the model's own parameters back, so the activations,
    and the scores, would belong to $\\theta_0$ instead of the unrolled $w_t$ (silently,
    for `use_reentrant=False`); with `use_reentrant=True` the segment's parameters would get no
    gradient at all under `torch.autograd.grad()`. Inside this context both variants (and
    `checkpoint_sequential()`, and the composable `checkpoint` of
    `torch.distributed`) call the segment directly and keep its activations, as without
    checkpointing: the scoring forward needs the memory of an uncheckpointed model
    (`mode="recompute"` or `mode="first_order"` bound it). Training is not affected.

    Raises:
        CompatibilityError: a checkpoint internal is no longer where torch 2.14 had it.
    """
    replaced: list[tuple[Any, str, Any]] = []
    try:
        for private, stand_in in _CHECKPOINT_INTERNALS:
            found = private.resolve()
            if found is None:  # torch.distributed's composable checkpoint, not imported by anyone
                continue
            module, attr = found
            replaced.append((module, attr, getattr(module, attr)))
            setattr(module, attr, stand_in)
        yield
    finally:
        for module, attr, original in reversed(replaced):
            setattr(module, attr, original)


def twice_differentiable_attention() -> AbstractContextManager[object]:
    """Restrict `torch.nn.functional.scaled_dot_product_attention()` to its math backend.

    The fused flash and memory-efficient kernels have no double backward ("derivative for
    aten::_scaled_dot_product_flash_attention..._backward is not implemented"), so second-order
    unrolls through attention layers (`nn.MultiheadAttention`, `nn.TransformerEncoderLayer`, or a
    direct call) need the math implementation. Training itself is not affected.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return torch.backends.cuda.sdp_kernel(
            enable_flash=False, enable_math=True, enable_mem_efficient=False
        )
    return sdpa_kernel([SDPBackend.MATH])


def _hardsigmoid(input: Tensor, inplace: bool = False) -> Tensor:
    """`torch.nn.functional.hardsigmoid()` as `relu6(x + 3) / 6`: the same values and the same
    gradient (zero outside (-3, 3)), and a backward pass that can be differentiated again."""
    value = F.relu6(input + 3.0) / 6.0
    return input.copy_(value) if inplace else value


#: Operators whose backward PyTorch cannot differentiate again (torch 2.14, CPU and CUDA), each
#: with an equal-valued form that it can. Checked by the tests: the operator itself fails a double
#: backward, its form passes `gradgradcheck` and gives the same values.
EQUIVALENT_FORMS: dict[Callable[..., Any], Callable[..., Any]] = {F.hardsigmoid: _hardsigmoid}

#: Operators with no double backward and no equivalent form here: second-order scoring stops at
#: the first call, naming it and the layer, before an unroll is wasted on it.
NOT_TWICE_DIFFERENTIABLE: dict[Callable[..., Any], str] = {
    F.ctc_loss: "ctc_loss",
    F.multi_margin_loss: "multi_margin_loss",
}

#: Operators that run cuDNN kernels on CUDA whose backward has no double backward (cuDNN's RNNs and
#: grid sampler); while scoring second order they run the native CUDA kernels instead.
CUDNN_WITHOUT_DOUBLE_BACKWARD: frozenset[Callable[..., Any]] = frozenset(
    {torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu, F.grid_sample}
)


def _on_cuda(args: Any) -> bool:
    if isinstance(args, Tensor):
        return args.is_cuda
    if isinstance(args, (list, tuple)):
        return any(_on_cuda(a) for a in args)
    return False


def _calling_layer(model: nn.Module | None) -> str:
    """The innermost submodule of `model` whose code is running (from the Python stack)."""
    if model is None:
        return "the model"
    names = {id(m): name for name, m in model.named_modules()}
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            name = names[id(owner)]
            return f"layer {name!r} ({type(owner).__name__})" if name else "the model's own code"
        frame = frame.f_back
    return "the loss function"


class _TwiceDifferentiableOps(TorchFunctionMode):
    """Swap operators without a double backward for ones with, while a loss is evaluated."""

    def __init__(self, model: nn.Module | None) -> None:
        super().__init__()
        self._model = model

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        form = EQUIVALENT_FORMS.get(func)
        if form is not None:
            return form(*args, **kwargs)
        name = NOT_TWICE_DIFFERENTIABLE.get(func)
        if name is not None:
            raise NotTwiceDifferentiableError(
                f"{name} has no double backward in PyTorch {torch.__version__}, so full and recompute "
                f"mode cannot differentiate through it (called in {_calling_layer(self._model)}). Use "
                "mode='first_order' (the first-order meta-gradient needs one backward pass), or replace "
                f"{name} while scoring (a prospr_loss of your own)."
            )
        if func in CUDNN_WITHOUT_DOUBLE_BACKWARD and _on_cuda(args):
            with torch.backends.cudnn.flags(enabled=False):
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def twice_differentiable_ops(model: nn.Module | None = None) -> AbstractContextManager[object]:
    """Make every operator the loss calls twice differentiable, or refuse it clearly.

    Inside the context, `torch.nn.functional.hardsigmoid()` (`nn.Hardsigmoid`, MobileNetV3's
    squeeze-excitation gates) is computed as `relu6(x + 3) / 6` (`EQUIVALENT_FORMS`); on
    CUDA, cuDNN's RNNs and grid sampler run the native kernels; the operators of
    `NOT_TWICE_DIFFERENTIABLE` raise
    [`NotTwiceDifferentiableError`][lightning_prospr.errors.NotTwiceDifferentiableError] naming the
    operator and the layer of `model` that called it, and suggesting first-order mode. Everything
    else runs as it is. Training is not affected.
    """
    return _TwiceDifferentiableOps(model)


@contextmanager
def scoring_execution(second_order: bool = True, model: nn.Module | None = None) -> Iterator[None]:
    """All of the above for one scoring forward pass of `model` (attention and operators made
    twice differentiable only if `second_order`)."""
    with ExitStack() as stack:
        stack.enter_context(eager_execution())
        stack.enter_context(without_activation_checkpointing())
        if second_order:
            stack.enter_context(twice_differentiable_attention())
            stack.enter_context(twice_differentiable_ops(model))
        yield
