"""Masks <-> `torch.nn.utils.prune`: apply, read back, take off, make permanent.

A weight `"layer.weight"` pruned here carries the usual re-parametrization: the original
`Parameter` moves to `layer.weight_orig` (same object, so optimizers built earlier keep
training it), a float buffer `layer.weight_mask` holds the mask, and a forward pre-hook sets
`layer.weight = weight_orig * weight_mask` before every forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn
from torch.nn.utils import prune
from torch.utils.hooks import RemovableHandle

from lightning_prospr.compat import forward_pre_hooks, pruned_tensor_name

__all__ = ["apply_masks", "current_masks", "make_permanent", "plain_state_dict", "remove_masks", "split_name"]


def split_name(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """`"block.0.weight"` -> (the `block.0` submodule, `"weight"`)."""
    module_name, _, attr = name.rpartition(".")
    return model.get_submodule(module_name), attr


def _hook(module: nn.Module, attr: str) -> prune.BasePruningMethod | None:
    for hook in forward_pre_hooks(module).values():
        if isinstance(hook, (prune.BasePruningMethod, prune.PruningContainer)):
            if pruned_tensor_name(hook) == attr:
                return hook
    return None


def _aliases(model: nn.Module, name: str) -> list[tuple[nn.Module, str]]:
    """Every (module, attribute) that holds the same Parameter as `name` (tied weights)."""
    module, attr = split_name(model, name)
    param = _own_parameter(module, attr)
    if param is None:
        raise ValueError(f"{name!r} is not a parameter of {type(model).__name__}.")
    found = []
    for mod in model.modules():
        for key, value in mod.named_parameters(recurse=False, remove_duplicate=False):
            if value is param:
                found.append((mod, key.removesuffix("_orig")))
    return found


def _own_parameter(module: nn.Module, attr: str) -> nn.Parameter | None:
    """`module`'s own parameter `attr`, or `attr + "_orig"` when it is under a pruning mask."""
    own = dict(module.named_parameters(recurse=False, remove_duplicate=False))
    return own.get(f"{attr}_orig", own.get(attr))


#: Forward pre-hooks on the ancestors of each masked (module, attribute), by module.
_REFRESH: WeakKeyDictionary[nn.Module, dict[str, list[RemovableHandle]]] = WeakKeyDictionary()


def _install_refresh(model: nn.Module, module: nn.Module, attr: str) -> None:
    """Recompute `module.<attr> = <attr>_orig * <attr>_mask` before the forward of every ancestor.

    `torch.nn.utils.prune` refreshes the attribute only in `module`'s own forward pre-hook, but
    some modules read a child's weight without calling the child: `nn.MultiheadAttention` passes
    `out_proj.weight` to a functional kernel, `nn.TransformerEncoderLayer`'s fast path reads it
    too, and a tied weight may be used through `F.linear`. Without a refresh those forwards see a
    stale tensor (and backpropagate through a freed graph).
    """
    paths = [name for name, m in model.named_modules(remove_duplicate=False) if m is module]
    ancestors: list[nn.Module] = []
    for path in paths:
        parts = path.split(".") if path else []
        for depth in range(len(parts)):
            parent = model.get_submodule(".".join(parts[:depth]))
            if all(parent is not a for a in ancestors):
                ancestors.append(parent)

    def refresh(_parent: nn.Module, _inputs: Any) -> None:
        hook = _hook(module, attr)
        if hook is not None:
            setattr(module, attr, hook.apply_mask(module))

    handles = [parent.register_forward_pre_hook(refresh) for parent in ancestors]
    _REFRESH.setdefault(module, {}).setdefault(attr, []).extend(handles)


def _remove_refresh(module: nn.Module, attr: str) -> None:
    for handle in _REFRESH.get(module, {}).pop(attr, []):
        handle.remove()


