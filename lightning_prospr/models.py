"""Reference architectures of the ProsPr experiments, in plain PyTorch.

These are the networks that pruning-at-initialization papers (SNIP, GraSP, SynFlow, ProsPr) report
on, written as ordinary `torch.nn.Module` classes with no dependency beyond `torch`, so that
tests, benchmarks and examples can use the same shapes as the paper:

- `LeNet300100`: `(N, 784)` or `(N, 1, 28, 28)` inputs, 266,610 parameters;
- `LeNet5`: `(N, 1, 28, 28)`, 61,706 parameters;
- `ResNet20`: `(N, 3, 32, 32)`, 269,722 parameters (the paper's "0.27M");
- `VGG16BN`: `(N, 3, 32, 32)`, 14,724,042 parameters;
- `TinyTransformerEncoder`: `(N, L)` token ids, 532,994 parameters with the defaults.

(counts for 10 classes, 2 for the Transformer).
[`prospr_scores`][lightning_prospr.scores.prospr_scores] scores the weight matrices (Linear and Conv
weights, attention projections) by default; biases, BatchNorm and LayerNorm parameters and
embeddings are updated in the inner loop but not pruned.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_prospr.execution import twice_differentiable_attention

__all__ = [
    "VGG16BN",
    "VGG16_CFG",
    "LeNet5",
    "LeNet300100",
    "OptionAShortcut",
    "ResNet20",
    "TinyTransformerEncoder",
]


def _kaiming_init(module: nn.Module) -> None:
    """He-normal (fan-in, ReLU gain) weights and zero biases for every Linear and Conv2d."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class LeNet300100(nn.Module):
    """The LeNet-300-100 multilayer perceptron (LeCun et al., 1998): `in_features`-300-100-classes.

    Images are flattened, so MNIST batches of shape `(N, 1, 28, 28)` work as they are.

    Args:
        in_features: size of the flattened input (784 for MNIST).
        num_classes: number of output logits.
    """

    def __init__(self, in_features: int = 784, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """The classic LeNet-5: conv 6 and conv 16 (5x5 kernels, ReLU, 2x2 max pooling), then 120-84-classes.

    The first convolution uses `padding=2`, so a 28x28 MNIST image becomes the 32x32 input of the
    original design and the feature map before the classifier is 16x5x5.

    Args:
        in_channels: input channels (1 for MNIST).
        num_classes: number of output logits.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class OptionAShortcut(nn.Module):
    """The parameter-free "option A" shortcut of the CIFAR ResNets (He et al., 2016, section 4.2).

    Subsamples the input with stride 2 and pads the new channels with zeros, equally on both
    sides: `(N, C, H, W) -> (N, C + 2 * pad, ceil(H / 2), ceil(W / 2))`.

    Args:
        pad: number of zero channels added on each side (`out_channels - in_channels` must be
            `2 * pad`).
    """

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class _BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus the identity, or an option-A shortcut when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            if stride != 2 or planes - in_planes != planes // 2:
                raise ValueError("option-A shortcuts halve the resolution and double the channels")
            self.shortcut = OptionAShortcut(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 for CIFAR (He et al., 2016, section 4.2): 0.27M parameters.

    A 3x3 conv with 16 channels, then three stages of three basic blocks with 16, 32 and 64
    channels (stride 2 at the start of the second and third), global average pooling and one Linear
    layer: 1 + 3 * 3 * 2 + 1 = 20 weighted layers. Every convolution is followed by BatchNorm and
    has no bias. Shortcuts that change the shape use option A (stride-2 subsampling and zero
    channel padding, `OptionAShortcut`), so they have no parameters and nothing to prune.
    Conv and Linear weights use He-normal initialization.

    Args:
        num_classes: number of output logits.
        in_channels: input channels (3 for CIFAR).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, stride=1)
        self.layer2 = self._stage(16, 32, stride=2)
        self.layer3 = self._stage(32, 64, stride=2)
        self.linear = nn.Linear(64, num_classes)
        _kaiming_init(self)

    @staticmethod
    def _stage(in_planes: int, planes: int, stride: int, blocks: int = 3) -> nn.Sequential:
        layers = [_BasicBlock(in_planes, planes, stride)]
        layers += [_BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


#: VGG-16 feature configuration: output channels of each 3x3 conv, `"M"` for 2x2 max pooling.
VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


class VGG16BN(nn.Module):
    """VGG-16 with BatchNorm for 32x32 inputs, as used in the pruning-at-initialization literature.

    Thirteen 3x3 conv (no bias) - BatchNorm - ReLU layers in the `VGG16_CFG` layout, five 2x2
    max pools (32x32 -> 1x1), global average pooling and a **single** `Linear(512, num_classes)`
    classifier. The single-Linear head follows the CIFAR VGGs of SNIP/GraSP/SynFlow and the ProsPr
    code (which replaces torchvision's three-layer 4096-wide ImageNet head by one Linear for small
    inputs); it keeps the network at 14.7M parameters, nearly all in the convolutions, which is the
    regime where pruning at initialization is usually compared. The average pooling is a no-op at
    32x32 and makes larger inputs work too. (The ProsPr code omits the fifth max pool and averages
    the 2x2 map instead; the parameters are the same.) Conv and Linear weights use He-normal
    initialization.

    Args:
        num_classes: number of output logits.
        in_channels: input channels (3 for CIFAR).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG16_CFG:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                assert isinstance(item, int)
                layers += [
                    nn.Conv2d(channels, item, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(item),
                    nn.ReLU(inplace=True),
                ]
                channels = item
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)
        _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:
        out = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(out)


class TinyTransformerEncoder(nn.Module):
    """A small Transformer encoder for sequence classification.

    Token embedding plus a learned position embedding, `num_layers` post-norm
    `torch.nn.TransformerEncoderLayer` blocks (`batch_first=True`, feed-forward width
    `4 * d_model`, dropout 0), mean pooling over the non-padded positions, and a Linear classifier.
    The weights scored by default are those of Linear modules: the attention output projection,
    the two feed-forward layers and the classifier. The attention input projection is a bare
    parameter of `torch.nn.MultiheadAttention` (`...self_attn.in_proj_weight`); pass it in
    `parameters` to score it too.

    Args:
        vocab_size: number of token ids.
        d_model: embedding width.
        nhead: attention heads (must divide `d_model`).
        num_layers: encoder layers.
        num_classes: number of output logits.
        max_len: longest sequence accepted.
        math_attention: always compute attention with PyTorch's reference ("math") implementation
            of `torch.nn.functional.scaled_dot_product_attention()`. Not needed for ProsPr: the
            scoring engine switches to it by itself while it differentiates twice.

    `forward(tokens, padding_mask=None)` takes `tokens` of shape `(N, L)` with `L <= max_len`
    and an optional boolean `padding_mask` of the same shape, `True` at padded positions.
    """

    def __init__(
        self,
        vocab_size: int = 1000,
        d_model: int = 128,
        nhead: int = 4,
        num_layers: int = 2,
        num_classes: int = 2,
        max_len: int = 64,
        math_attention: bool = False,
    ) -> None:
        super().__init__()
        self.max_len = max_len
        self.math_attention = math_attention
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True
        )
        # enable_nested_tensor only speeds up padded inference and warns for some settings.
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.classifier = nn.Linear(d_model, num_classes)

    def forward(self, tokens: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len={self.max_len}")
        positions = torch.arange(length, device=tokens.device)
        x = self.embedding(tokens) + self.position(positions)
        with twice_differentiable_attention() if self.math_attention else contextlib.nullcontext():
            x = self.encoder(x, src_key_padding_mask=padding_mask)
        if padding_mask is None:
            pooled = x.mean(dim=1)
        else:
            keep = (~padding_mask).unsqueeze(-1).to(x.dtype)
            pooled = (x * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)
        return self.classifier(pooled)
