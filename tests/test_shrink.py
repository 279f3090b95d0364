"""Shrink (shrink.py, channels.py, structured.py): the masked network and the physically smaller one
compute the same outputs, in eval and train mode and after a training step, on our models and on
third-party ones (torchvision, timm), with coupled channels kept together."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from shared import ce_loss
from torch import nn

from lightning_prospr import PruningSettings, compute_masks
from lightning_prospr.masking import apply_masks
from lightning_prospr.models import VGG16BN, ResNet20
from lightning_prospr.shrinking import ShrinkError, shrink

F = nn.functional


class Block(nn.Module):
    """A pre-norm Transformer block with an MLP of width `hidden` (its hidden units are the groups)."""

    def __init__(self, d: int = 16, heads: int = 4, hidden: int = 64, classes: int = 3) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(x.mean(dim=1))


def images(size: int, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, size, size, generator=gen), torch.randint(0, 10, (n,), generator=gen)


CASES = {
    "resnet20": (lambda: ResNet20(), lambda: images(32)),
    "vgg16bn": (lambda: VGG16BN(), lambda: images(32)),
    "torchvision-resnet18": (lambda: torchvision.models.resnet18(num_classes=10), lambda: images(64)),
    "torchvision-mobilenet_v2": (  # no dropout: a smaller layer before it would draw other masks
        lambda: torchvision.models.mobilenet_v2(num_classes=10, dropout=0.0),
        lambda: images(64),
    ),
    "timm-resnet10t": (lambda: timm.create_model("resnet10t", num_classes=10), lambda: images(64)),
    "transformer-block": (
        lambda: Block(),
        lambda: (
            torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(1)),
            torch.tensor([0, 1, 2, 0]),
        ),
    ),
}


def output(model: nn.Module, x: torch.Tensor, train: bool) -> torch.Tensor:
    model.train(train)
    torch.manual_seed(0)  # the same dropout draws in train mode
    with torch.no_grad():
        return model(x)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("case", list(CASES))
def test_masked_and_shrunk_networks_compute_the_same(case):
    build, data = CASES[case]
    torch.manual_seed(0)
    model = build()
    batch = data()
    with pytest.warns(UserWarning) if case in ("resnet20", "transformer-block") else _no_warning():
        result = compute_masks(model, ce_loss, [batch], PruningSettings(0.5, method="snip", structured=True))
    assert result.groups is not None and result.channel_masks
    masked, small = copy.deepcopy(model), copy.deepcopy(model)
    apply_masks(masked, {**result.masks, **result.coupled})
    shrink(small, result.channel_masks, loss_fn=ce_loss, example_input=batch)
    assert params(small) < params(model)
    for train in (False, True):
        a, b = output(masked, batch[0], train), output(small, batch[0], train)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max())), (case, train)
    # one SGD step on each: still the same network
    for net in (masked, small):
        net.train()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
        torch.manual_seed(0)
        ce_loss(net, batch).backward()
        optimizer.step()
    a, b = output(masked, batch[0], False), output(small, batch[0], False)
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-4 * float(a.abs().max())), case


class _no_warning:
    def __enter__(self) -> None:
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error", UserWarning)

    def __exit__(self, *exc: object) -> None:
        self._catch.__exit__(*exc)


def test_coupled_convolutions_share_their_channels():
    """torchvision's ResNet-18: the stem and every conv2 of layer1 write one residual stream, so they
    are one group, scored together and kept or removed together."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    batch = images(64)
    result = compute_masks(model, ce_loss, [batch], PruningSettings(0.5, method="magnitude", structured=True))
    assert result.groups is not None
    stem = result.groups.group_of("conv1.weight")
    assert stem is not None
    assert {p.name for p in stem.producers} == {
        "conv1.weight",
        "layer1.0.conv2.weight",
        "layer1.1.conv2.weight",
    }
    kept = result.channel_masks
    assert torch.equal(kept["conv1.weight"], kept["layer1.0.conv2.weight"])
    assert torch.equal(kept["conv1.weight"], kept["layer1.1.conv2.weight"])
    # the removed channels' BatchNorm scales and shifts are masked too
    assert torch.equal(result.coupled["bn1.weight"], kept["conv1.weight"])
    assert torch.equal(result.coupled["layer1.0.bn2.bias"], kept["conv1.weight"])