def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Register each keep-mask with `torch.nn.utils.prune.custom_from_mask()`.

    The effective weight becomes `weight_orig * mask` from the next forward on, and the
    `weight` attribute is updated at once. A weight shared by several modules (tied weights) is
    masked in each of them. A weight that is already pruned gets the masks composed (multiplied)
    by `torch.nn.utils.prune`'s container. The masked attribute is also refreshed before the
    forward of every ancestor module, for modules that read a child's weight without calling it
    (`nn.MultiheadAttention`'s `out_proj`).
    """
    for name, mask in masks.items():
        for module, attr in _aliases(model, name):
            param = _own_parameter(module, attr)
            assert param is not None
            if tuple(mask.shape) != tuple(param.shape):
                raise ValueError(
                    f"mask for {name!r} has shape {tuple(mask.shape)} but the weight has "
                    f"{tuple(param.shape)}; masks must come from the same model."
                )
            already = _hook(module, attr) is not None
            prune.custom_from_mask(module, attr, mask.to(device=param.device, dtype=param.dtype))
            if not already:
                _install_refresh(model, module, attr)


def current_masks(model: nn.Module, names: list[str] | None = None) -> dict[str, Tensor]:
    """The keep-masks registered on `model` (`{name: bool tensor}`), for `names` or all."""
    found = {}
    for module_name, module in model.named_modules():
        for buffer_name, buf in module.named_buffers(recurse=False):
            if buffer_name.endswith("_mask") and _hook(module, buffer_name[: -len("_mask")]):
                attr = buffer_name[: -len("_mask")]
                name = f"{module_name}.{attr}" if module_name else attr
                found[name] = buf.detach() != 0
    if names is not None:
        return {n: found[n] for n in names if n in found}
    return found


def remove_masks(model: nn.Module, names: list[str], bake: bool = True) -> None:
    """Take the re-parametrization off and restore plain `weight` parameters.

    The same `Parameter` object comes back, so optimizers keep working. With `bake=True` (what
    `torch.nn.utils.prune.remove()` does) the zeros are written into it; with `bake=False` it
    keeps the values it had under the mask. Names without a re-parametrization are skipped; tied
    weights are restored in every module that shares them.
    """
    for name in names:
        for module, attr in _aliases(model, name):
            hook = _hook(module, attr)
            if hook is None:
                continue
            _remove_refresh(module, attr)
            if bake:
                prune.remove(module, attr)
                continue
            hooks = forward_pre_hooks(module)
            for key, value in list(hooks.items()):
                if value is hook:
                    del hooks[key]
            param = getattr(module, f"{attr}_orig")
            delattr(module, f"{attr}_orig")
            delattr(module, f"{attr}_mask")
            if hasattr(module, attr):
                delattr(module, attr)
            module.register_parameter(attr, param)


def plain_state_dict(model: nn.Module, names: list[str]) -> list[RemovableHandle]:
    """Make the masked weights `names` save and load as plain `weight` entries.

    `state_dict()` then holds `weight = weight_orig * weight_mask` instead of the two pruning
    tensors, so it loads into the same model without pruning; and `load_state_dict` accepts such
    plain entries (the mask in place is kept). Returns the hook handles; `.remove()` them to undo.
    """
    handles = []
    for name in names:
        for module, attr in _aliases(model, name):
            handles.append(module.register_state_dict_post_hook(_PlainSave(attr)))
            handles.append(module.register_load_state_dict_pre_hook(_PlainLoad(attr)))
    return handles


class _PlainSave:
    def __init__(self, attr: str) -> None:
        self.attr = attr

    def __call__(self, module: nn.Module, state: dict[str, Any], prefix: str, metadata: Any) -> None:
        orig = state.pop(f"{prefix}{self.attr}_orig", None)
        mask = state.pop(f"{prefix}{self.attr}_mask", None)
        if orig is not None and mask is not None:
            state[f"{prefix}{self.attr}"] = orig.detach() * mask


class _PlainLoad:
    def __init__(self, attr: str) -> None:
        self.attr = attr

    def __call__(self, module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        key = f"{prefix}{self.attr}"
        if key in state and f"{key}_orig" not in state and _hook(module, self.attr) is not None:
            state[f"{key}_orig"] = state.pop(key)
            state.setdefault(f"{key}_mask", getattr(module, f"{self.attr}_mask"))


def make_permanent(model: nn.Module) -> list[str]:
    """Remove every pruning re-parametrization on `model`, keeping the zeros; returns the names."""
    names = list(current_masks(model))
    remove_masks(model, names)
    return names


@torch.no_grad()
def effective_weight(model: nn.Module, name: str) -> Tensor:
    """The weight as the forward pass sees it (`weight_orig * weight_mask` when pruned)."""
    module, attr = split_name(model, name)
    orig = getattr(module, f"{attr}_orig", None)
    if orig is None:
        return getattr(module, attr).detach()
    return orig.detach() * getattr(module, f"{attr}_mask")
