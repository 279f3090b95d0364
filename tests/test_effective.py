"""Effective sparsity (effective.py) on hand-built masks and against a brute-force graph search."""

from __future__ import annotations

import pytest
import torch
from shared import ce_loss
from torch import nn

from lightning_prospr import PruningSettings, compute_masks
from lightning_prospr.effective import effective_masks
from lightning_prospr.models import LeNet5, LeNet300100
from lightning_prospr.report import SparsityReport


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def test_a_unit_without_inputs_and_a_unit_without_outputs_are_dead():
    net = mlp()
    batch = (torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1]))
    w0 = torch.ones(4, 3, dtype=torch.bool)
    w0[2] = False  # unit 2 of layer 1 receives nothing: what reads it is dead
    w1 = torch.ones(4, 4, dtype=torch.bool)
    w2 = torch.ones(2, 4, dtype=torch.bool)
    w2[:, 1] = False  # unit 1 of layer 2 feeds nothing: what feeds it is dead
    masks = {"0.weight": w0, "2.weight": w1, "4.weight": w2}
    eff = effective_masks(net, masks, ce_loss, batch)
    expected1 = w1.clone()
    expected1[:, 2] = False  # reads the dead unit 2
    expected1[1, :] = False  # feeds the dead unit 1
    assert torch.equal(eff.masks["0.weight"], w0)
    assert torch.equal(eff.masks["2.weight"], expected1)
    assert torch.equal(eff.masks["4.weight"], w2)
    total = 12 + 16 + 8
    nominal = int(w0.sum() + w1.sum() + w2.sum())
    assert eff.sparsity == pytest.approx(1 - (nominal - 7) / total)  # 7 = 4 + 4 - 1 (counted twice)


def test_a_dead_channel_kills_what_reads_it():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)
    )
    batch = (torch.randn(2, 2, 8, 8), torch.tensor([0, 1]))
    c0 = torch.ones(3, 2, 3, 3, dtype=torch.bool)
    c0[1] = False  # channel 1 of the first conv is dead
    masks = {
        "0.weight": c0,
        "2.weight": torch.ones(4, 3, 3, 3, dtype=torch.bool),
        "5.weight": torch.ones(2, 64, dtype=torch.bool),
    }
    eff = effective_masks(net, masks, ce_loss, batch)
    expected = masks["2.weight"].clone()
    expected[:, 1] = False
    assert torch.equal(eff.masks["2.weight"], expected)
    assert torch.equal(eff.masks["5.weight"], masks["5.weight"])
    # a whole dead output channel of the second conv: the Linear weights reading its 16 features die
    masks["2.weight"][3] = False
    eff = effective_masks(net, masks, ce_loss, batch)
    dead = torch.zeros(2, 4, 16, dtype=torch.bool)
    dead[:, 3] = True
    assert torch.equal(eff.masks["5.weight"], ~dead.reshape(2, 64))


def _brute_force_mlp(masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Forward and backward reachability of the units through kept weights; a kept weight i -> j is
    effective when i is reached from the input and j reaches the output."""
    forward = [torch.ones(masks[0].shape[1], dtype=torch.bool)]
    for m in masks:
        forward.append((m & forward[-1][None, :]).any(dim=1))
    backward = [torch.ones(masks[-1].shape[0], dtype=torch.bool)]
    for m in reversed(masks):
        backward.insert(0, (m & backward[0][:, None]).any(dim=0))
    return [m & forward[i][None, :] & backward[i + 1][:, None] for i, m in enumerate(masks)]


@pytest.mark.parametrize("density", [0.005, 0.02, 0.1])
def test_lenet300100_random_masks_match_a_graph_search(density):
    model = LeNet300100()
    gen = torch.Generator().manual_seed(int(1000 * density))
    names = ["fc1.weight", "fc2.weight", "fc3.weight"]
    masks = {n: torch.rand(model.get_parameter(n).shape, generator=gen) < density for n in names}
    batch = (torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)))
    eff = effective_masks(model, masks, ce_loss, batch)
    expected = _brute_force_mlp([masks[n] for n in names])
    for n, e in zip(names, expected, strict=True):
        assert torch.equal(eff.masks[n], e), n
    assert any(int(eff.masks[n].sum()) < int(masks[n].sum()) for n in names)


def test_lenet5_with_max_pooling_matches_a_channel_graph_search():
    """Conv channels are units (every position of a live channel carries signal); max pooling keeps
    a live channel live; fc1 reads 25 positions of each of conv2's 16 channels."""
    torch.manual_seed(3)
    model = LeNet5()
    gen = torch.Generator().manual_seed(4)
    shapes = {
        n: model.get_parameter(n).shape
        for n in ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight", "fc3.weight"]
    }
    masks = {
        n: torch.rand(s, generator=gen) < (0.3 if n.startswith("conv") else 0.02) for n, s in shapes.items()
    }
    eff = effective_masks(model, masks, ce_loss, (torch.randn(2, 1, 28, 28), torch.tensor([1, 2])))
    # channel-level masks: conv weight (out, in, k, k) -> any kept tap; fc1 (120, 16*25) -> per channel
    c1 = masks["conv1.weight"].flatten(1).any(1, keepdim=True)  # (6, 1)
    c2 = masks["conv2.weight"].flatten(2).any(2)  # (16, 6)
    f1 = masks["fc1.weight"].reshape(120, 16, 25).any(2)  # (120, 16)
    alive = _brute_force_mlp([c1, c2, f1, masks["fc2.weight"], masks["fc3.weight"]])
    # a kept conv weight is effective iff its (out, in) channel pair is
    assert torch.equal(eff.masks["conv1.weight"], masks["conv1.weight"] & alive[0][:, :, None, None])
    assert torch.equal(eff.masks["conv2.weight"], masks["conv2.weight"] & alive[1][:, :, None, None])
    assert torch.equal(eff.masks["fc1.weight"], masks["fc1.weight"] & alive[2].repeat_interleave(25, dim=1))
    assert torch.equal(eff.masks["fc2.weight"], alive[3]) and torch.equal(eff.masks["fc3.weight"], alive[4])


def test_compute_masks_and_the_report_carry_effective_sparsity():
    torch.manual_seed(0)
    model = LeNet300100()
    batches = [(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))) for _ in range(4)]
    result = compute_masks(model, ce_loss, batches, PruningSettings(0.995, method="random", guard="off"))
    assert result.effective is not None and result.effective_skipped is None
    report = SparsityReport.from_masks(result.masks, effective=result.effective.masks)
    assert report.effective_sparsity == pytest.approx(result.effective.sparsity)
    assert report.effective_sparsity > report.sparsity + 0.001  # random masks at 99.5 %: many dead
    metrics = report.metrics()
    assert metrics["prospr/effective_sparsity"] == pytest.approx(report.effective_sparsity)
    assert set(metrics) >= {f"prospr/effective_sparsity/{n}" for n in result.masks}
    table = report.table()
    assert "Effective" in table and f"Effective: {100 * report.effective_sparsity:.2f} %" in table


