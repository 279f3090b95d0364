"""How the model runs while it is scored: eagerly, without activation checkpointing.

Scoring calls the model through :func:`torch.func.functional_call` with the unrolled tensors
substituted for its parameters, and differentiates the result once or twice. Three features that
speed up or slim down *training* break that, and are switched off for the scoring forward passes
only (training afterwards uses them as before):

- ``torch.compile``: its AOTAutograd graphs cannot be differentiated twice
  (:func:`eager_execution`);
- activation checkpointing (:mod:`torch.utils.checkpoint`): the segment's forward pass is re-run
  during the backward pass, after ``functional_call`` has put the model's own parameters back, so
  the gradients would be those of the wrong weights (:func:`without_activation_checkpointing`);
- fused attention kernels, which have no double backward (:func:`twice_differentiable_attention`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import torch

__all__ = [
    "eager_execution",
    "scoring_execution",
    "twice_differentiable_attention",
    "without_activation_checkpointing",
]


@contextmanager
def eager_execution() -> Iterator[None]:
    """Run code under :func:`torch.compile` eagerly (``torch.compiler.set_stance("force_eager")``).

    Scoring differentiates the model twice, and AOTAutograd, behind every ``torch.compile`` backend
    but ``"eager"``, refuses that ("torch.compile with aot_autograd does not currently support
    double backward"); every unrolled step would also hand the compiled code new tensors to guard
    on. So the model's forward passes during scoring ignore ``torch.compile`` (on a compiled
    LightningModule, submodule or function alike), and training afterwards runs compiled as before.
    A no-op on torch < 2.6, which has no ``set_stance``, and inside a region being compiled.
    """
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None or torch.compiler.is_compiling():
        yield
        return
    with set_stance("force_eager"):
        yield


class _RunDirectly:
    """Stands in for ``torch.utils.checkpoint.CheckpointFunction``: call the segment, keep its graph."""

    @staticmethod
    def apply(function: Any, preserve_rng_state: bool, *args: Any) -> Any:
        return function(*args)


def _no_recomputation(*args: Any, **kwargs: Any) -> Iterator[None]:
    """Stands in for the generator behind non-reentrant checkpointing: no hooks, nothing saved aside."""
    yield


#: ``(module, attribute, stand-in)`` replaced while scoring; modules not imported are skipped.
_CHECKPOINT_INTERNALS: tuple[tuple[str, str, Any], ...] = (
    ("torch.utils.checkpoint", "CheckpointFunction", _RunDirectly),  # use_reentrant=True
    # use_reentrant=False: the generator that torch 2.14 calls, the older name, torch.distributed's
    ("torch.utils.checkpoint", "_checkpoint_without_reentrant_generator_impl", _no_recomputation),
    ("torch.utils.checkpoint", "_checkpoint_without_reentrant_generator", _no_recomputation),
    (
        "torch.distributed._composable.checkpoint_activation",
        "_checkpoint_without_reentrant_generator_impl",
        _no_recomputation,
    ),
)


@contextmanager
def without_activation_checkpointing() -> Iterator[None]:
    """Run segments wrapped in :func:`torch.utils.checkpoint.checkpoint` as plain code.

    A checkpointed segment keeps only its inputs and re-runs its forward pass when the backward pass
    needs its activations. During scoring that re-run would happen after
    :func:`torch.func.functional_call` has put the model's own parameters back, so the activations,
    and the scores, would belong to :math:`\\theta_0` instead of the unrolled :math:`w_t` (silently,
    for ``use_reentrant=False``); with ``use_reentrant=True`` the segment's parameters would get no
    gradient at all under :func:`torch.autograd.grad`. Inside this context both variants (and
    :func:`~torch.utils.checkpoint.checkpoint_sequential`, and the composable ``checkpoint`` of
    ``torch.distributed``) call the segment directly and keep its activations, as without
    checkpointing: the scoring forward needs the memory of an uncheckpointed model
    (``recompute=True`` or ``first_order=True`` bound it). Training is not affected.
    """
    replaced: list[tuple[Any, str, Any]] = []
    try:
        for module_name, attr, stand_in in _CHECKPOINT_INTERNALS:
            module = sys.modules.get(module_name)
            if module is None or not hasattr(module, attr):
                continue
            replaced.append((module, attr, getattr(module, attr)))
            setattr(module, attr, stand_in)
        yield
    finally:
        for module, attr, original in reversed(replaced):
            setattr(module, attr, original)


def twice_differentiable_attention() -> AbstractContextManager[object]:
    """Restrict :func:`torch.nn.functional.scaled_dot_product_attention` to its math backend.

    The fused flash and memory-efficient kernels have no double backward ("derivative for
    aten::_scaled_dot_product_flash_attention..._backward is not implemented"), so second-order
    unrolls through attention layers (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``, or a
    direct call) need the math implementation. Training itself is not affected.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return torch.backends.cuda.sdp_kernel(
            enable_flash=False, enable_math=True, enable_mem_efficient=False
        )
    return sdpa_kernel([SDPBackend.MATH])


@contextmanager
def scoring_execution(second_order: bool = True) -> Iterator[None]:
    """All of the above for one scoring forward pass (the attention restriction if ``second_order``)."""
    with ExitStack() as stack:
        stack.enter_context(eager_execution())
        stack.enter_context(without_activation_checkpointing())
        if second_order:
            stack.enter_context(twice_differentiable_attention())
        yield
