"""The reference architectures: shapes, sizes, and that ProsPr scoring runs on each."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from shared import ce_loss as _cross_entropy
from torch import nn

from lightning_prospr import default_parameter_names, prospr_scores
from lightning_prospr.models import (
    VGG16BN,
    LeNet5,
    LeNet300100,
    OptionAShortcut,
    ResNet20,
    TinyTransformerEncoder,
)


def _images(n: int, channels: int, size: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, channels, size, size), torch.randint(0, classes, (n,))


def _tokens(n: int, length: int, vocab: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, vocab, (n, length)), torch.randint(0, classes, (n,))


# name -> (constructor, batch factory, number of classes)
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], Any], int]] = {
    "lenet300100": (LeNet300100, lambda: _images(4, 1, 28, 10), 10),
    "lenet5": (LeNet5, lambda: _images(4, 1, 28, 10), 10),
    "resnet20": (ResNet20, lambda: _images(4, 3, 32, 10), 10),
    "vgg16bn": (VGG16BN, lambda: _images(2, 3, 32, 10), 10),
    "transformer": (
        lambda: TinyTransformerEncoder(vocab_size=50, d_model=32, nhead=4, num_layers=2, max_len=16),
        lambda: _tokens(4, 12, 50, 2),
        2,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_output_shape(name: str) -> None:
    torch.manual_seed(0)
    make, batch, classes = CASES[name]
    x, _ = batch()
    out = make()(x)
    assert out.shape == (x.shape[0], classes)
    assert torch.isfinite(out).all()


def test_num_classes_and_channels_are_honoured() -> None:
    torch.manual_seed(0)
    assert LeNet300100(in_features=64, num_classes=7)(torch.randn(3, 64)).shape == (3, 7)
    assert LeNet5(in_channels=3, num_classes=5)(torch.randn(2, 3, 28, 28)).shape == (2, 5)
    assert ResNet20(num_classes=100)(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert VGG16BN(num_classes=100)(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert TinyTransformerEncoder(vocab_size=20, d_model=16, nhead=2, num_classes=3, max_len=8)(
        torch.randint(0, 20, (2, 8))
    ).shape == (2, 3)


def test_resnet20_has_0_27m_parameters_and_20_weighted_layers() -> None:
    model = ResNet20()
    count = sum(p.numel() for p in model.parameters())
    assert 265_000 <= count <= 275_000
    weighted = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weighted) == 20
    assert len(default_parameter_names(model)) == 20


def test_option_a_shortcut_is_parameter_free() -> None:
    model = ResNet20()
    shortcuts = [m for m in model.modules() if isinstance(m, OptionAShortcut)]
    assert len(shortcuts) == 2  # entering stages 2 and 3
    for shortcut in shortcuts:
        assert list(shortcut.parameters()) == []
        assert list(shortcut.buffers()) == []
    x = torch.randn(2, 16, 32, 32)
    y = OptionAShortcut(8)(x)
    assert y.shape == (2, 32, 16, 16)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert not y[:, :8].any() and not y[:, 24:].any()


def test_vgg16bn_layout() -> None:
    model = VGG16BN()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) == 13
    assert [lin.in_features for lin in linears] == [512]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 13


def test_transformer_padding_mask_ignores_padded_positions() -> None:
    torch.manual_seed(0)
    model = TinyTransformerEncoder(vocab_size=20, d_model=16, nhead=2, num_layers=1, max_len=8).eval()
    tokens = torch.randint(0, 20, (1, 8))
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[:, 5:] = True
    other = tokens.clone()
    other[:, 5:] = (other[:, 5:] + 1) % 20
    with torch.no_grad():
        assert torch.allclose(model(tokens, mask), model(other, mask), atol=1e-5)
        assert torch.allclose(model(tokens, mask), model(tokens[:, :5]), atol=1e-5)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


# Full mode on VGG-16-BN (14.7M weights, double backward through 13 convs) costs ~10 s on a 2-core
# CPU, so by default it is scored first-order; the full-mode run is marked slow.
SCORING = [
    *(pytest.param(name, False, id=f"{name}-full") for name in CASES if name != "vgg16bn"),
    pytest.param("vgg16bn", True, id="vgg16bn-first_order"),
    pytest.param("vgg16bn", False, id="vgg16bn-full", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("name", "first_order"), SCORING)
def test_prospr_scores_run_on_each_model(name: str, first_order: bool) -> None:
    torch.manual_seed(0)
    make, batch, _ = CASES[name]
    model = make()
    mode = "first_order" if first_order else "full"
    scores = prospr_scores(model, _cross_entropy, [batch()], steps=1, lr=0.01, mode=mode)
    expected = {
        f"{m_name}.{attr}"
        for m_name, m in model.named_modules()
        for attr in (
            ["weight"]
            if isinstance(m, (nn.Linear, nn.Conv2d))
            else ["in_proj_weight"]
            if isinstance(m, nn.MultiheadAttention)
            else []
        )
    }
    assert set(scores) == expected
    named = dict(model.named_parameters())
    for n, s in scores.items():
        assert s.shape == named[n].shape
        assert torch.isfinite(s).all(), n
        assert (s >= 0).all()
    assert any(bool(s.any()) for s in scores.values())
