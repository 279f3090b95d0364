"""Shared by the "model untouched" tests: a model with every kind of state, and a bit-exact snapshot."""

from __future__ import annotations

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4 * 4 * 4, 3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        h = self.drop(torch.relu(self.bn(self.conv(x))))
        return self.frozen(self.fc(h.flatten(1)))


def snapshot(model):
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()},
        "rng": torch.get_rng_state(),
    }


def assert_same(before, after):
    for key in ("params", "buffers", "grads"):
        for name, value in before[key].items():
            other = after[key][name]
            if value is None:
                assert other is None, (key, name)
            else:
                assert torch.equal(value, other), (key, name)
    for key in ("requires_grad", "training", "hooks"):
        assert before[key] == after[key], key
    assert torch.equal(before["rng"], after["rng"])
