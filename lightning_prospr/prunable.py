"""Which weights are pruned by default: the weight matrices that multiply activations.

The rule is about what a parameter *does*, not which class holds it. One loss pass is watched at
the level of PyTorch's operators (a `TorchDispatchMode`) while each tensor's origin is tracked:

- a tensor computed from parameters, buffers and constants only (views, casts, slices,
  `weight_orig * weight_mask`) *derives from* those parameters;
- anything computed from the batch is an activation.

A trainable parameter with at least two dimensions is **prunable** when a tensor that derives from
it, and from no activation, is a multiplicand of a matrix product or a convolution (`mm`,
`addmm`, `bmm`, `baddbmm`, `matmul`, `linear`, every convolution, the RNN kernels) whose
other operand is an activation or another weight. So the rule picks the weight of `nn.Linear`,
every `ConvNd` and `ConvTransposeNd`, Hugging Face's `Conv1D` (GPT-2), the packed
`in_proj_weight` of `nn.MultiheadAttention`, the `weight_ih`/`weight_hh` matrices of
LSTM/GRU/RNN layers, and any parameter a custom module passes to `F.linear`, `F.conv*`,
`matmul` or `einsum`. It leaves out biases (added, not multiplied), norm scales and LayerScale
factors (elementwise), positional tables and class tokens (added or concatenated), and embeddings:

**Tied embeddings.** A parameter that is also read as an embedding table (`F.embedding`) is left
out, even where the same matrix is the output projection (GPT-2's `lm_head`, BERT's MLM decoder).
Pruning it would remove entries of the input table too, so the rule that keeps embeddings dense
would be broken through the back door, and a token's row could lose most of its features before
the first layer sees it. Name it in `parameters` to prune it anyway. An untied output layer (a
classifier, Llama's `lm_head` with `tie_word_embeddings=False`) is an ordinary matrix and is
pruned.

`prunable_parameters()` applies the rule to a loss pass; `default_parameter_names()` is the
same rule by module type, for calls that have no loss to watch (`magnitude_scores(model)`).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prospr.compat import DISPATCH_MODE
from lightning_prospr.errors import check_loss, loss_context
from lightning_prospr.model_state import preserved_state
from lightning_prospr.stateless import LossFn, StatelessLoss

__all__ = [
    "default_parameter_names",
    "is_hf_conv1d",
    "output_dim",
    "parameter_key",
    "prunable_parameters",
    "resolve_parameters",
]

_aten = torch.ops.aten

#: Matrix products and convolutions, with the argument positions of their multiplicands.
_MULTIPLICANDS: dict[Any, tuple[int, ...]] = {
    _aten.mm: (0, 1),
    _aten.addmm: (1, 2),
    _aten.bmm: (0, 1),
    _aten.baddbmm: (1, 2),
    _aten.addbmm: (1, 2),
    _aten.mv: (0, 1),
    _aten.addmv: (1, 2),
    _aten.matmul: (0, 1),
    _aten.linear: (1,),
    _aten._trilinear: (0, 1, 2),
    _aten.convolution: (1,),
    _aten._convolution: (1,),
    _aten.convolution_overrideable: (1,),
    _aten.mkldnn_convolution: (1,),
    _aten.cudnn_convolution: (1,),
    _aten.cudnn_convolution_transpose: (1,),
}
#: Recurrent kernels: their weight matrices come in the argument list (`weight_ih`, `weight_hh`).
_RECURRENT = {
    _aten.mkldnn_rnn_layer,
    _aten._cudnn_rnn,
    _aten.lstm,
    _aten.gru,
    _aten.rnn_tanh,
    _aten.rnn_relu,
    _aten.lstm_cell,
    _aten.gru_cell,
    _aten.rnn_tanh_cell,
    _aten.rnn_relu_cell,
}
#: Table lookups: their first argument is an embedding table.
_EMBEDDINGS = {_aten.embedding, _aten.embedding_bag, _aten._embedding_bag, _aten._embedding_bag_forward_only}


def _tensors(value: Any) -> list[Tensor]:
    """The tensors in an operator's arguments or outputs (nested tuples, lists and dicts)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, Mapping):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def _distinct_elements(tensor: Tensor) -> int:
    """Elements of `tensor` not repeated by broadcasting (dimensions of stride 0 count once)."""
    count = 1
    for size, stride in zip(tensor.shape, tensor.stride(), strict=True):
        if stride != 0:
            count *= size
    return count


