"""The errors the engine raises, and how failures in the user's loss become them.

A loss that returns something unusable, raises, runs out of memory, or calls an operator without a
double backward gets a message that says where (the inner step and batch) and what to do.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from lightning_prospr.compat import CompatibilityError

__all__ = [
    "NotTwiceDifferentiableError",
    "UnrollError",
    "check_loss",
    "is_out_of_memory",
    "loss_context",
    "raise_if_compiled_double_backward",
    "raise_if_not_twice_differentiable",
]


class UnrollError(RuntimeError):
    """A failure inside the unrolled inner loop, with the step and batch it happened at."""


class NotTwiceDifferentiableError(UnrollError):
    """The loss calls an operator whose backward pass PyTorch cannot differentiate again, so full
    (and recompute) mode cannot score through it; first-order mode can."""


def check_loss(loss: Any, where: str, source: str = "loss_fn", hint: str = "") -> Tensor:
    """`loss` (returned by `source`) as a scalar tensor, after checking that it is one: finite and
    with a gradient path. A dict with a `"loss"` entry (Lightning's `training_step` convention)
    stands for that entry. `hint` ends the messages (the callback's: define `prospr_loss`)."""
    if isinstance(loss, Mapping):
        if "loss" not in loss:
            raise UnrollError(
                f"{source} returned a dict without a 'loss' key (keys: {list(loss)}) {where}; return the "
                f"loss under 'loss'{hint}."
            )
        loss = loss["loss"]
    if loss is None:
        raise UnrollError(
            f"{source} returned None {where}, so there is no loss to differentiate; make it return the "
            f"loss for every batch (a step that skips its batch cannot be used for scoring){hint}."
        )
    if not isinstance(loss, Tensor):
        raise UnrollError(
            f"{source} returned {type(loss).__name__} {where}; it must return a scalar loss tensor."
        )
    if loss.numel() != 1:
        raise UnrollError(
            f"{source} returned a tensor of shape {tuple(loss.shape)} {where}; it must be a scalar "
            "(reduce it, e.g. with .mean())."
        )
    if not loss.requires_grad:
        raise UnrollError(
            f"{source} returned a tensor without a gradient {where}; compute the loss from the "
            "model's output and do not call .detach() or .item() on it, nor use torch.no_grad()."
        )
    if not torch.isfinite(loss.detach()).all():
        raise UnrollError(
            f"{source} returned a non-finite loss ({loss.item()}) {where}; lower `lr`, use fewer "
            "`steps`, or check the model and data for NaN/Inf."
        )
    return loss.reshape(())


#: Parts of the messages of allocation failures that PyTorch raises as a plain `RuntimeError`
#: rather than `torch.OutOfMemoryError`: the CPU allocator ("DefaultCPUAllocator: can't allocate
#: memory"), MPS ("MPS backend out of memory"), some CUDA paths ("CUDA error: out of memory").
_OUT_OF_MEMORY_MESSAGES = ("can't allocate memory", "out of memory")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` is a failed memory allocation, on any device."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    if not isinstance(err, RuntimeError) or isinstance(err, UnrollError):
        return False
    message = str(err)
    return any(part in message for part in _OUT_OF_MEMORY_MESSAGES)


@contextmanager
def loss_context(where: str) -> Iterator[None]:
    """Attach `where` (once) to an error raised while evaluating a loss; wrap foreign errors in
    [`UnrollError`][lightning_prospr.errors.UnrollError]. Out-of-memory errors pass through for the
    caller's advice, and a `CompatibilityError` as it is (it is not the loss's fault)."""
    try:
        yield
    except CompatibilityError:
        raise
    except UnrollError as err:
        if where in str(err):
            raise
        raise type(err)(f"{err} [{where}]") from err  # the same kind (NotTwiceDifferentiableError)
    except Exception as err:
        if is_out_of_memory(err):
            raise
        raise UnrollError(f"{type(err).__name__} raised by the loss {where}: {err}") from err


def raise_if_compiled_double_backward(err: BaseException, what: str) -> None:
    """Turn AOTAutograd's refusal to differentiate a compiled backward pass into advice.

    Only reached where [`eager_execution`][lightning_prospr.execution.eager_execution] cannot help
    (torch < 2.6). `what` names the computation that differentiates twice, for the message.
    """
    text = str(err)
    if isinstance(err, RuntimeError) and (
        "does not currently support double backward" in text or "donated buffers" in text
    ):
        raise UnrollError(
            f"{what} differentiates the model twice, but the model runs under torch.compile, whose "
            f"compiled backward pass cannot be differentiated again on torch {torch.__version__}. "
            "Score the uncompiled model and compile it afterwards, or upgrade to torch >= 2.6 (where "
            f"scoring runs compiled models eagerly). Original error: {err}"
        ) from err


def raise_if_not_twice_differentiable(err: BaseException, what: str) -> None:
    """Turn PyTorch's "derivative for aten::X_backward is not implemented", raised by the second
    backward pass through an operator that
    [`twice_differentiable_ops`][lightning_prospr.execution.twice_differentiable_ops] does not
    know, into advice. `what` names the computation that differentiates twice."""
    text = str(err)
    if isinstance(err, RuntimeError) and "derivative for" in text and "is not implemented" in text:
        op = text.split("derivative for", 1)[1].split("is not implemented", 1)[0].strip()
        raise NotTwiceDifferentiableError(
            f"{what} differentiates the loss twice, but PyTorch {torch.__version__} has no double "
            f"backward for {op}, an operator of the model or the loss. Use mode='first_order' (one "
            "backward pass), or replace that operator while scoring (a prospr_loss of your own); "
            f"please report it so that scoring can swap it for a twice-differentiable form. "
            f"Original error: {err}"
        ) from err
