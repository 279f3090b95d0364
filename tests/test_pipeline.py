"""compute_masks: structured ProsPr, iterative rounds, score averaging, every method, the callback's
methods and guard warning."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from shared import ce_loss as ce
from shared import quiet_trainer
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

from lightning_prospr import ProsprPruningCallback, PruningSettings, SparsityReport, prospr_scores
from lightning_prospr.pipeline import compute_masks, density_schedule
from lightning_prospr.selection import global_masks, pruned_count

F = nn.functional


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, 5),
    ).double()


def batches(count: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(8, 1, 6, 6, generator=gen, dtype=torch.float64),
            torch.randint(0, 5, (8,), generator=gen),
        )
        for _ in range(count)
    ]


def loss_after_steps(model, scale, data, steps, lr):
    """L_M with one output channel of one weight scaled (torch.optim.SGD on a deep copy)."""
    net = copy.deepcopy(model).train()
    ((name, (index, factor)),) = scale.items()
    with torch.no_grad():
        net.get_parameter(name)[index].mul_(factor)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for t in range(steps):
        opt.zero_grad()
        ce(net, data[t]).backward()
        opt.step()
    with torch.no_grad():
        return ce(net, data[steps]).item()


def test_structured_scores_match_finite_differences_of_channel_scales():
    model, data = convnet(), batches(4)
    channel = prospr_scores(model, ce, data, structured=True)
    assert channel["0.weight"].shape == (6, 1, 1, 1) and channel["6.weight"].shape == (5, 1)
    h = 1e-6
    for name, index in (("0.weight", 2), ("3.weight", 5), ("6.weight", 1)):
        plus = loss_after_steps(model, {name: (index, 1 + h)}, data, steps=3, lr=0.1)
        minus = loss_after_steps(model, {name: (index, 1 - h)}, data, steps=3, lr=0.1)
        fd = abs(plus - minus) / (2 * h)
        assert channel[name].reshape(-1)[index].item() == pytest.approx(fd, rel=1e-5)


def test_structured_first_order_is_the_channel_sum_of_the_closed_form():
    model, data = convnet(), batches(4)
    net = copy.deepcopy(model).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for t in range(3):
        opt.zero_grad()
        ce(net, data[t]).backward()
        opt.step()
    opt.zero_grad()
    ce(net, data[3]).backward()
    channel = prospr_scores(model, ce, data, structured=True, mode="first_order")
    for name in ("0.weight", "3.weight"):
        product = model.get_parameter(name).detach() * net.get_parameter(name).grad
        expected = product.reshape(product.shape[0], -1).sum(1).abs()
        assert torch.allclose(channel[name].reshape(-1), expected, rtol=1e-10)


def test_structured_masks_remove_whole_channels_and_spare_the_classifier():
    model, data = convnet(), batches(4)
    result = compute_masks(model, ce, data, PruningSettings(0.5, structured=True, guard="floor"))
    assert set(result.masks) == {"0.weight", "3.weight"}  # the classifier is excluded by default
    total = 6 + 8
    assert sum(int((~m).sum()) for m in result.channel_masks.values()) == pruned_count(0.5, total)
    for name, mask in result.masks.items():
        per_channel = mask.reshape(mask.shape[0], -1)
        assert bool((per_channel.all(1) | ~per_channel.any(1)).all())  # each channel all-or-nothing
        assert torch.equal(per_channel[:, 0], result.channel_masks[name])
    # MACs per sample, by hand: conv 1->6 3x3 on 6x6 gives 6x4x4 outputs of fan-in 9; conv 6->8 3x3
    # on 4x4 gives 8x2x2 outputs of fan-in 54.
    assert result.macs == {"0.weight": 6 * 4 * 4 * 9, "3.weight": 8 * 2 * 2 * 54}
    report = SparsityReport.from_masks(result.masks, 0.0, "s", result.channel_masks, result.macs)
    kept = {n: int(m.sum()) for n, m in result.channel_masks.items()}
    rebuild = report.dense_rebuild()
    assert rebuild["macs"] == 864 + 1728
    assert rebuild["macs_kept"] == pytest.approx(864 * kept["0.weight"] / 6 + 1728 * kept["3.weight"] / 8)
    table = report.table()
    assert f"{kept['0.weight']}/6" in table and "Dense re-build: weights 486 -> " in table


def test_fixed_masks_equal_a_model_pruned_beforehand():
    model, data = convnet(), batches(4)
    keep = global_masks(prospr_scores(model, ce, data), 0.6)
    with_masks = prospr_scores(model, ce, data, within=keep)
    pruned = copy.deepcopy(model)
    for name, mask in keep.items():
        module = pruned.get_submodule(name.rpartition(".")[0])
        prune.custom_from_mask(module, "weight", mask)
    reference = prospr_scores(pruned, ce, data)
    for name in keep:
        assert torch.allclose(with_masks[name], reference[name], rtol=1e-10, atol=1e-14)
        assert bool((with_masks[name][~keep[name]] == 0).all())


def test_iterative_rounds_nest_and_hit_the_exact_count():
    model, data = convnet(), batches(4)
    assert density_schedule(0.9, 3)[-1] == 0.9
    assert all(a < b for a, b in zip(density_schedule(0.9, 3), density_schedule(0.9, 3)[1:], strict=False))
    rounds = []
    for r in (1, 2, 3):
        settings = PruningSettings(density_schedule(0.9, 3)[r - 1], rounds=r, guard="off")
        rounds.append(compute_masks(model, ce, data, settings).masks)
    total = sum(m.numel() for m in rounds[0].values())
    assert sum(int((~m).sum()) for m in rounds[-1].values()) == pruned_count(0.9, total)
    three = compute_masks(model, ce, data, PruningSettings(0.9, rounds=3, guard="off")).masks
    assert all(torch.equal(three[n], rounds[-1][n]) for n in three)
    # The rounds of one 3-round run nest: re-run its schedule by hand with `within`.
    current = None
    previous = None
    for target in density_schedule(0.9, 3):
        scores = prospr_scores(model, ce, data, within=current)
        current = global_masks(scores, target, within=current)
        if previous is not None:
            assert not any(bool((current[n] & ~previous[n]).any()) for n in current)
        previous = current
    assert all(torch.equal(current[n], three[n]) for n in three)


def test_unrolls_averages_independent_unrolls():
    model, data = convnet(), batches(8)
    averaged = compute_masks(model, ce, data, PruningSettings(0.5, unrolls=2, guard="off"))
    first = prospr_scores(model, ce, data[:4])
    second = prospr_scores(model, ce, data[4:8])
    expected = global_masks({n: (first[n] + second[n]) / 2 for n in first}, 0.5)
    assert all(torch.equal(averaged.masks[n], expected[n]) for n in expected)


@pytest.mark.parametrize("method", ["snip", "grasp", "synflow", "magnitude", "random"])
def test_every_method_gives_exact_counts(method):
    model, data = convnet(), batches(4)
    result = compute_masks(model, ce, data, PruningSettings(0.8, method=method))
    total = sum(m.numel() for m in result.masks.values())
    assert sum(int((~m).sum()) for m in result.masks.values()) == pruned_count(0.8, total)


def test_bad_pipeline_arguments():
    model, data = convnet(), batches(1)
    with pytest.raises(ValueError, match="unknown pruning method 'prune'"):
        compute_masks(model, ce, data, PruningSettings(0.5, method="prune"))
    with pytest.raises(ValueError, match="`rounds`=3 needs a method that re-scores"):
        compute_masks(model, ce, data, PruningSettings(0.5, method="magnitude", rounds=3))
    with pytest.raises(ValueError, match="`structured=True` supports"):
        compute_masks(model, ce, data, PruningSettings(0.5, method="grasp", structured=True))
    with pytest.raises(ValueError, match="`unrolls` must be an integer >= 1"):
        compute_masks(model, ce, data, PruningSettings(0.5, unrolls=0))


def test_callback_methods_and_guard_warning(tmp_path):
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 6, 6, generator=gen), torch.randint(0, 5, (64,), generator=gen))

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = convnet().float()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return ce(self, batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    def fit(**kwargs):
        callback = ProsprPruningCallback(verbose=False, **kwargs)
        quiet_trainer([callback], max_epochs=1).fit(
            Module(), train_dataloaders=DataLoader(data, batch_size=8)
        )
        return callback

    for method in ("snip", "grasp", "synflow", "magnitude", "random"):
        assert fit(sparsity=0.7, method=method).report.sparsity == pytest.approx(0.7, abs=0.01)
    structured = fit(sparsity=0.5, structured=True)
    assert "structured" in structured.report.method
    with pytest.warns(UserWarning, match="layer-collapse guard changed the plain top-k"):
        guarded = fit(sparsity=0.99)
    assert all(int(m.sum()) >= 1 for m in guarded.masks.values())
