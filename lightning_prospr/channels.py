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
3 x heads x head size rows (timm's `Attention`, and GPT-2's `c_attn`, whose `split_size` follows
too). `nn.MultiheadAttention` (a bare `in_proj_weight`) is not grouped by head; it stays whole.

**The Llama family's heads, from the layout.** In Hugging Face's Llama, Mistral, Mixtral, Qwen,
Gemma, OPT, GPT-J and Phi attention (children `q_proj`, `k_proj`, `v_proj` and `o_proj`, `out_proj`
or `dense`, an integer `head_dim`), and in GPT-NeoX's (one `query_key_value` holding each head's
query, key and value rows together, and `dense`; `head_size`) and Phi-3's (one `qkv_proj`
holding all query rows, then all key rows, then all value rows, and `o_proj`; the module gets its
own copy of the config, whose head counts its forward reads), the head groups are read from the
module rather than searched in the graph: rotary position embeddings concatenate the two halves of
each head, and torch-pruning's search goes round that for ever (it is bounded, `SEARCH_REVISITS`,
for the models these layouts do not cover). With grouped-query attention a channel is one key/value
head together with the query heads that read it, Hugging Face's `repeat_kv` order: of $h$ query
heads on $h_{kv}$ key/value heads, query head $i$ reads key/value head $\\lfloor i h_{kv} / h
\\rfloor$; with one key/value head for all query heads (multi-query attention) a channel is a query
head, with its output projection columns, and the key and value projections stay whole. These
groups are removed here (the projections' rows and biases, the output projection's
input columns, the `num_key_value_heads` and head counts the module holds), and checked by running
them like the others; a module that uses its heads differently fails the check and stays whole.

**Hugging Face's `Conv1D`** (GPT-2's Linear) holds its weight as `(in, out)`, so its output
channels are its weight's *columns*: [`Coupled.dim`][lightning_prospr.channels.Coupled] says which
dimension a tensor's channels run along, and torch-pruning is given a pruner for the layer (its
columns and bias on the output side, its rows on the input side). Hugging Face models trace with
their key/value cache off (`config.use_cache = False` for the one loss pass, then put back): the
cache's concatenation along the sequence is an op torch-pruning's graph fails on.

A group whose positions, as the graph maps them, fall outside a tensor (GPT-NeoX's packed
projection gave negative ones) is left whole with that reason.

A removed channel's norm scale and shift and its biases are masked too
([`ChannelGroup.dead_with`][lightning_prospr.channels.ChannelGroup]): without that, a BatchNorm
after a pruned convolution still emits its shift $\\beta$ into the next layer, and the masked
network is not the network that removing the channel gives.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_prospr.compat import module_tables
from lightning_prospr.linearized import PREDICTION_LOSSES
from lightning_prospr.prunable import is_hf_conv1d, output_dim
from lightning_prospr.stateless import LossFn, StatelessLoss

__all__ = ["ChannelGroup", "ChannelGroups", "Coupled", "channel_groups", "predictions"]

