"""Channels that must go together, from torch-pruning's dependency graph, checked by running them.

Removing output channel $c$ of a convolution is only a smaller network when everything that writes
to that channel goes with it: the other convolutions whose outputs are added to it (residual
connections), the BatchNorm scale and shift that follow it, its bias, and the input columns of the
layers that read it. [Torch-Pruning](https://github.com/VainF/Torch-Pruning)'s `DependencyGraph`
(MIT) finds these couplings by tracing the loss once: each *group* is a set of channels that must
be kept or removed together, with their positions in every tensor involved.

A traced graph can be wrong for an op the library does not know (a channel-dimension `F.pad`, as
in the option-A shortcut of the CIFAR ResNets, looks to it like an element-wise op). So every group
is **checked by running it**: removing one of its channels through torch-pruning must give the same
predictions (eval mode) as zeroing that channel's rows, bias and norm parameters in the dense
network. Groups that fail, or that couple with a weight outside the pruned set, are left out, with
the reason ([`ChannelGroups.excluded`][lightning_prospr.channels.ChannelGroups]).

**Attention heads.** In an attention module, the graph couples the query, key and value rows with
the input columns of the output projection, but removing one row leaves a head narrower than the
others. When the projections' common parent module says its head size (an integer
`attention_head_size` or `head_dim`) and head count (`num_attention_heads` or `num_heads`), the
group's channels are its **heads**: each head's rows in the query, key and value projections are
scored, kept and removed together, and the parent's head count (and `all_head_size` or
`attn_dim`) follows the removal. Two layouts are recognized: separate projections of
heads x head size rows each (Hugging Face's BERT family), and one packed `qkv` projection of
3 x heads x head size rows (timm's `Attention`). `nn.MultiheadAttention` (a bare `in_proj_weight`),
GPT-2's `Conv1D` and grouped-query attention are not grouped by head; they stay whole.

A removed channel's norm scale and shift and its biases are masked too
([`ChannelGroup.dead_with`][lightning_prospr.channels.ChannelGroup]): without that, a BatchNorm
after a pruned convolution still emits its shift $\\beta$ into the next layer, and the masked
network is not the network that removing the channel gives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_prospr.compat import module_tables
from lightning_prospr.linearized import PREDICTION_LOSSES
from lightning_prospr.stateless import LossFn, StatelessLoss

__all__ = ["ChannelGroup", "ChannelGroups", "Coupled", "channel_groups", "predictions"]

#: Relative tolerance of the check that a group removes what masking it removes.
CHECK_TOLERANCE = 1e-4
#: Attributes of an attention module that give its head size, and its head count.
HEAD_SIZE_ATTRS = ("attention_head_size", "head_dim")
HEAD_COUNT_ATTRS = ("num_attention_heads", "num_heads")
#: Attributes that hold the width heads x head size (Hugging Face's BERT, timm).
INNER_WIDTH_ATTRS = ("all_head_size", "attn_dim")

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d,
          nn.InstanceNorm2d, nn.InstanceNorm3d)  # fmt: skip


def _tp() -> Any:
    try:
        import torch_pruning
    except ImportError as err:  # pragma: no cover - a dependency of the package
        raise ImportError(
            "structured pruning needs torch-pruning for the channel dependencies: pip install torch-pruning"
        ) from err
    return torch_pruning


@dataclass(frozen=True)
class Coupled:
    """The positions of one tensor that belong to a group's channels.

    Attributes:
        name: the parameter (`"layer1.0.conv2.weight"`, `"layer1.0.bn2.bias"`).
        index: positions along the tensor's dim 0.
        root: the group channel of each position (same length as `index`).
    """

    name: str
    index: Tensor
    root: Tensor


@dataclass(frozen=True)
class ChannelGroup:
    """Channels removed together: each of the `size` channels is one row in every producer.

    Attributes:
        root: the weight torch-pruning prunes the group through (one of the producers).
        size: the number of channels.
        producers: the pruned weights whose dim-0 rows are the group's channels (each a `Coupled`).
        dead_with: biases and norm scales and shifts of those channels, masked with them.
        rows: rows of the root weight per channel: 1, or, when the channels are the heads of an
            attention module, a head's rows (its size; 3 x its size in a packed `qkv` weight).
        attention: that attention module's name (its head count is updated on removal), or `""`.
    """

    root: str
    size: int
    producers: tuple[Coupled, ...]
    dead_with: tuple[Coupled, ...] = ()
    rows: int = 1
    attention: str = ""

    def scores(self, channel_scores: Mapping[str, Tensor]) -> Tensor:
        """The group's score per channel: the sum of its producers' channel scores."""
        total = torch.zeros(self.size, dtype=torch.float64)
        for member in self.producers:
            values = channel_scores[member.name].detach().reshape(-1).double().cpu()
            total.index_add_(0, member.root, values[member.index])
        return total

    def expand(self, keep: Tensor, shapes: Mapping[str, torch.Size]) -> dict[str, Tensor]:
        """`{name: bool mask}` of every producer and `dead_with` tensor for the group's channel mask
        `keep` (`(size,)` bools); producers get their weight's full shape."""
        keep = keep.reshape(-1).cpu().bool()
        out = {}
        for member in (*self.producers, *self.dead_with):
            rows = torch.ones(shapes[member.name][0], dtype=torch.bool)
            rows[member.index] = keep[member.root]
            out[member.name] = rows.reshape(-1, *([1] * (len(shapes[member.name]) - 1))).expand(
                shapes[member.name]
            )
        return out