class _Watcher:
    """Tracks which parameters each live tensor derives from, and what the operators do with them.

    A tensor is one of: derived from parameters (`origins`), constant (buffers, and tensors made
    from constants only), or an activation (everything else, the batch included: so a batch in
    any container counts as data without being found).
    """

    def __init__(self, params: Mapping[str, Tensor], buffers: Iterable[Tensor]) -> None:
        self._sizes = {name: t.numel() for name, t in params.items()}
        self._origins: dict[int, frozenset[str]] = {id(t): frozenset([name]) for name, t in params.items()}
        self._constant: set[int] = {id(b) for b in buffers}
        self._keep = list(params.values())  # the ids above stay theirs
        self.multiplied: set[str] = set()
        self.embedded: set[str] = set()

    def _forget(self, key: int) -> None:
        self._origins.pop(key, None)
        self._constant.discard(key)

    def _track(self, tensor: Tensor, origins: frozenset[str] | None) -> None:
        key = id(tensor)
        self._forget(key)
        if origins is None:  # an activation: nothing to remember
            return
        if origins:
            self._origins[key] = origins
        else:
            self._constant.add(key)
        weakref.finalize(tensor, self._forget, key)

    def _origin(self, tensor: Tensor) -> frozenset[str] | None:
        """The parameters `tensor` derives from; empty for a constant, `None` for an activation."""
        key = id(tensor)
        if key in self._origins:
            return self._origins[key]
        return frozenset() if key in self._constant else None

    def _note_weights(self, operands: Sequence[Any]) -> None:
        for operand in _tensors(list(operands)):
            origins = self._origin(operand)
            for name in origins or ():
                if self._sizes[name] >= _distinct_elements(operand):
                    self.multiplied.add(name)

    def on_operator(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        packet = func.overloadpacket
        positions = _MULTIPLICANDS.get(packet)
        if positions is not None:
            self._note_weights([args[i] for i in positions if i < len(args)])
        elif packet in _RECURRENT:
            self._note_weights(list(args))
        elif packet in _EMBEDDINGS and args and isinstance(args[0], Tensor):
            self.embedded |= self._origin(args[0]) or frozenset()
        inputs = [self._origin(t) for t in _tensors([args, kwargs])]
        origins: frozenset[str] | None = frozenset()
        for found in inputs:
            origins = None if found is None or origins is None else origins | found
        for tensor in _tensors(out):
            self._track(tensor, origins)


def _watch(watcher: _Watcher) -> Any:
    """A `TorchDispatchMode` that reports every operator to `watcher`."""
    mode = DISPATCH_MODE.get()

    class _Mode(mode):  # type: ignore[misc, valid-type]
        def __torch_dispatch__(
            self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
        ) -> Any:
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            watcher.on_operator(func, args, kwargs, out)
            return out

    return _Mode()


def _plain_name(key: str) -> str:
    """`"fc.weight_orig"` (a weight under a `torch.nn.utils.prune` mask) -> `"fc.weight"`."""
    return key.removesuffix("_orig")


def prunable_parameters(model: nn.Module, loss_fn: LossFn, batch: Any) -> list[str]:
    """The default set of weights to prune, found by watching `loss_fn(model, batch)` once.

    Args:
        model: any `nn.Module`; left exactly as it was (the pass runs in train mode on cloned
            buffers, with the parameters substituted through `torch.func.functional_call()`,
            and the RNG restored).
        loss_fn: `loss_fn(model, batch) -> loss`, as for [`prospr_scores()`][lightning_prospr.prospr_scores].
        batch: one batch, on the model's device.

    Returns:
        Names in `model.named_parameters()` order (a weight under a `torch.nn.utils.prune`
        mask by its plain name, `"fc.weight"`); frozen parameters are left out. See the module
        docstring for the rule.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_prospr.prunable import prunable_parameters
        >>> net = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 3))
        >>> loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]).mean(1), b[1])
        >>> prunable_parameters(net, loss_fn, (torch.randint(0, 10, (2, 5)), torch.tensor([0, 2])))
        ['2.weight']
    """
    named = dict(model.named_parameters())
    if not named:
        return []
    params = {n: p.detach().requires_grad_(p.requires_grad) for n, p in named.items()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    watcher = _Watcher(params, buffers.values())
    with preserved_state(model, next(iter(named.values())).device), torch.enable_grad():
        model.train()
        loss = StatelessLoss(model, loss_fn, buffers)
        where = "while finding the weights to prune (batch 0)"
        watch = _watch(watcher)
        with loss_context(where):
            with watch:
                value = loss(params, batch)
            check_loss(value, where, source=loss.source, hint=loss.hint)
    chosen = watcher.multiplied - watcher.embedded
    return [_plain_name(n) for n, p in named.items() if n in chosen and p.requires_grad and p.dim() >= 2]


# --------------------------------------------------------------------------- the rule by module type


#: Modules whose `weight` is a weight matrix (the lazy variants become these once initialised).
_WEIGHT_MODULES = (
    nn.Linear,
    nn.Bilinear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def _module_weights(module: nn.Module) -> list[str]:
    """The attribute names of `module`'s own weight matrices, by its type."""
    if isinstance(module, _WEIGHT_MODULES):
        return ["weight"]
    if is_hf_conv1d(module):
        return ["weight"]  # Hugging Face's transposed Linear (GPT-2)
    if isinstance(module, nn.MultiheadAttention):
        return ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"]
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return [
            name
            for name, _ in module.named_parameters(recurse=False)
            if name.startswith(("weight_ih", "weight_hh", "weight_hr"))
        ]
    return []


def default_parameter_names(model: nn.Module) -> list[str]:
    """The default set by module type, for calls that have no loss pass to watch.

    The weight of every Linear, Bilinear, ConvNd, ConvTransposeNd and Hugging Face `Conv1D`, the
    input projections of `nn.MultiheadAttention` and the weight matrices of RNN, LSTM and GRU
    layers and cells, trainable, each tensor once (tied weights under their first name), a weight
    under a `torch.nn.utils.prune` mask by its plain name; a matrix that is also an
    `nn.Embedding`'s table is left out. On the models of the docs' table this is exactly what
    `prunable_parameters()` finds; it cannot see weights that custom modules use through
    `F.linear` or `matmul`.
    """
    canonical = {id(p): name for name, p in model.named_parameters()}
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    names: set[str] = set()
    for module in model.modules():
        for attr in _module_weights(module):
            param = getattr(module, f"{attr}_orig", None)
            if not isinstance(param, nn.Parameter):
                param = getattr(module, attr, None)
            if isinstance(param, nn.Parameter) and param.requires_grad and id(param) not in embedded:
                names.add(canonical[id(param)])
    return [_plain_name(n) for n in canonical.values() if n in names]


# ------------------------------------------------------------------------------ names as given


def resolve_parameters(
    model: nn.Module,
    parameters: Sequence[str] | None,
    loss_fn: LossFn | None = None,
    batch: Any = None,
) -> list[str]:
    """Check `parameters` against the model (or pick the default set) and return the names.

    The default set (`parameters=None`) is
    [`prunable_parameters`][lightning_prospr.prunable.prunable_parameters] when a loss and a batch
    are given (one watched loss pass), else the same rule by module type
    ([`default_parameter_names`][lightning_prospr.prunable.default_parameter_names]). A name may be
    given plainly (`"fc.weight"`) for a weight that carries a `torch.nn.utils.prune`
    re-parametrization (`fc.weight_orig` and `fc.weight_mask`).
    """
    if parameters is None:
        names = (
            prunable_parameters(model, loss_fn, batch)
            if loss_fn is not None
            else default_parameter_names(model)
        )
        if not names:
            raise ValueError(
                f"{type(model).__name__} has no trainable weight matrix to prune (no parameter of two or "
                "more dimensions is multiplied with activations in the loss): pass `parameters` with the "
                "names (from model.named_parameters()) of the weights to score."
            )
        return names
    if isinstance(parameters, str):
        raise TypeError(f"`parameters` must be a list of names, not a string: use [{parameters!r}].")
    names = [_plain_name(n) for n in dict.fromkeys(parameters)]
    if not names:
        raise ValueError("`parameters` is empty: pass None for the default set, or some names.")
    named = dict(model.named_parameters())
    unknown = [n for n in names if n not in named and f"{n}_orig" not in named]
    if unknown:
        raise ValueError(
            f"`parameters` names {unknown}, which are not parameters of {type(model).__name__}. "
            f"Known names include {list(named)[:8]}."
        )
    return names


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether `module` is Hugging Face's `Conv1D` (GPT-2's Linear, with its weight `(in, out)`)."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def output_dim(model: nn.Module, name: str) -> int:
    """The dimension of weight `name` that runs over the layer's output channels: 1 for Hugging
    Face's `Conv1D` (`(in, out)`), 0 for every other layer (Linear, ConvNd, attention, RNN)."""
    module = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    return 1 if is_hf_conv1d(module) else 0


def parameter_key(named: Mapping[str, Tensor], name: str) -> str:
    """The key of weight `name` in `named_parameters()`: `name` or, when pruned, `name + "_orig"`."""
    return name if name in named else f"{name}_orig"