#: Relative tolerance of the check that a group removes what masking it removes.
CHECK_TOLERANCE = 1e-4
#: How often torch-pruning's search for one group may reach the same tensor (and handler) with a
#: new set of channel indices before the search is taken as endless: a concatenation reached from
#: several paths gives a few sets, a cycle of index shifts (rotary embeddings) gives new ones forever.
SEARCH_REVISITS = 64
#: Attributes of an attention module that give its head size, and its head count.
HEAD_SIZE_ATTRS = ("attention_head_size", "head_dim", "head_size")
HEAD_COUNT_ATTRS = ("num_attention_heads", "num_heads")
#: Attributes that hold the width heads x head size (Hugging Face's BERT and GPT-2, timm).
INNER_WIDTH_ATTRS = ("all_head_size", "attn_dim", "split_size")
#: The key/value head count of a grouped-query attention module, where it keeps one, and its
#: query heads per key/value head.
KV_HEAD_COUNT_ATTRS = ("num_key_value_heads",)
KV_GROUP_ATTRS = ("num_key_value_groups",)
#: Children of an attention module whose heads are grouped from its layout (Hugging Face's Llama
#: family: Llama, Mistral, Mixtral, Qwen2, Qwen3, Gemma, ...): the query, key and value projections,
#: and the output projection (`o_proj`; `out_proj` in OPT and GPT-J, `dense` in Phi).
PROJECTIONS = ("q_proj", "k_proj", "v_proj")
OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "dense")
#: The packed projection, each head's query, key and value rows together, and the output
#: projection of an attention module grouped from its layout (Hugging Face's GPT-NeoX / Pythia).
PACKED_PROJECTION = ("query_key_value", "dense")
#: The split projection, all query rows, then all key rows, then all value rows (with
#: grouped-query attention), and the output projection (Hugging Face's Phi-3, Phi-3.5, Phi-4-mini).
SPLIT_PROJECTION = ("qkv_proj", "o_proj")
#: The layouts by the child that names them: `(input projections, output projection candidates)`.
_LAYOUTS = {
    **dict.fromkeys(PROJECTIONS, (PROJECTIONS, OUTPUT_PROJECTIONS)),
    PACKED_PROJECTION[0]: (PACKED_PROJECTION[:1], PACKED_PROJECTION[1:]),
    SPLIT_PROJECTION[0]: (SPLIT_PROJECTION[:1], SPLIT_PROJECTION[1:]),
}

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


@cache
def _conv1d_pruner() -> Any:
    """Torch-pruning's pruner for Hugging Face's `Conv1D` (weight `(in, out)`, bias `(out,)`), one
    instance, so that its bound methods are the handlers the graph was built with."""
    base: Any = _tp().pruner.BasePruningFunc

    def kept(size: int, idxs: Sequence[int]) -> list[int]:
        removed = set(idxs)
        return [i for i in range(size) if i not in removed]

    def replaced(old: Tensor, new: Tensor) -> nn.Parameter:
        return nn.Parameter(new.clone(), requires_grad=old.requires_grad)

    class Conv1DPruner(base):
        TARGET_MODULES = None

        def prune_out_channels(self, layer: Any, idxs: Sequence[int]) -> nn.Module:
            keep = kept(layer.weight.shape[1], idxs)
            layer.weight = replaced(layer.weight, layer.weight.data[:, keep])
            if layer.bias is not None:
                layer.bias = replaced(layer.bias, layer.bias.data[keep])
            layer.nf = len(keep)
            return cast(nn.Module, layer)

        def prune_in_channels(self, layer: Any, idxs: Sequence[int]) -> nn.Module:
            keep = kept(layer.weight.shape[0], idxs)
            layer.weight = replaced(layer.weight, layer.weight.data[keep, :])
            if isinstance(getattr(layer, "nx", None), int):
                layer.nx = len(keep)
            return cast(nn.Module, layer)

        def get_out_channels(self, layer: Any) -> int:
            return int(layer.weight.shape[1])

        def get_in_channels(self, layer: Any) -> int:
            return int(layer.weight.shape[0])

    return Conv1DPruner()


@dataclass(frozen=True)
class Coupled:
    """The positions of one tensor that belong to a group's channels.

    Attributes:
        name: the parameter (`"layer1.0.conv2.weight"`, `"layer1.0.bn2.bias"`).
        index: positions along the tensor's dimension `dim`.
        root: the group channel of each position (same length as `index`).
        dim: the dimension the channels run along: 0, but 1 for the weight of Hugging Face's
            `Conv1D`, which is `(in, out)`.
    """

    name: str
    index: Tensor
    root: Tensor
    dim: int = 0