def test_resnet20_keeps_its_residual_stream_and_says_why():
    torch.manual_seed(0)
    model = ResNet20()
    with pytest.warns(
        UserWarning, match=r"keeps 10 weight\(s\) whole: conv1.weight, .*channel-dimension pad"
    ):
        result = compute_masks(
            model, ce_loss, [images(32)], PruningSettings(0.5, method="snip", structured=True)
        )
    assert all(n.endswith(".conv1.weight") for n in result.masks) and len(result.masks) == 9
    total = sum(m.numel() for m in result.channel_masks.values())
    assert sum(int((~m).sum()) for m in result.channel_masks.values()) == total // 2


def test_shrink_refuses_before_changing_anything():
    torch.manual_seed(0)
    model = ResNet20()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    keep = torch.ones(16, dtype=torch.bool)
    keep[:4] = False
    with pytest.raises(ShrinkError, match=r"cannot shrink `conv1.weight`: .*channel-dimension pad"):
        shrink(model, {"conv1.weight": keep}, torch.randn(2, 3, 32, 32))
    assert {n: p.shape for n, p in model.state_dict().items()} == {n: p.shape for n, p in before.items()}
    assert all(torch.equal(model.state_dict()[n], p) for n, p in before.items())
    with pytest.raises(ShrinkError, match="needs an example input"):
        shrink(model, {"layer1.0.conv1.weight": keep})
    with pytest.raises(ShrinkError, match="remove every channel"):
        shrink(model, {"layer1.0.conv1.weight": torch.zeros(16, dtype=torch.bool)}, torch.randn(2, 3, 32, 32))
    apply_masks(model, {"layer1.0.conv1.weight": torch.ones(16, 16, 3, 3, dtype=torch.bool)})
    with pytest.raises(ShrinkError, match=r"carries torch\.nn\.utils\.prune masks"):
        shrink(model, {"layer1.0.conv1.weight": keep}, torch.randn(2, 3, 32, 32))


def test_coupled_masks_must_agree():
    model = torchvision.models.resnet18(num_classes=10)
    a = torch.ones(64, dtype=torch.bool)
    b = a.clone()
    a[0], b[1] = False, False
    with pytest.raises(ShrinkError, match="coupled weights disagree"):
        shrink(model, {"conv1.weight": a, "layer1.0.conv2.weight": b}, torch.randn(1, 3, 64, 64))


class BertClassifier(nn.Module):
    """Hugging Face's BERT (random init from a config, no dropout) with a linear head on token 0."""

    def __init__(self, heads: int = 4, hidden: int = 32) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(
            vocab_size=50, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
            intermediate_size=2 * hidden, max_position_embeddings=16, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )  # fmt: skip
        self.bert = BertModel(config)
        self.head = nn.Linear(hidden, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.bert(input_ids=ids).last_hidden_state[:, 0])


def bert_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return torch.randint(0, 50, (6, 10), generator=gen), torch.randint(0, 3, (6,), generator=gen)


