"""The errors the engine raises on top of Python's and torch's own."""

from __future__ import annotations

__all__ = ["NotTwiceDifferentiableError", "UnrollError"]


class UnrollError(RuntimeError):
    """A failure inside the unrolled inner loop, with the step and batch it happened at."""


class NotTwiceDifferentiableError(UnrollError):
    """The loss calls an operator whose backward pass PyTorch cannot differentiate again, so full
    (and recompute) mode cannot score through it; first-order mode can."""