@dataclass(frozen=True)
class ChannelGroup:
    """Channels removed together: each of the `size` channels is one row in every producer.

    Attributes:
        root: the weight torch-pruning prunes the group through (one of the producers).
        size: the number of channels.
        producers: the pruned weights whose rows (columns for a `Conv1D`) are the group's channels
            (each a `Coupled`).
        dead_with: biases and norm scales and shifts of those channels, masked with them.
        rows: rows of the root weight per channel: 1, or, when the channels are the heads of an
            attention module, a head's rows (its size; 3 x its size in a packed `qkv` weight; with
            grouped-query attention, those of a key/value head and the query heads that read it).
        attention: that attention module's name (its head count is updated on removal), or `""`.
        readers: the input columns that read the channels (`dim` 1), when the group was found from
            its attention module's layout rather than torch-pruning's graph: the group is then
            removed here, its producers' rows and biases and these columns, without the graph.
        shared_key_value: the channels are query heads that read the attention module's one
            key/value head (multi-query attention, found from its layout): the key/value head
            stays, and the module's `num_key_value_groups` follows the removal. A head whose query
            rows are masked still outputs the mean of the shared values, so its readers' columns
            are in `dead_with` too, masked with it.
    """

    root: str
    size: int
    producers: tuple[Coupled, ...]
    dead_with: tuple[Coupled, ...] = ()
    rows: int = 1
    attention: str = ""
    readers: tuple[Coupled, ...] = ()
    shared_key_value: bool = False

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
            shape = shapes[member.name]
            rows = torch.ones(shape[member.dim], dtype=torch.bool)
            rows[member.index] = keep[member.root]
            view = [1] * len(shape)
            view[member.dim] = -1
            out[member.name] = rows.reshape(view).expand(shape)
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
    """The predictions `loss_fn(model, batch)` hands to loss functions (or, when it calls none, its
    loss, or the tensors of its output), in eval mode, with `tensors` substituted for parameters
    and buffers when given."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        recorder = _Predictions()
        with recorder:
            loss = loss_fn(model, batch) if tensors is None else _call_with(model, loss_fn, batch, tensors)
        return recorder.found or [t.detach() for t in _tensors(_as_output(loss))]
    finally:
        for module, flag in flags:
            module.training = flag


def _tensors(output: Any) -> list[Tensor]:
    """The tensors in an output (a tensor, or nested mappings, lists and tuples of them)."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _tensors(item)]
    return []


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
    """Torch-pruning's `DependencyGraph`, traced through `loss_fn(model, batch)` in eval mode (with
    Hugging Face's key/value cache off, and a pruner for its `Conv1D`).

    Raises:
        ValueError: when torch-pruning fails to trace the loss pass (its error is chained).
    """
    tp = _tp()
    flags = [(m, m.training) for m in model.modules()]
    pruners = {type(m): _conv1d_pruner() for m in model.modules() if is_hf_conv1d(m)}
    model.eval()
    try:
        with torch.enable_grad(), _without_kv_cache(model):
            return tp.DependencyGraph().build_dependency(
                model,
                example_inputs=batch,
                forward_fn=lambda m, b: _as_output(loss_fn(m, b)),
                customized_pruners=pruners or None,
                verbose=False,
            )
    except Exception as err:
        raise ValueError(
            f"torch-pruning could not trace which channels are coupled ({type(err).__name__}: {err}); "
            "structured pruning and shrink need its graph of one loss pass. If the loss turns on a "
            "key/value cache (`use_cache=True`), leave it off for that pass; otherwise prune "
            "unstructured (structured=False)."
        ) from err
    finally:
        for module, flag in flags:
            module.training = flag


@contextmanager
def _without_kv_cache(model: nn.Module) -> Iterator[None]:
    """Hugging Face configs (a submodule's `config` with `use_cache`) set to `use_cache=False`, then
    put back."""
    found = (getattr(m, "config", None) for m in model.modules())
    configs: dict[int, Any] = {id(c): c for c in found if getattr(c, "use_cache", None) is True}
    for config in configs.values():
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs.values():
            config.use_cache = True


class _EndlessSearch(Exception):
    """Torch-pruning's group search kept finding new index sets for the same tensor."""


