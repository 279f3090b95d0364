"""Sanity checks of a mask (Frankle et al., ICLR 2021): does *which* weights a method keeps matter?

Frankle, Dziugaite, Roy and Carbin ("Pruning Neural Networks at Initialization: Why are We
Missing the Mark?") ran two ablations on the masks of SNIP, GraSP and SynFlow and found that
neither hurt accuracy: the methods' value lay in the layer densities they choose, not in the
positions. The same two tests, for any mask:

- [`shuffle_within_layers`][lightning_prospr.ablations.shuffle_within_layers]: the kept positions
  of each tensor are permuted at random, so every layer keeps its density and loses the method's
  choice within it;
- [`reinitialize`][lightning_prospr.ablations.reinitialize]: the mask is kept and the network gets
  fresh weights from its initializer, so the mask loses the initial values it was chosen for.

The accuracy benchmark runs them as methods (`prospr+shuffle`, `prospr+reinit`, ...); docs/results.md
reports what they found for ProsPr.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from lightning_prospr.rng import isolated_rng

__all__ = ["reinitialize", "shuffle_within_layers"]


def shuffle_within_layers(
    masks: Mapping[str, Tensor], seed: int = 0, *, channels: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Each mask with its kept positions permuted uniformly at random within its tensor.

    Args:
        masks: `{name: bool keep-mask}`.
        seed: the permutation's seed (a CPU generator, so the result does not depend on the device).
        channels: for structured masks, `{name: bool per output channel}`: whole channels are
            permuted instead (the result keeps whole channels), expanded to each mask's shape.

    Returns:
        New masks, each with the same shape, device and number of kept entries as before.

    Example:
        >>> import torch
        >>> masks = {"w": torch.tensor([[True, True, False, False]])}
        >>> shuffled = shuffle_within_layers(masks, seed=1)
        >>> int(shuffled["w"].sum()), shuffled["w"].shape
        (2, torch.Size([1, 4]))
    """
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, mask in masks.items():
        unit = channels[name] if channels is not None and name in channels else mask
        flat = unit.reshape(-1).cpu()
        shuffled = flat[torch.randperm(flat.numel(), generator=generator)].reshape(unit.shape)
        if unit is not mask:  # whole output channels
            shuffled = shuffled.reshape(-1, *([1] * (mask.dim() - 1))).expand_as(mask)
        out[name] = shuffled.to(mask.device, torch.bool).clone()
    return out


@torch.no_grad()
def reinitialize(model: nn.Module, names: list[str], seed: int = 0) -> None:
    """Re-draw the parameters of the modules owning `names` from their own initializer, in place.

    Every module that owns one of the weights `names` runs its `reset_parameters()` (weights and
    biases, as at construction) after `torch.manual_seed(seed)`; the global random states are put
    back afterwards. A pruned weight (`weight_orig` of `torch.nn.utils.prune`) is re-drawn as well, so its
    masked positions stay zero in the effective weight and the mask is kept.

    Args:
        model: the network.
        names: parameter names (as in `model.named_parameters()` before pruning, e.g.
            `"conv1.weight"`).
        seed: seed of the re-draw.

    Raises:
        ValueError: when a module has no `reset_parameters()` (nothing is changed then).
    """
    owners: dict[str, nn.Module] = {}
    for name in names:
        path = name.rpartition(".")[0]
        module = model.get_submodule(path)
        if not callable(getattr(module, "reset_parameters", None)):
            raise ValueError(
                f"cannot re-initialize `{name}`: its module {type(module).__name__} ({path!r}) has no "
                "reset_parameters(); leave it out of `names`."
            )
        owners[path] = module
    with isolated_rng():
        torch.manual_seed(seed)
        for module in owners.values():
            _reset(module)


def _reset(module: nn.Module) -> None:
    """`reset_parameters()`, also when `torch.nn.utils.prune` re-parametrized a weight: a copy of
    the module without the pruning is reset, and its fresh values are written into the `_orig`
    parameters (and the other parameters) of the module, whose masks stay."""
    pruned = [n[: -len("_orig")] for n, _ in module.named_parameters(recurse=False) if n.endswith("_orig")]
    if not pruned:
        module.reset_parameters()  # type: ignore[operator]
        return
    for name in pruned:  # the computed `weight` is not a leaf, which deepcopy refuses
        setattr(module, name, getattr(module, name).detach())
    scratch = copy.deepcopy(module)
    for name in pruned:
        prune.remove(scratch, name)
    scratch.reset_parameters()  # type: ignore[operator]
    fresh = dict(scratch.named_parameters(recurse=False))
    for name, param in module.named_parameters(recurse=False):
        param.copy_(fresh[name[: -len("_orig")] if name.endswith("_orig") else name])
    for name in pruned:  # the masked weight the forward pass sees, until its next pre-hook
        setattr(module, name, getattr(module, f"{name}_orig") * getattr(module, f"{name}_mask"))