def test_a_loss_the_linearized_pass_cannot_run_leaves_effective_unknown():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    def picky(m: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        if batch[0].dtype == torch.float64:
            raise RuntimeError("float32 only")
        return ce_loss(m, batch)

    batches = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
    with pytest.warns(UserWarning, match="could not check"):
        result = compute_masks(model, picky, batches, PruningSettings(0.5, method="snip"))
    assert result.effective is None and "RuntimeError: float32 only" in (result.effective_skipped or "")
    assert SparsityReport.from_masks(result.masks).effective_sparsity is None


@pytest.mark.parametrize("allocation", ["global", "erk"])
def test_replace_dead_weights_leaves_every_kept_weight_on_a_path(allocation):
    from lightning_prospr.allocation import layer_budgets
    from lightning_prospr.effective import replace_dead_weights
    from lightning_prospr.selection import select_masks

    model = LeNet300100()
    names = ["fc1.weight", "fc2.weight", "fc3.weight"]
    gen = torch.Generator().manual_seed(5)
    scores = {n: torch.rand(model.get_parameter(n).shape, generator=gen) for n in names}
    masks = select_masks(scores, 0.998, allocation=allocation)
    batch = (torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)))
    before = effective_masks(model, masks, ce_loss, batch)
    assert before.sparsity > 0.998 + 1e-4  # random scores: many kept weights are dead
    repaired, replaced = replace_dead_weights(
        model, ce_loss, batch, scores, masks, 0.998, allocation=allocation
    )
    expected_dead = sum(int((masks[n] & ~before.masks[n]).sum()) for n in names)
    assert replaced >= expected_dead > 0
    assert sum(int(m.sum()) for m in repaired.values()) == sum(int(m.sum()) for m in masks.values())
    for n in names:  # live weights stay
        assert not bool((before.masks[n] & ~repaired[n]).any())
    # every kept weight is on a path, checked by the graph search, not by the linearized pass
    alive = _brute_force_mlp([repaired[n] for n in names])
    assert all(torch.equal(a, repaired[n]) for a, n in zip(alive, names, strict=True))
    if allocation == "erk":
        shapes = {n: tuple(scores[n].shape) for n in names}
        total = sum(s.numel() for s in scores.values())
        kept = sum(int(m.sum()) for m in masks.values())
        assert {n: int(m.sum()) for n, m in repaired.items()} == layer_budgets(shapes, kept, "erk")
        assert kept == total - round(0.998 * total)


def test_guard_effective_through_compute_masks():
    torch.manual_seed(0)
    model = LeNet5()
    batches = [(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))) for _ in range(2)]
    connected = compute_masks(model, ce_loss, batches, PruningSettings(0.995, method="snip"))
    effective = compute_masks(
        model, ce_loss, batches, PruningSettings(0.995, method="snip", guard="effective")
    )
    assert connected.effective is not None and effective.effective is not None
    assert connected.effective.sparsity > 0.995 + 1e-4
    assert effective.effective.sparsity == pytest.approx(
        1 - sum(int(m.sum()) for m in effective.masks.values()) / 61_470
    )
    assert effective.guard.replaced > 0 and "dead weights replaced" in effective.guard.summary()
    assert sum(int(m.sum()) for m in effective.masks.values()) == sum(
        int(m.sum()) for m in connected.masks.values()
    )
    with pytest.raises(ValueError, match="guard='effective' replaces single dead weights"):
        PruningSettings(0.9, method="snip", structured=True, guard="effective")
