"""N:M semi-structured masks: N of every M consecutive weights along a layer's input dimension.

With `pattern="2:4"` (in general `"N:M"`) each group of $M$ consecutive weights that one output
unit applies to consecutive inputs keeps the $N$ with the best scores, so every layer, and every
output row, has density exactly $N / M$. That is the layout NVIDIA's sparse tensor cores
(Ampere and later) execute at up to twice the dense speed;
[`to_semi_structured`][lightning_prospr.semi_structured.to_semi_structured] turns trained,
masked `nn.Linear` layers into `torch.sparse.to_sparse_semi_structured` weights.

The input dimension of a weight: dim 1 of a Linear `(out, in)`, of a convolution
`(out, in / groups, *kernel)` (groups of consecutive input channels at each kernel position, as
NVIDIA's ASP prunes convolutions), of RNN matrices and of `nn.MultiheadAttention`'s projections;
dim 0 of a transposed convolution `(in, out / groups, *kernel)` and of Hugging Face's `Conv1D`
`(in, out)`. **A weight whose input dimension is not a multiple of M is left dense** (one warning
names it): padding would keep weights that multiply nothing, and a sparse kernel could not run
it anyway. The global sparsity is then below $1 - N / M$; the report prints the real one.

The pattern fixes every layer's density, so it replaces the layer-wise `allocation` and the
layer-collapse guard (which adds weights wherever a path needs them, breaking the pattern): both
must be left at their defaults (`"global"`, and `guard="off"`), and one round (a pattern cannot be
reached on an exponential schedule of densities). Every method's scores can choose the N.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from lightning_prospr.prunable import is_hf_conv1d

__all__ = ["input_dimension", "nm_masks", "parse_pattern", "to_semi_structured"]

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str) -> tuple[int, int]:
    """`"N:M"` -> `(N, M)`, with `1 <= N < M`.

    Example:
        >>> parse_pattern("2:4")
        (2, 4)
    """
    match = _PATTERN.match(pattern) if isinstance(pattern, str) else None
    if match is None or not 1 <= int(match[1]) < int(match[2]):
        raise ValueError(
            f"`pattern` must be 'N:M' with 1 <= N < M (keep N of every M weights), got {pattern!r}; "
            "sparse tensor cores run '2:4'."
        )
    return int(match[1]), int(match[2])


def input_dimension(model: nn.Module, name: str) -> int:
    """The dimension of weight `name` that runs over the layer's inputs (see the module docstring)."""
    module = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return 0
    if is_hf_conv1d(module):
        return 0
    return 1


def nm_masks(
    scores: Mapping[str, Tensor], n: int, m: int, input_dims: Mapping[str, int]
) -> tuple[dict[str, Tensor], list[str]]:
    """Keep the `n` best-scored of every `m` consecutive weights along each weight's input dimension.

    Args:
        scores: `{name: score}`, one per weight, higher = more important.
        n: weights kept in each group.
        m: the group size.
        input_dims: `{name: dimension}`
            ([`input_dimension`][lightning_prospr.semi_structured.input_dimension]).

    Returns:
        The keep-masks, and the names left dense because their input dimension is not a multiple
        of `m`. Ties keep the earlier position.

    Example:
        >>> import torch
        >>> masks, dense = nm_masks({"w": torch.tensor([[4.0, 1, 3, 2, 0, 0, 5, 6]])}, 2, 4, {"w": 1})
        >>> masks["w"].int().tolist(), dense
        ([[1, 0, 1, 0, 0, 0, 1, 1]], [])
    """
    masks: dict[str, Tensor] = {}
    dense: list[str] = []
    for name, score in scores.items():
        dim = input_dims[name]
        if score.dim() < 2 or score.shape[dim] % m:
            masks[name] = torch.ones_like(score, dtype=torch.bool)
            dense.append(name)
            continue
        moved = score.detach().movedim(dim, -1)  # (..., in): groups of m consecutive inputs
        groups = moved.reshape(-1, m)
        # stable descending order: among equal scores the earlier position is kept
        order = torch.sort(groups.float(), dim=1, descending=True, stable=True).indices
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(1, order[:, :n], True)
        masks[name] = keep.reshape(moved.shape).movedim(-1, dim).contiguous()
    return masks, dense


def to_semi_structured(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Replace the weights of trained, 2:4-masked `nn.Linear` layers by semi-structured sparse ones.

    Uses `torch.sparse.to_sparse_semi_structured`: the model then runs `F.linear` on NVIDIA's sparse
    tensor cores, for inference (the sparse weights are not trained further). Bake the masks in first
    (`make_permanent`, or `ProsprPruningCallback(make_permanent=True)`).

    Args:
        model: the network, on a CUDA device of compute capability 8.0 or later, in float16 or
            bfloat16.
        names: the Linear weights to convert; by default every Linear weight whose zeros follow
            the 2:4 pattern.

    Returns:
        The converted weight names.

    Raises:
        ValueError: before any change, on CPU, on an older GPU, for a dtype the kernels lack, for
            a named weight that is not a 2:4-pruned Linear weight, or when nothing qualifies.
    """
    linears = {
        f"{p}.weight" if p else "weight": mod for p, mod in model.named_modules() if type(mod) is nn.Linear
    }
    chosen = names if names is not None else [n for n, mod in linears.items() if _is_2_4(mod.weight)]
    for name in chosen:
        if name not in linears:
            raise ValueError(
                f"`{name}` is not the weight of an nn.Linear: only Linear layers can be converted."
            )
        weight = linears[name].weight
        if prune.is_pruned(linears[name]):
            raise ValueError(
                f"`{name}` still carries torch.nn.utils.prune masks: bake them in first with make_permanent."
            )
        _check_device(name, weight)
        if not _is_2_4(weight):
            raise ValueError(
                f"`{name}` does not keep at most 2 of every 4 consecutive inputs: prune it with "
                "pattern='2:4'."
            )
    if not chosen:
        raise ValueError("no nn.Linear weight follows the 2:4 pattern: prune with pattern='2:4' first.")
    from torch.sparse import to_sparse_semi_structured

    for name in chosen:
        layer = linears[name]
        layer.weight = nn.Parameter(to_sparse_semi_structured(layer.weight.detach()), requires_grad=False)
    return list(chosen)


def _is_2_4(weight: Tensor) -> bool:
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.detach().reshape(-1, 4) != 0).sum(dim=1) <= 2).all())


def _check_device(name: str, weight: Tensor) -> None:
    if weight.device.type != "cuda":
        raise ValueError(
            f"`{name}` is on {weight.device.type}: semi-structured sparse kernels run on NVIDIA GPUs "
            "(compute capability 8.0 or later) only; move the model to CUDA, or keep the masked dense "
            "weights on CPU."
        )
    major, minor = torch.cuda.get_device_capability(weight.device)
    if major < 8:
        raise ValueError(
            f"`{name}` is on a GPU of compute capability {major}.{minor}: semi-structured sparse "
            "kernels need 8.0 or later (Ampere, Hopper, ...)."
        )
    if weight.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"`{name}` is {weight.dtype}: the 2:4 kernels take float16 or bfloat16 weights: "
            "call model.half() or model.bfloat16() first."
        )
