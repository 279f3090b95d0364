"""Every private torch and Lightning name this package uses, in one place, each one checked.

PyTorch and Lightning have no public way to do a few things the engine and the callback need: run
an activation-checkpointed segment directly while scoring, watch which tensors an operator reads,
find a pruning hook's tensor, draw batches from the loader a fit uses. Each private name is a
`Private` below: where it lives, and what it is used for. A name that a new release renamed
or removed raises `CompatibilityError`, naming the versions this package was checked with;
none is ever skipped quietly. The module-level names are checked when `lightning_prospr` is
imported (`check_torch()`) or when the callback is (`check_lightning()`); instance
attributes are checked each time they are read.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

__all__ = [
    "CHECKED_WITH",
    "COMPOSABLE_CHECKPOINT",
    "DISPATCH_MODE",
    "NON_REENTRANT_CHECKPOINT",
    "REENTRANT_CHECKPOINT",
    "CompatibilityError",
    "Private",
    "before_batch_transfer",
    "check_lightning",
    "check_torch",
    "forward_pre_hooks",
    "pruned_tensor_name",
    "train_data_source",
]

#: The releases every name below was checked against.
CHECKED_WITH = "torch 2.14.1 and lightning 2.6.6"


class CompatibilityError(RuntimeError):
    """A private torch or Lightning name this package relies on is missing from the installed release."""


def _versions() -> str:
    found = []
    for package in ("torch", "lightning"):
        module = sys.modules.get(package)
        found.append(f"{package} {getattr(module, '__version__', 'not imported')}")
    return " and ".join(found)


def _missing(*, where: str, purpose: str) -> CompatibilityError:
    return CompatibilityError(
        f"lightning-prospr needs `{where}` ({purpose}), which the installed {_versions()} do not "
        f"have. It was checked with {CHECKED_WITH}: install those versions, or upgrade "
        "lightning-prospr (please report the versions if no release supports them yet)."
    )


@dataclass(frozen=True)
class Private:
    """A private module-level name: `owner` (an importable module) and its attribute `names`.

    Attributes:
        owner: the module that holds the name.
        names: the attribute, and older spellings of it that are accepted too, newest first.
        purpose: what this package uses it for (for the error message).
        only_if_imported: checked only once something else imported `owner` (a module that a
            model may or may not use); until then `resolve()` returns `None`.
    """

    owner: str
    names: tuple[str, ...]
    purpose: str
    only_if_imported: bool = False

    def resolve(self) -> tuple[ModuleType, str] | None:
        """`(module, attribute name)`; `None` only for an `only_if_imported` owner not imported.

        Raises:
            CompatibilityError: the owner exists but none of `names` does.
        """
        module = sys.modules.get(self.owner)
        if module is None:
            if self.only_if_imported:
                return None
            module = importlib.import_module(self.owner)
        for name in self.names:
            if hasattr(module, name):
                return module, name
        raise _missing(where=f"{self.owner}.{self.names[0]}", purpose=self.purpose)

    def get(self) -> Any:
        """The object itself (see `resolve()`)."""
        found = self.resolve()
        if found is None:
            raise _missing(where=f"{self.owner}.{self.names[0]}", purpose=self.purpose)
        return getattr(*found)


REENTRANT_CHECKPOINT = Private(
    "torch.utils.checkpoint",
    ("CheckpointFunction",),
    "to run use_reentrant=True checkpointed segments directly while scoring",
)
NON_REENTRANT_CHECKPOINT = Private(
    "torch.utils.checkpoint",
    ("_checkpoint_without_reentrant_generator_impl", "_checkpoint_without_reentrant_generator"),
    "to run use_reentrant=False checkpointed segments directly while scoring",
)
COMPOSABLE_CHECKPOINT = Private(
    "torch.distributed._composable.checkpoint_activation",
    ("_checkpoint_without_reentrant_generator_impl",),
    "to run segments under torch.distributed's composable checkpoint directly while scoring",
    only_if_imported=True,
)
DISPATCH_MODE = Private(
    "torch.utils._python_dispatch",
    ("TorchDispatchMode",),
    "to see which parameters are the weight operands of matrix products and convolutions",
)
_BATCH_HOOK = Private(
    "lightning.pytorch.core.module",
    ("LightningModule",),
    "to run on_before_batch_transfer on the scoring batches as the fit loop does",
)

#: Checked by `check_torch()` (at import of the package).
TORCH_NAMES = (REENTRANT_CHECKPOINT, NON_REENTRANT_CHECKPOINT, COMPOSABLE_CHECKPOINT, DISPATCH_MODE)


def check_torch() -> None:
    """Raise `CompatibilityError` unless every private torch name is where it was."""
    for private in TORCH_NAMES:
        private.resolve()
    import torch

    forward_pre_hooks(torch.nn.Module())
    module_tables(torch.nn.Module())


def check_lightning() -> None:
    """Raise `CompatibilityError` unless every private Lightning class attribute is there."""
    module = _BATCH_HOOK.get()
    if not callable(getattr(module, "_on_before_batch_transfer", None)):
        raise _missing(where="LightningModule._on_before_batch_transfer", purpose=_BATCH_HOOK.purpose)


def _attribute(obj: Any, name: str, where: str, purpose: str) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError:
        raise _missing(where=where, purpose=purpose) from None


def forward_pre_hooks(module: Any) -> dict[int, Any]:
    """`module._forward_pre_hooks`: the hooks `torch.nn.utils.prune` registers have no handle
    a caller can keep, so finding (and removing) one means reading this dict."""
    hooks = _attribute(
        module, "_forward_pre_hooks", "torch.nn.Module._forward_pre_hooks", "to find pruning hooks"
    )
    if not isinstance(hooks, dict):
        raise _missing(where="torch.nn.Module._forward_pre_hooks (a dict)", purpose="to find pruning hooks")
    return hooks


def module_tables(module: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """`module._parameters`, `module._buffers`, `module._modules`: what an undo of a shrink puts
    back (torch-pruning replaces entries of them)."""
    tables = tuple(
        _attribute(module, name, f"torch.nn.Module.{name}", "to undo a failed shrink")
        for name in ("_parameters", "_buffers", "_modules")
    )
    if not all(isinstance(t, dict) for t in tables):
        raise _missing(
            where="torch.nn.Module._parameters/_buffers/_modules (dicts)", purpose="to undo a failed shrink"
        )
    return tables


def pruned_tensor_name(hook: Any) -> str:
    """The attribute a `torch.nn.utils.prune` hook masks (`"weight"`): `hook._tensor_name`."""
    return str(
        _attribute(
            hook,
            "_tensor_name",
            "torch.nn.utils.prune.BasePruningMethod._tensor_name",
            "to tell which tensor a pruning hook masks",
        )
    )


def train_data_source(trainer: Any) -> Any:
    """`trainer.fit_loop._data_source`: the one object that knows the train dataloader of a fit
    whichever way it was given (datamodule, the module's hook, or `fit(train_dataloaders=...)`)."""
    return _attribute(
        trainer.fit_loop,
        "_data_source",
        "lightning.pytorch.loops.fit_loop._FitLoop._data_source",
        "to draw the scoring batches from the train dataloader the fit uses",
    )


def ddp_start_method(strategy: Any) -> str:
    """`DDPStrategy._start_method` ("popen" for strategy='ddp', "spawn"/"fork" for the launchers
    that load the trained weights back into the main process)."""
    return str(
        _attribute(
            strategy,
            "_start_method",
            "lightning.pytorch.strategies.DDPStrategy._start_method",
            "to tell strategy='ddp' from the spawn and fork launchers (shrink=True)",
        )
    )


def before_batch_transfer(pl_module: Any, batch: Any) -> Any:
    """`on_before_batch_transfer` of the datamodule or the module, as the fit loop calls it."""
    hook = _attribute(
        pl_module,
        "_on_before_batch_transfer",
        "LightningModule._on_before_batch_transfer",
        _BATCH_HOOK.purpose,
    )
    return hook(batch, dataloader_idx=0)
