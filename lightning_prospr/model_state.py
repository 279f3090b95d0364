"""The model as it was: what every scorer puts back when it is done, also after an error."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import prune

from lightning_prospr.compat import forward_pre_hooks, pruned_tensor_name
from lightning_prospr.rng import forked_torch_rng

__all__ = ["preserved_state"]


@contextmanager
def preserved_state(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Restore train/eval flags, pruned `weight` attributes and torch's RNG on exit.

    Scorers substitute tensors through `torch.func.functional_call` and never write parameters or
    buffers; what a forward pass does change is put back here. A `torch.nn.utils.prune` hook writes
    `module.weight = weight_orig * weight_mask` on every forward, also a stateless one, so those
    plain attributes are restored too. `device` is the model's: its CUDA RNG is restored as well.
    """
    flags = [(m, m.training) for m in model.modules()]
    derived = [
        (m, pruned_tensor_name(hook), getattr(m, pruned_tensor_name(hook), None))
        for m in model.modules()
        for hook in forward_pre_hooks(m).values()
        if isinstance(hook, (prune.BasePruningMethod, prune.PruningContainer))
    ]
    try:
        with forked_torch_rng(device):
            yield
    finally:
        for module, flag in flags:
            module.training = flag
        for module, attr, value in derived:
            setattr(module, attr, value)
