"""Models with activation checkpointing get the scores of the same model without it.

A checkpointed segment re-runs its forward pass during the backward pass. Without care that re-run
happens after ``functional_call`` has put the model's own parameters back, so the activations (and
the scores) are those of theta_0 instead of the unrolled w_t, silently; with ``use_reentrant=True``
the segment's parameters get no gradient. The reference is the identical network with the
checkpoint calls switched off, scored by the same engine: checkpointing changes memory, never values.
"""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint as checkpointing
from shared import ce_loss
from torch import nn

from lightning_prospr import prospr_scores
from lightning_prospr.baselines import grasp_scores, synflow_scores

F = nn.functional


class Net(nn.Module):
    """Linear-BN-Tanh, then a checkpointed Linear-BN-Tanh-Linear-Tanh segment, then a classifier.

    ``how`` picks the checkpointing: ``use_reentrant=True`` or ``False``, ``checkpoint_sequential``,
    torch.distributed's composable ``checkpoint(module)``, or none (``None``, the reference).
    """

    def __init__(self, how: str | None) -> None:
        super().__init__()
        self.how = how
        self.stem = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh())
        self.body = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)
        self.body_calls = 0
        self.body.register_forward_pre_hook(self._count)
        if how == "composable":  # torch.distributed's per-module checkpoint (hooks, as used with FSDP2)
            from torch.distributed._composable import checkpoint

            checkpoint(self.body)

    def _count(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.body_calls += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        if self.how == "reentrant":
            h = checkpointing.checkpoint(self.body, h, use_reentrant=True)
        elif self.how == "non-reentrant":
            h = checkpointing.checkpoint(self.body, h, use_reentrant=False)
        elif self.how == "sequential":
            h = checkpointing.checkpoint_sequential(self.body, 2, h, use_reentrant=False)
        else:
            h = self.body(h)
        return self.head(h)


def net(how: str | None) -> Net:
    torch.manual_seed(0)
    return Net(how).train()


BATCH = (torch.randn(16, 6, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 3)
HOW = ["reentrant", "non-reentrant", "sequential", "composable"]


def assert_same(scores: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert scores.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(scores[name], expected[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize(
    "options", [{}, {"mode": "recompute"}, {"mode": "first_order"}], ids=["full", "recompute", "first-order"]
)
def test_prospr_scores_ignore_activation_checkpointing(how: str, options: dict[str, bool]) -> None:
    expected = prospr_scores(net(None), ce_loss, [BATCH], steps=2, **options)
    model = net(how)
    assert_same(prospr_scores(model, ce_loss, [BATCH], steps=2, **options), expected)
    assert all(p.grad is None for p in model.parameters())  # reentrant backward would write .grad


@pytest.mark.parametrize("how", HOW)
def test_baselines_ignore_activation_checkpointing(how: str) -> None:
    assert_same(
        grasp_scores(net(how), ce_loss, [BATCH], temperature=1.0),
        grasp_scores(net(None), ce_loss, [BATCH], temperature=1.0),
    )
    assert_same(
        synflow_scores(net(how), example_input=BATCH[0]), synflow_scores(net(None), example_input=BATCH[0])
    )


def test_training_checkpoints_again_after_scoring() -> None:
    reentrant_function = checkpointing.CheckpointFunction
    model = net("non-reentrant")
    prospr_scores(model, ce_loss, [BATCH], steps=2)
    assert checkpointing.CheckpointFunction is reentrant_function

    model.body_calls = 0
    ce_loss(model, BATCH).backward()
    assert model.body_calls == 2  # the forward pass, and its re-run in the backward pass
