"""Scoring leaves the model exactly as it was, bit for bit."""

from __future__ import annotations

import pytest
import torch
from model_state import Net, assert_same, snapshot
from shared import ce_loss as loss_fn
from torch import nn

from lightning_prospr import prospr_scores
from lightning_prospr.errors import UnrollError

F = nn.functional


def prepared_model():
    torch.manual_seed(0)
    model = Net()
    model(torch.randn(2, 1, 6, 6)).sum().backward()  # some .grad fields set
    model.fc.eval()  # a mixed train/eval state
    return model


@pytest.mark.parametrize("mode", ["full", "first_order"])
def test_model_untouched_bit_for_bit(mode):
    model = prepared_model()
    batches = [(torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))) for _ in range(4)]
    before = snapshot(model)
    scores = prospr_scores(model, loss_fn, batches, steps=3, momentum=0.9, mode=mode)
    assert_same(before, snapshot(model))
    # Frozen weights are neither updated nor, by default, scored.
    assert set(scores) == {"conv.weight", "fc.weight"}  # the frozen Linear is left out


def test_model_untouched_when_the_loss_fails_part_way():
    model = prepared_model()
    batches = [(torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))) for _ in range(4)]
    calls = []

    def failing(m, batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return loss_fn(m, batch)

    before = snapshot(model)
    with pytest.raises(UnrollError, match=r"RuntimeError raised by the loss at inner step 1 of 3.*boom"):
        prospr_scores(model, failing, batches, steps=3)
    assert_same(before, snapshot(model))