@dataclass
class ChannelGroups:
    """The groups of a model, and the weights that could not be grouped.

    Attributes:
        groups: the checked groups.
        excluded: `{weight name: why it is left whole}` for pruned weights in no checked group.
    """

    groups: list[ChannelGroup] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)

    def group_of(self, name: str) -> ChannelGroup | None:
        return next((g for g in self.groups if any(p.name == name for p in g.producers)), None)


# ------------------------------------------------------------------------------ predictions


class _Predictions(TorchFunctionMode):
    """Collects what the loss pass hands to loss functions (`F.cross_entropy(logits, ...)`)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[Tensor] = []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in PREDICTION_LOSSES:
            prediction = args[0] if args else kwargs.get("input")
            if isinstance(prediction, Tensor):
                self.found.append(prediction.detach())
        return func(*args, **kwargs)


@torch.no_grad()
def predictions(
    model: nn.Module, loss_fn: LossFn, batch: Any, tensors: Mapping[str, Tensor] | None = None
) -> list[Tensor]:
    """The predictions `loss_fn(model, batch)` hands to loss functions (or the loss itself when it
    calls none), in eval mode, with `tensors` substituted for parameters and buffers when given."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        recorder = _Predictions()
        with recorder:
            loss = loss_fn(model, batch) if tensors is None else _call_with(model, loss_fn, batch, tensors)
        if isinstance(loss, Mapping):
            loss = loss.get("loss")
        return recorder.found or ([loss.detach()] if isinstance(loss, Tensor) else [])
    finally:
        for module, flag in flags:
            module.training = flag


def _call_with(model: nn.Module, loss_fn: LossFn, batch: Any, tensors: Mapping[str, Tensor]) -> Any:
    named = dict(model.named_parameters())
    params = {n: tensors.get(n, p) for n, p in named.items()}
    buffers = {n: tensors.get(n, b) for n, b in model.named_buffers()}
    return StatelessLoss(model, loss_fn, buffers)(params, batch)


def _agree(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """The largest difference between two lists of predictions, relative to their scale; inf when
    their shapes differ."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b, strict=True)) or not a:
        return float("inf")
    scale = max(float(x.abs().max()) for x in a) or 1.0
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b, strict=True)) / scale


# ------------------------------------------------------------------------------ the graph


@contextmanager
def rollback(model: nn.Module) -> Iterator[Callable[[], None]]:
    """Yields `undo()`, which puts back every module's parameters, buffers, submodules and
    attributes as they were on entry (what torch-pruning changes when it removes channels)."""
    saved = [(m, dict(m.__dict__), tuple(dict(t) for t in module_tables(m))) for m in model.modules()]

    def undo() -> None:
        for module, attrs, tables in saved:
            module.__dict__.clear()
            module.__dict__.update(attrs)
            for name, table in zip(("_parameters", "_buffers", "_modules"), tables, strict=True):
                module.__dict__[name] = dict(table)

    yield undo


def build_graph(model: nn.Module, loss_fn: LossFn, batch: Any) -> Any:
    """Torch-pruning's `DependencyGraph`, traced through `loss_fn(model, batch)` in eval mode."""
    tp = _tp()
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=batch, forward_fn=lambda m, b: _as_output(loss_fn(m, b)), verbose=False
            )
    finally:
        for module, flag in flags:
            module.training = flag


def _as_output(loss: Any) -> Any:
    return loss.get("loss") if isinstance(loss, Mapping) else loss