@contextmanager
def _bounded_search() -> Iterator[None]:
    """Torch-pruning's `Group.add_dep` (public, called once per dependency its search adds) counted
    per target and handler for one search; `_EndlessSearch` past `SEARCH_REVISITS`. Without a
    bound, `get_pruning_group` never returns on Llama's query and key projections."""
    group_type = _tp().dependency.Group
    original = group_type.add_dep
    seen: dict[tuple[int, Any], int] = {}

    def add_dep(self: Any, dep: Any, idxs: Any) -> Any:
        key = (id(dep.target), dep.handler)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > SEARCH_REVISITS:
            raise _EndlessSearch
        return original(self, dep, idxs)

    group_type.add_dep = add_dep
    try:
        yield
    finally:
        group_type.add_dep = original


def _as_output(loss: Any) -> Any:
    """The loss of a `{"loss": ...}` mapping; any other output (a Hugging Face `ModelOutput` of a
    forward without labels) is traced whole."""
    return loss["loss"] if isinstance(loss, Mapping) and loss.get("loss") is not None else loss


def out_channel_handler(module: nn.Module) -> Any:
    tp = _tp()
    if is_hf_conv1d(module):
        return _conv1d_pruner().prune_out_channels
    return tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels


def _by_output(module: nn.Module) -> bool:
    """Whether the layer's weight is pruned by output channel here (Linear, ConvNd, `Conv1D`)."""
    return isinstance(module, (*_CONVS, nn.Linear)) or is_hf_conv1d(module)


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def _group_of(
    graph: Any, model: nn.Module, name: str, names: set[str] | None
) -> tuple[ChannelGroup | None, str]:
    """The group rooted at weight `name`, or `(None, why not)`; a coupled weight outside `names`
    excludes the group (`names=None`: any coupled weight joins it)."""
    module = model.get_submodule(name.rpartition(".")[0])
    if not _by_output(module) or name.rpartition(".")[2] != "weight":
        return None, f"{type(module).__name__} weights are not pruned by output channel here"
    size = int(cast(Tensor, module.weight).shape[output_dim(model, name)])
    if module not in graph.module2node:
        return (
            None,
            f"torch-pruning's graph does not see {type(module).__name__} "
            f"`{name.rpartition('.')[0]}` on its own",
        )
    try:
        with _bounded_search():
            group = graph.get_pruning_group(module, out_channel_handler(module), idxs=list(range(size)))
    except _EndlessSearch:
        return None, (
            f"torch-pruning's search for the channels coupled with it did not end (one tensor reached "
            f"with more than {SEARCH_REVISITS} different index sets; rotary position embeddings, which "
            "concatenate the halves of each head, do this)"
        )
    except Exception as err:  # torch-pruning's own index mapping failed (Falcon's grouped heads)
        return None, (
            f"torch-pruning's search for the channels coupled with it failed ({type(err).__name__}: {err})"
        )
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
        if _by_output(target):
            weight = f"{prefix}weight"
            if names is not None and weight not in names:
                return None, f"its channels are coupled with {weight}, which is not pruned"
            producers[weight] = Coupled(weight, index, root, output_dim(model, weight))
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
    for member in (*producers.values(), *dead.values()):
        extent = int(model.get_parameter(member.name).shape[member.dim])
        if member.index.numel() and not (0 <= int(member.index.min()) <= int(member.index.max()) < extent):
            return None, (
                f"torch-pruning's graph maps its channels to positions {int(member.index.min())} to "
                f"{int(member.index.max())} of `{member.name}`, which has {extent}: an op between the "
                "layers is one the graph does not follow (GPT-NeoX's rotary split of a packed "
                "query_key_value does this)"
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
    rows = {named[member.name].shape[member.dim] for member in group.producers}
    separate = len(group.producers) >= 2 and rows == {count * size} == {group.size}
    packed = len(group.producers) == 1 and rows == {3 * count * size} == {group.size}
    if not (separate or packed):
        return None  # e.g. grouped-query attention (fewer key/value heads): see `_layout_heads`
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
        return Coupled(member.name, member.index, head, member.dim)

    return ChannelGroup(
        group.root,
        count,
        tuple(per_head(m) for m in group.producers),
        tuple(per_head(m) for m in group.dead_with),
        rows=group.size // count,
        attention=owner,
    )


def _layout_heads(
    model: nn.Module, name: str, names: set[str] | None
) -> tuple[ChannelGroup | None, str] | None:
    r"""The head group of the attention module whose query, key or value projection `name` is (or
    whose packed or split projection, see `PACKED_PROJECTION` and `SPLIT_PROJECTION`), read from
    the module's layout, as `(group, "")`; None when `name` is not one, or when the projections are
    not all among the pruned weights `names`.

    The module declares its head size $d$ (`head_dim` or `head_size`). Separate projections: the
    query projection has $h d$ rows, the key and value projections $h_{kv} d$ each, and the output
    projection $h d$ input columns; the group's channels are the $h_{kv}$ key/value heads, each
    with the $h / h_{kv}$ query heads that read it (query head $i$ reads key/value head
    $\lfloor i h_{kv} / h \rfloor$, as Hugging Face's `repeat_kv` lays them out); without
    grouped-query attention ($h_{kv} = h$) they are the heads. Packed: $3 h d$ rows, each head's
    query, key and value rows one block of $3 d$ (GPT-NeoX's layout), and the output projection's
    $h d$ columns; the channels are the $h$ heads. Split: one projection of $(h + 2 h_{kv}) d$
    rows, the $h d$ query rows, then the $h_{kv} d$ key rows, then the value rows (Phi-3's
    layout), with $h_{kv}$ the module's `num_key_value_heads`; the channels are those of separate
    projections. With one key/value head for several query heads (multi-query attention, $h_{kv}
    = 1 < h$) the channels are the $h$ query heads, their query rows and output columns; the key
    and value rows stay whole, and a key or value projection's `name` gives `(None, why)`."""
    owner, _, leaf = name.rpartition(".")
    parent, _, child = owner.rpartition(".")
    if leaf != "weight" or child not in _LAYOUTS:
        return None
    attention = model.get_submodule(parent)
    size = _int_attr(attention, HEAD_SIZE_ATTRS)
    inputs, outputs = _LAYOUTS[child]
    o_name = next((n for n in outputs if isinstance(getattr(attention, n, None), nn.Linear)), None)
    layers = [getattr(attention, n, None) for n in inputs]
    if o_name is None or size is None or not all(isinstance(m, nn.Linear) for m in layers):
        return None
    linears, o = cast(list[nn.Linear], layers), cast(nn.Linear, getattr(attention, o_name))
    prefix = f"{parent}." if parent else ""
    if names is not None and any(f"{prefix}{n}.weight" not in names for n in inputs):
        return None  # not all pruned: the graph's own groups (rows, not heads), if it finds them
    heads = divmod(o.in_features, size)
    if heads[1] or not heads[0]:
        return None
    if inputs == PROJECTIONS:
        q, k, v = linears
        kv = divmod(k.out_features, size)
        if q.out_features != o.in_features or kv[1] or v.out_features != k.out_features:
            return None
        channels = kv[0]
    elif inputs == PACKED_PROJECTION[:1]:
        channels = heads[0]
        if linears[0].out_features != 3 * o.in_features:
            return None
    else:
        kv_heads = _int_attr(attention, KV_HEAD_COUNT_ATTRS)
        if kv_heads is None or linears[0].out_features != (heads[0] + 2 * kv_heads) * size:
            return None
        channels = kv_heads
    if not channels or heads[0] % channels:
        return None
    per = heads[0] // channels  # query heads per channel
    multi_query = channels == 1 and per > 1  # one key/value head (not packed: channels = heads)
    if multi_query:
        if child in PROJECTIONS[1:]:
            return None, (
                f"`{parent}` has one key/value head, read by all its {per} query heads "
                "(multi-query attention): the key and value projections stay whole, and the query "
                "heads are the channels"
            )
        channels, per, inputs, linears = heads[0], 1, inputs[:1], linears[:1]

    def coupled(tensor: str, channel_of_row: Tensor, dim: int = 0) -> Coupled:
        return Coupled(tensor, torch.arange(channel_of_row.numel()), channel_of_row, dim)

    def blocks(count: int, block: int) -> Tensor:  # rows 0..count*block-1: channel row // block
        return torch.arange(count * block) // block

    if multi_query:  # the query heads' rows (the first h d rows of a split projection)
        maps = [blocks(channels, size)]
    elif inputs == PROJECTIONS:
        maps = [blocks(channels, per * size), blocks(channels, size), blocks(channels, size)]
    elif inputs == PACKED_PROJECTION[:1]:
        maps = [blocks(channels, 3 * size)]
    else:
        query, key = blocks(channels, per * size), blocks(channels, size)
        maps = [torch.cat([query, key, key])]  # the value rows map like the key rows
    named = [(f"{prefix}{n}", m, rows) for n, m, rows in zip(inputs, linears, maps, strict=True)]
    readers = (coupled(f"{prefix}{o_name}.weight", blocks(channels, per * size), dim=1),)
    biases = tuple(coupled(f"{n}.bias", rows) for n, m, rows in named if m.bias is not None)
    return (
        ChannelGroup(
            f"{prefix}{inputs[0]}.weight",
            channels,
            tuple(coupled(f"{n}.weight", rows) for n, _, rows in named),
            # a query head with no query rows still averages the shared values: its output columns die too
            biases + readers if multi_query else biases,
            rows=int((maps[0] == 0).sum()),
            attention=parent,
            readers=readers,
            shared_key_value=multi_query,
        ),
        "",
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


def _row_members(group: ChannelGroup) -> set[str]:
    """The members whose rows are the group's channels: not its readers (an output projection's
    columns, masked with a multi-query head), whose rows may be another group's."""
    return set(_members(group)) - {r.name for r in group.readers}


def remove_channels(graph: Any, model: nn.Module, removed: Mapping[ChannelGroup, Sequence[int]]) -> None:
    """Remove the given channels of each group, in place: through torch-pruning's graph, or for a
    group found from its attention module's layout (`readers`), by that layout."""
    for group, channels in removed.items():
        if not channels:
            continue
        if group.readers:
            _remove_by_layout(model, group, channels)
        else:
            module = model.get_submodule(group.root.rpartition(".")[0])
            rows = _root_rows(group, channels)
            graph.get_pruning_group(module, out_channel_handler(module), idxs=rows).prune()
        if group.attention:
            kept, module = group.size - len(set(channels)), model.get_submodule(group.attention)
            if group.readers:  # a channel: a key/value head and the query heads that read it, or
                # (multi-query attention) a query head
                per = group.readers[0].index.numel() // group.size // _head_size(module)
                if group.shared_key_value:  # multi-query: the query heads on one key/value head
                    kv_heads = 1
                    _set_attrs(module, KV_GROUP_ATTRS, kept)
                else:
                    kv_heads = kept
                    _set_attrs(module, KV_HEAD_COUNT_ATTRS, kept)
                _set_head_count(module, kept * per)
                if group.root.rpartition(".")[0].rpartition(".")[2] == SPLIT_PROJECTION[0]:
                    _own_config(module, kept * per, kv_heads)
            else:
                _set_head_count(module, kept)


def _remove_by_layout(model: nn.Module, group: ChannelGroup, channels: Sequence[int]) -> None:
    """Remove a layout group's channels without the graph: the producers' rows (with their
    biases) and the readers' input columns, through torch-pruning's Linear pruner."""
    tp = _tp()
    chosen = torch.tensor(sorted({int(c) for c in channels}), dtype=torch.long)
    for member in (*group.producers, *group.readers):
        linear = model.get_submodule(member.name.rpartition(".")[0])
        idxs = sorted(int(i) for i in member.index[torch.isin(member.root, chosen)])
        prune = tp.prune_linear_out_channels if member.dim == 0 else tp.prune_linear_in_channels
        prune(linear, idxs)


def _head_size(module: nn.Module) -> int:
    size = _int_attr(module, HEAD_SIZE_ATTRS)
    assert size is not None, "only attention groups (whose module declares its head size) get here"
    return size


def _root_rows(group: ChannelGroup, channels: Sequence[int]) -> list[int]:
    """The rows of the group's root weight that hold the given group channels (the channels
    themselves, unless a channel is a head of several rows)."""
    root = next((m for m in group.producers if m.name == group.root), None)
    if root is None:
        return sorted(int(c) for c in channels)
    chosen = torch.isin(root.root, torch.tensor([int(c) for c in channels], dtype=torch.long))
    return sorted(int(r) for r in root.index[chosen])


def _set_head_count(module: nn.Module, heads: int) -> None:
    """Set the attention module's (query) head count to `heads`, and the widths it keeps (heads x
    head size: `all_head_size`, `attn_dim`) to match."""
    _set_attrs(module, HEAD_COUNT_ATTRS, heads)
    _set_attrs(module, INNER_WIDTH_ATTRS, heads * _head_size(module))


def _own_config(module: nn.Module, heads: int, kv_heads: int) -> None:
    """Give the attention module its own shallow copy of its `config` with the new head counts,
    where it keeps one: Phi-3's forward splits its `qkv_proj` rows at
    `config.num_attention_heads x head_dim`, and the config is shared by every layer (and the
    model), whose head counts now differ. The model's own config keeps the dense counts."""
    config = getattr(module, "config", None)
    if config is None or not isinstance(getattr(config, HEAD_COUNT_ATTRS[0], None), int):
        return
    config = copy.copy(config)
    setattr(config, HEAD_COUNT_ATTRS[0], heads)
    _set_attrs(config, KV_HEAD_COUNT_ATTRS, kv_heads)
    module.config = config


def _set_attrs(module: Any, names: Sequence[str], value: int) -> None:
    """Set those of the attributes `names` that `module` holds as an int to `value`."""
    for attr in names:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, value)


#: The seed and scale of the values `_fill_zeros` gives to parameters that are all zeros.
FILL_SEED, FILL_SCALE = 20_231, 0.1


def _fill_zeros(model: nn.Module) -> None:
    r"""Replace every floating-point parameter that is all zeros (a zero-initialized classifier,
    timm's `zero_init_last` BatchNorm scales, biases) with a new one of values drawn from
    $\mathcal{N}(0, 0.1^2)$ (its own generator: the global RNG is not touched), tied parameters
    staying tied; to be undone by `rollback`. A removal that is right for some values and wrong
    for others (a bias of a removed channel left out) would pass a check at zero: a zero head, or
    a residual branch that ends in a zero scale, hides every difference before it."""
    generator = torch.Generator().manual_seed(FILL_SEED)
    filled: dict[int, nn.Parameter] = {}
    for module in model.modules():
        parameters = module_tables(module)[0]
        for name, param in list(parameters.items()):
            if param is None or not param.is_floating_point() or bool(param.detach().any()):
                continue
            if id(param) not in filled:
                values = torch.randn(param.shape, generator=generator, dtype=torch.float32) * FILL_SCALE
                filled[id(param)] = nn.Parameter(values.to(param.device, param.dtype), param.requires_grad)
            parameters[name] = filled[id(param)]


def check_removal(
    model: nn.Module, loss_fn: LossFn, batch: Any, removed: Mapping[ChannelGroup, Sequence[int]]
) -> float:
    """Remove the channels (in place, then undone) and compare with masking them: the largest
    relative difference of the predictions, with every parameter that is all zeros given random
    values first (`_fill_zeros`)."""
    with rollback(model) as undo:
        try:
            _fill_zeros(model)
            reference = predictions(model, loss_fn, batch, _masked_tensors(model, removed))
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
        if any(name in _row_members(g) for g in found.groups) or name in found.excluded:
            continue
        group, why = _layout_heads(model, name, wanted) or _group_of(graph, model, name, wanted)
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
                    f"removing its heads by the layout of `{group.attention}` does not give the masked "
                    f"network (relative difference {error:.2g}): its forward does more with the heads "
                    "than the attention of the Llama family"
                    if group.readers
                    else "removing its channels through torch-pruning's graph does not give the masked "
                    f"network (relative difference {error:.2g}): an op between the layers is one the "
                    "graph does not follow (e.g. a channel-dimension pad)"
                )
                for member in group.producers:
                    found.excluded[member.name] = reason
    return found