def test_attention_heads_are_scored_kept_and_removed_whole():
    """BERT's query, key and value projections: each head's rows are one channel of one group, the
    masks keep or remove whole heads in all three, and the shrunk network has fewer heads and
    computes what the masked one computes (eval, train, and after an SGD step)."""
    torch.manual_seed(0)
    model, batch = BertClassifier(), bert_batch()
    settings = PruningSettings(0.5, method="snip", structured=True, allocation="uniform")
    with pytest.warns(UserWarning, match="keeps 5 weight"):  # the residual stream stays whole
        result = compute_masks(model, ce_loss, [batch], settings)
    assert result.groups is not None
    prefix = "bert.encoder.layer.0.attention"
    group = result.groups.group_of(f"{prefix}.self.query.weight")
    assert group is not None and (group.size, group.rows, group.attention) == (4, 8, f"{prefix}.self")
    assert {p.name for p in group.producers} == {
        f"{prefix}.self.{w}.weight" for w in ("query", "key", "value")
    }
    keep = result.channel_masks[f"{prefix}.self.query.weight"].reshape(4, 8)
    assert bool((keep == keep[:, :1]).all()) and int(keep[:, 0].sum()) == 2  # whole heads, 2 of 4
    for w in ("key", "value"):
        assert torch.equal(result.channel_masks[f"{prefix}.self.{w}.weight"], keep.reshape(-1))
        assert torch.equal(result.coupled[f"{prefix}.self.{w}.bias"], keep.reshape(-1))
    masked, small = copy.deepcopy(model), copy.deepcopy(model)
    apply_masks(masked, {**result.masks, **result.coupled})
    shrink(small, result.channel_masks, loss_fn=ce_loss, example_input=batch)
    attention = small.bert.encoder.layer[0].attention
    assert (attention.self.num_attention_heads, attention.self.all_head_size) == (2, 16)
    assert attention.self.query.weight.shape == (16, 32) and attention.output.dense.weight.shape == (32, 16)
    for train in (False, True):
        a, b = output(masked, batch[0], train), output(small, batch[0], train)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max())), train
    for net in (masked, small):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
        ce_loss(net.train(), batch).backward()
        optimizer.step()
    a, b = output(masked, batch[0], False), output(small, batch[0], False)
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-4 * float(a.abs().max()))


def test_a_mask_that_splits_a_head_is_refused():
    model = BertClassifier()
    keep = torch.ones(32, dtype=torch.bool)
    keep[3] = False  # one row of head 0
    name = "bert.encoder.layer.0.attention.self"
    masks = {f"{name}.{w}.weight": keep for w in ("query", "key", "value")}
    shapes = {n: p.shape for n, p in model.state_dict().items()}
    with pytest.raises(ShrinkError, match=rf"splits an attention head of `{name}`: .* 8 rows together"):
        shrink(model, masks, loss_fn=ce_loss, example_input=bert_batch())
    assert {n: p.shape for n, p in model.state_dict().items()} == shapes


def test_packed_qkv_heads_of_a_timm_vit_are_removed_whole():
    """timm's ViT packs query, key and value in one `qkv` Linear (all query rows, then key, then
    value): a head is its rows in all three blocks, and the shrunk ViT computes what the masked one
    computes."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8, depth=2)
    batch = images(32)
    batch = (batch[0], batch[1] % 3)
    settings = PruningSettings(0.5, method="snip", structured=True, allocation="uniform")
    with pytest.warns(UserWarning, match="bare nn.Parameter"):  # the residual stream stays whole
        result = compute_masks(model, ce_loss, [batch], settings)
    assert result.groups is not None
    group = result.groups.group_of("blocks.0.attn.qkv.weight")
    assert group is not None and (group.size, group.rows, group.attention) == (3, 192, "blocks.0.attn")
    keep = result.channel_masks["blocks.0.attn.qkv.weight"].reshape(3, 3, 64)  # (q/k/v, head, row)
    assert bool((keep == keep[:1, :, :1]).all())  # one decision per head, the same in q, k and v
    heads = int(keep[0, :, 0].sum())
    assert 1 <= heads < 3
    masked, small = copy.deepcopy(model), copy.deepcopy(model)
    apply_masks(masked, {**result.masks, **result.coupled})
    shrink(small, result.channel_masks, loss_fn=ce_loss, example_input=batch)
    attention = small.blocks[0].attn
    assert (attention.num_heads, attention.attn_dim) == (heads, 64 * heads)
    assert attention.qkv.weight.shape == (3 * 64 * heads, 192) and attention.proj.weight.shape == (
        192,
        64 * heads,
    )
    for train in (False, True):
        a, b = output(masked, batch[0], train), output(small, batch[0], train)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max())), train