def out_channel_handler(module: nn.Module) -> Any:
    tp = _tp()
    return tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def _group_of(
    graph: Any, model: nn.Module, name: str, names: set[str] | None
) -> tuple[ChannelGroup | None, str]:
    """The group rooted at weight `name`, or `(None, why not)`; a coupled weight outside `names`
    excludes the group (`names=None`: any coupled weight joins it)."""
    module = model.get_submodule(name.rpartition(".")[0])
    if not isinstance(module, (*_CONVS, nn.Linear)) or name.rpartition(".")[2] != "weight":
        return None, f"{type(module).__name__} weights are not pruned by output channel here"
    size = module.weight.shape[0]
    if module not in graph.module2node:
        return (
            None,
            f"torch-pruning's graph does not see {type(module).__name__} "
            f"`{name.rpartition('.')[0]}` on its own",
        )
    group = graph.get_pruning_group(module, out_channel_handler(module), idxs=list(range(size)))
    where = _module_names(model)
    producers: dict[str, Coupled] = {}
    dead: dict[str, Coupled] = {}
    for item in group.items:
        target, handler = item.dep.target.module, item.dep.handler
        if not graph.is_out_channel_pruning_fn(handler):
            continue
        if not isinstance(target, nn.Module):  # an unwrapped nn.Parameter
            return None, "its channels reach a bare nn.Parameter, which torch-pruning would cut too"
        owner = where.get(id(target))
        if owner is None:  # an op node of the graph (add, relu, ...)
            continue
        index = torch.tensor(item.idxs, dtype=torch.long)
        root = torch.tensor(item.root_idxs, dtype=torch.long)
        prefix = f"{owner}." if owner else ""
        if isinstance(target, (*_CONVS, nn.Linear)):
            weight = f"{prefix}weight"
            if names is not None and weight not in names:
                return None, f"its channels are coupled with {weight}, which is not pruned"
            producers[weight] = Coupled(weight, index, root)
            if getattr(target, "bias", None) is not None:
                dead[f"{prefix}bias"] = Coupled(f"{prefix}bias", index, root)
        elif isinstance(target, _NORMS):
            for leaf in ("weight", "bias"):
                if getattr(target, leaf, None) is not None:
                    dead[f"{prefix}{leaf}"] = Coupled(f"{prefix}{leaf}", index, root)
        elif any(True for _ in target.parameters(recurse=False)):
            return (
                None,
                f"its channels reach {owner} ({type(target).__name__}), which this check does not cover",
            )
    plain = ChannelGroup(name, size, tuple(producers.values()), tuple(dead.values()))
    return _as_heads(model, plain) or plain, ""


def _attention_of(model: nn.Module, group: ChannelGroup) -> tuple[str, int, int] | None:
    """`(module name, head count, head size)` when the group's producers are the projections of
    one attention module that declares its heads (see the module docstring), else None: two or
    three projections of `heads x head size` rows each, or one packed `qkv` projection of
    `3 x heads x head size` rows (timm's layout: all query rows, then key, then value)."""
    owners = {member.name.rpartition(".")[0].rpartition(".")[0] for member in group.producers}
    if len(owners) != 1:
        return None
    owner = owners.pop()
    module = model.get_submodule(owner)
    size, count = _int_attr(module, HEAD_SIZE_ATTRS), _int_attr(module, HEAD_COUNT_ATTRS)
    if size is None or count is None or size < 2:
        return None
    named = dict(model.named_parameters())
    rows = {named[member.name].shape[0] for member in group.producers}
    separate = len(group.producers) >= 2 and rows == {count * size} == {group.size}
    packed = len(group.producers) == 1 and rows == {3 * count * size} == {group.size}
    if not (separate or packed):
        return None  # e.g. grouped-query attention (fewer key/value heads): not grouped by head
    return owner, count, size


def _int_attr(module: nn.Module, names: Sequence[str]) -> int | None:
    """The first of the attributes `names` that `module` holds as an int, or None."""
    return next((v for a in names if isinstance(v := getattr(module, a, None), int)), None)


def _as_heads(model: nn.Module, group: ChannelGroup) -> ChannelGroup | None:
    """The group with the attention heads as its channels, when it is one (else None)."""
    found = _attention_of(model, group)
    if found is None:
        return None
    owner, count, size = found

    def per_head(member: Coupled) -> Coupled:  # row r of the root weight: head (r mod inner) // size
        head = torch.div(member.root % (count * size), size, rounding_mode="floor")
        return Coupled(member.name, member.index, head)

    return ChannelGroup(
        group.root,
        count,
        tuple(per_head(m) for m in group.producers),
        tuple(per_head(m) for m in group.dead_with),
        rows=group.size // count,
        attention=owner,
    )


