"""`head_sparsity` (settings.py, structured.py): each attention module keeps its best-scored heads,
the same count in every module, apart from the top-k that `sparsity` makes over the other channels;
checked against scores computed by hand from the weights, and through shrink."""

from __future__ import annotations

import copy

import pytest
import torch
from shared import ce_loss
from test_shrink import BertClassifier, bert_batch, output

from lightning_prospr import PruningSettings, compute_masks
from lightning_prospr.masking import apply_masks
from lightning_prospr.models import LeNet5
from lightning_prospr.shrinking import shrink

LAYER = "bert.encoder.layer.{}.attention.self"


def _heads_kept(channel_masks: dict[str, torch.Tensor], layer: int, heads: int) -> torch.Tensor:
    keep = channel_masks[f"{LAYER.format(layer)}.query.weight"].reshape(heads, -1)
    assert bool((keep == keep[:, :1]).all())  # whole heads
    return keep[:, 0]


def _magnitude_heads(model: BertClassifier, layer: int, heads: int) -> torch.Tensor:
    """Each head's summed |w| over its rows of the query, key and value weights, from the weights."""
    attention = model.bert.encoder.layer[layer].attention.self
    total = torch.zeros(heads, dtype=torch.float64)
    for linear in (attention.query, attention.key, attention.value):
        total += linear.weight.detach().double().abs().reshape(heads, -1).sum(dim=1)
    return total


@pytest.mark.parametrize(("head_sparsity", "kept"), [(0.5, 2), (0.75, 1), (0.99, 1), (0.0, 4)])
def test_each_module_keeps_its_best_heads_and_sparsity_counts_the_rest(head_sparsity, kept):
    torch.manual_seed(0)
    model = BertClassifier(heads=4)
    settings = PruningSettings(
        0.5, method="magnitude", structured=True, head_sparsity=head_sparsity, guard="off"
    )
    with pytest.warns(UserWarning, match="keeps 5 weight"):  # the residual stream stays whole
        result = compute_masks(model, ce_loss, [bert_batch()], settings)
    for layer in (0, 1):
        keep = _heads_kept(result.channel_masks, layer, 4)
        assert int(keep.sum()) == kept
        best = torch.topk(_magnitude_heads(model, layer, 4), kept).indices
        assert set(keep.nonzero().flatten().tolist()) == set(best.tolist())
    # The other channels: the two MLP widths (64 each), the global top-k removing exactly half.
    assert result.groups is not None
    others = [g for g in result.groups.groups if not g.attention]
    width = sum(g.size for g in others)
    removed = sum(int((~result.channel_masks[g.root]).sum()) for g in others)
    assert (width, removed) == (128, 64)


def test_heads_removed_by_head_sparsity_shrink_to_the_masked_network():
    torch.manual_seed(0)
    model, batch = BertClassifier(heads=4), bert_batch()
    settings = PruningSettings(0.5, method="snip", structured=True, head_sparsity=0.5)
    with pytest.warns(UserWarning, match="keeps 5 weight"):
        result = compute_masks(model, ce_loss, [batch], settings)
    masked, small = copy.deepcopy(model), copy.deepcopy(model)
    apply_masks(masked, {**result.masks, **result.coupled})
    shrink(small, result.channel_masks, loss_fn=ce_loss, example_input=batch)
    for layer in (0, 1):
        assert small.bert.encoder.layer[layer].attention.self.num_attention_heads == 2
    for train in (False, True):
        a, b = output(masked, batch[0], train), output(small, batch[0], train)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max())), train


def test_rounds_remove_heads_on_the_schedule_and_keep_removed_heads_removed():
    torch.manual_seed(0)
    model, batch = BertClassifier(heads=4), bert_batch()
    settings = PruningSettings(
        0.5, steps=1, structured=True, head_sparsity=0.75, rounds=3, allocation="uniform"
    )
    with pytest.warns(UserWarning, match="keeps 5 weight"):
        result = compute_masks(model, ce_loss, [batch] * 6, settings)
    for layer in (0, 1):
        assert int(_heads_kept(result.channel_masks, layer, 4).sum()) == 1
    assert result.groups is not None
    for group in (g for g in result.groups.groups if not g.attention):  # uniform: half of each MLP
        assert int(result.channel_masks[group.root].sum()) == group.size // 2


def test_head_sparsity_needs_structured_masks_and_a_fraction():
    with pytest.raises(ValueError, match="`head_sparsity` removes whole attention heads"):
        PruningSettings(0.5, head_sparsity=0.5)
    with pytest.raises(ValueError, match="`head_sparsity` is the fraction"):
        PruningSettings(0.5, structured=True, head_sparsity=1.0)
    with pytest.raises(TypeError, match="`head_sparsity` must be a float"):
        PruningSettings(0.5, structured=True, head_sparsity="half")  # type: ignore[arg-type]
    described = PruningSettings(0.5, structured=True, head_sparsity=0.25).describe()
    assert "head sparsity 0.25" in described


def test_head_sparsity_on_a_model_without_heads_is_refused_before_scoring():
    model = LeNet5()
    before = copy.deepcopy(model.state_dict())
    batch = (torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)))
    settings = PruningSettings(0.5, structured=True, head_sparsity=0.5)
    with pytest.raises(ValueError, match="`head_sparsity` applies to attention heads, and none"):
        compute_masks(model, ce_loss, [batch] * 4, settings)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_head_sparsity_with_only_heads_to_prune_is_refused():
    model = BertClassifier(heads=4)
    qkv = [f"{LAYER.format(0)}.{w}.weight" for w in ("query", "key", "value")]
    settings = PruningSettings(0.5, structured=True, parameters=qkv, head_sparsity=0.5)
    with pytest.raises(ValueError, match="every channel group of the pruned weights is an attention"):
        compute_masks(model, ce_loss, [bert_batch()] * 4, settings)


def test_nan_head_scores_are_refused():
    def poison(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: t * float("nan") if "query" in n else t for n, t in scores.items()}

    settings = PruningSettings(0.5, method="magnitude", structured=True, head_sparsity=0.5)
    with pytest.raises(ValueError, match="contain NaN"), pytest.warns(UserWarning, match="keeps 5"):
        compute_masks(BertClassifier(heads=4), ce_loss, [bert_batch()], settings, score_hook=poison)
