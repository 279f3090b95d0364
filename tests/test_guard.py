"""The layer-collapse guard (guard.py) and the linearized network it runs (linearized.py)."""

from __future__ import annotations

import itertools

import pytest
import torch
from shared import ce_loss as ce
from torch import nn

from lightning_prospr import prospr_scores
from lightning_prospr.guard import guard_masks
from lightning_prospr.linearized import path_gradients
from lightning_prospr.models import ResNet20
from lightning_prospr.selection import global_masks, pruned_count


@pytest.mark.parametrize("sparsity", [0.995, 0.999])
def test_guard_prevents_layer_collapse_on_resnet20(sparsity):
    torch.manual_seed(0)
    model = ResNet20()
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    scores = prospr_scores(model, ce, [(x, y)], steps=1)
    plain = global_masks(scores, sparsity)
    guarded, report = guard_masks(scores, plain, model=model, loss_fn=ce, batch=(x, y))
    total = sum(m.numel() for m in plain.values())
    assert sum(int(m.sum()) for m in guarded.values()) == total - pruned_count(sparsity, total)
    assert all(int(m.sum()) >= 1 for m in guarded.values())
    paths = path_gradients(model, guarded, ce, (x, y))
    assert paths.total > 0
    assert all(paths.on_path(n, guarded[n]) >= 1 for n in guarded)  # every layer on a path
    assert report.connected and report.changed
    # Plain top-k at this sparsity does collapse layers (that is what the guard is for).
    assert any(int(m.sum()) == 0 for m in plain.values())


def test_guard_reconnects_a_chain_broken_in_the_middle():
    """No kept weight lies on a path (R = 0) and the first layer already carries signal: the guard
    extends the signal layer by layer from where it stops, instead of piling weights into the first
    layer, and never pays for that with a tensor's last weight (regression: LeNet-5 at 99.5 % lost
    all of fc1 this way)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    masks = {
        n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters() if n.endswith("weight")
    }
    masks["0.weight"][:2] = True  # hidden units 0 and 1 carry signal
    masks["2.weight"][3, 4] = True  # reads hidden unit 4, which carries none
    masks["4.weight"][:, :3] = True  # reads second-layer units 0 to 2, which the layer before does not feed
    scores = {n: torch.rand(m.shape) for n, m in masks.items()}
    scores["0.weight"][2:] += 10.0  # the first layer's pruned weights look best: the old trap
    kept = sum(int(m.sum()) for m in masks.values())
    assert path_gradients(model, masks, ce, (x, y)).total == 0
    guarded, report = guard_masks(scores, masks, model=model, loss_fn=ce, batch=(x, y))
    assert sum(int(m.sum()) for m in guarded.values()) == kept
    assert all(int(m.sum()) >= 1 for m in guarded.values())
    paths = path_gradients(model, guarded, ce, (x, y))
    assert paths.total > 0 and all(paths.on_path(n, guarded[n]) >= 1 for n in guarded)
    assert report.connected
    assert report.added.get("0.weight", 0) == 0  # the first layer already passed the signal on
    assert sum(report.added.values()) <= 2  # one weight into layer 2, at most one more


def test_guard_never_pays_below_the_floor_when_it_cannot_connect(monkeypatch):
    """If the repairs cannot connect the network (simulated: the path check sees no path for any
    masks but the dense ones), paying for the floor's additions still keeps every tensor's floor:
    the off-path weight it would take first is a tensor's last one."""
    import lightning_prospr.linearized as linearized

    real = linearized.path_gradients

    def blind(model, masks, loss_fn, batch, one_sample=True):
        paths = real(model, masks, loss_fn, batch, one_sample)
        if all(bool(m.all()) for m in masks.values()):
            return paths
        return linearized.Paths({n: torch.zeros_like(g) for n, g in paths.grads.items()}, {}, 0.0)

    monkeypatch.setattr(linearized, "path_gradients", blind)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    masks = {
        "0.weight": torch.zeros(4, 3, dtype=torch.bool),  # collapsed: the floor adds one weight
        "2.weight": torch.zeros(4, 4, dtype=torch.bool),
        "4.weight": torch.ones(2, 4, dtype=torch.bool),
    }
    masks["2.weight"][0, 0] = True  # its only weight, and the lowest score of all
    scores = {n: torch.rand(m.shape) + 1.0 for n, m in masks.items()}
    scores["2.weight"][0, 0] = 0.0
    batch = (torch.randn(5, 3), torch.randint(0, 2, (5,)))
    guarded, report = guard_masks(scores, masks, layer_floor=1, model=model, loss_fn=ce, batch=batch)
    assert [int(m.sum()) for m in guarded.values()] == [1, 1, 7]
    assert report.removed == {"4.weight": 1} and not report.connected


def brute_force_on_path(weights: list[torch.Tensor], masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """For a chain of Linear layers: True where a kept weight (j -> i of layer k) lies on a path of
    kept weights from some input to some output, by enumerating the reachable units."""
    reach_in = [torch.ones(masks[0].shape[1], dtype=torch.bool)]  # units reachable from the input
    for m in masks:
        reach_in.append((m & reach_in[-1][None, :]).any(dim=1))
    reach_out = [torch.ones(masks[-1].shape[0], dtype=torch.bool)]  # units that reach the output
    for m in reversed(masks):
        reach_out.insert(0, (m & reach_out[0][:, None]).any(dim=0))
    return [m & reach_in[k][None, :] & reach_out[k + 1][:, None] for k, m in enumerate(masks)]


@pytest.mark.parametrize("seed", range(5))
def test_path_gradients_mark_exactly_the_weights_on_a_path(seed):
    """Checked against brute force on chains of Linear layers with ReLU, at random sparse masks."""
    torch.manual_seed(seed)
    sizes = [5, 6, 4, 3]
    model = nn.Sequential(*itertools.chain.from_iterable(
        (nn.Linear(a, b), nn.ReLU()) for a, b in itertools.pairwise(sizes)
    ))[:-1]  # fmt: skip
    names = [f"{2 * k}.weight" for k in range(len(sizes) - 1)]
    masks = {n: torch.rand(model.get_parameter(n).shape) < 0.25 for n in names}
    batch = (torch.randn(4, 5), torch.randint(0, 3, (4,)))
    paths = path_gradients(model, masks, ce, batch)
    expected = brute_force_on_path([model.get_parameter(n) for n in names], [masks[n] for n in names])
    for name, want in zip(names, expected, strict=True):
        assert torch.equal((paths.grads[name] != 0) & masks[name], want), name