def _masked_tensors(model: nn.Module, removed: Mapping[ChannelGroup, Sequence[int]]) -> dict[str, Tensor]:
    """The dense model's parameters with the removed channels zeroed (rows, biases, norms)."""
    named = dict(model.named_parameters())
    out: dict[str, Tensor] = {}
    for group, channels in removed.items():
        keep = torch.ones(group.size, dtype=torch.bool)
        keep[list(channels)] = False
        for name, mask in group.expand(keep, {n: named[n].shape for n in _members(group)}).items():
            base = out.get(name, named[name].detach())
            out[name] = base * mask.to(base.device, base.dtype)
    return out


def _members(group: ChannelGroup) -> list[str]:
    return [m.name for m in (*group.producers, *group.dead_with)]


def remove_channels(graph: Any, model: nn.Module, removed: Mapping[ChannelGroup, Sequence[int]]) -> None:
    """Remove the given channels of each group through torch-pruning, in place."""
    for group, channels in removed.items():
        if channels:
            module = model.get_submodule(group.root.rpartition(".")[0])
            rows = _root_rows(group, channels)
            graph.get_pruning_group(module, out_channel_handler(module), idxs=rows).prune()
            if group.attention:
                _set_head_count(model.get_submodule(group.attention), group.size - len(set(channels)))


def _root_rows(group: ChannelGroup, channels: Sequence[int]) -> list[int]:
    """The rows of the group's root weight that hold the given group channels (the channels
    themselves, unless a channel is a head of several rows)."""
    root = next((m for m in group.producers if m.name == group.root), None)
    if root is None:
        return sorted(int(c) for c in channels)
    chosen = torch.isin(root.root, torch.tensor([int(c) for c in channels], dtype=torch.long))
    return sorted(int(r) for r in root.index[chosen])


def _set_head_count(module: nn.Module, heads: int) -> None:
    """Set the attention module's head count to `heads`, and the widths it keeps (heads x head
    size: `all_head_size`, `attn_dim`) to match."""
    size = _int_attr(module, HEAD_SIZE_ATTRS)
    assert size is not None, "only attention groups (whose module declares its head size) get here"
    for attr in HEAD_COUNT_ATTRS:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, heads)
    for attr in INNER_WIDTH_ATTRS:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, heads * size)


def check_removal(
    model: nn.Module, loss_fn: LossFn, batch: Any, removed: Mapping[ChannelGroup, Sequence[int]]
) -> float:
    """Remove the channels (in place, then undone) and compare with masking them: the largest
    relative difference of the predictions."""
    reference = predictions(model, loss_fn, batch, _masked_tensors(model, removed))
    with rollback(model) as undo:
        try:
            remove_channels(build_graph(model, loss_fn, batch), model, removed)
            return _agree(reference, predictions(model, loss_fn, batch))
        except Exception:  # the graph's removal itself failed
            return float("inf")
        finally:
            undo()


def channel_groups(
    model: nn.Module, loss_fn: LossFn, batch: Any, names: Sequence[str], *, closed: bool = True
) -> ChannelGroups:
    """The channel groups of the weights `names` (each pruned by output channel), checked.

    Args:
        model: the network (left as it was: the check removes channels and puts them back).
        loss_fn: `loss_fn(model, batch)`, traced once by torch-pruning and run for the check.
        batch: one batch.
        names: the weights to prune (Linear and Conv weights; others are excluded).
        closed: a group that reaches a weight outside `names` is excluded (`False`: the weight
            joins the group, as when shrinking: removing a channel removes it everywhere).

    Returns:
        The groups, and the weights left whole with the reason (a coupling with a weight outside
        `names`, a tensor type the check does not cover, or a graph that fails the check).
    """
    graph = build_graph(model, loss_fn, batch)
    wanted = set(names) if closed else None
    found = ChannelGroups()
    for name in names:
        if any(name in _members(g) for g in found.groups) or name in found.excluded:
            continue
        group, why = _group_of(graph, model, name, wanted)
        if group is None:
            found.excluded[name] = why
            continue
        found.groups.append(group)
    if (
        found.groups
        and check_removal(model, loss_fn, batch, {g: [g.size - 1] for g in found.groups}) > CHECK_TOLERANCE
    ):
        for group in list(found.groups):  # find the groups the graph gets wrong
            error = check_removal(model, loss_fn, batch, {group: [group.size - 1]})
            if error > CHECK_TOLERANCE:
                found.groups.remove(group)
                reason = (
                    "removing its channels through torch-pruning's graph does not give the masked "
                    f"network (relative difference {error:.2g}): an op between the layers is one the "
                    "graph does not follow (e.g. a channel-dimension pad)"
                )
                for member in group.producers:
                    found.excluded[member.name] = reason
    return found
