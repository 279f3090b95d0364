"""Baseline scorers checked against independent computations.

Every reference here shares no code with :mod:`lightning_prospr.baselines`: plain ``loss.backward()``
on a ``copy.deepcopy`` of the model, a hand-written forward pass differentiated by
:func:`torch.autograd.functional.hessian`, or closed forms for a two-layer linear network.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from model_state import Net, assert_same, snapshot
from shared import ce_loss
from torch import nn
from torch.nn.utils import prune

import lightning_prospr.baselines as baselines
from lightning_prospr import METHODS, PruningSettings, global_masks, prospr_scores, snip_scores
from lightning_prospr.baselines import (
    grasp_scores,
    iterative_synflow_masks,
    magnitude_scores,
    random_scores,
    synflow_scores,
)
from lightning_prospr.errors import UnrollError
from lightning_prospr.selection import pruned_count

F = nn.functional


def make_batch(n=8, d=5, classes=3, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=dtype), torch.randint(0, classes, (n,), generator=gen)


def mlp_with_bn_and_dropout():
    return nn.Sequential(
        nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)
    ).double()


def max_relative_error(a, b):
    num = max((a[n] - b[n]).abs().max().item() for n in b)
    den = max(b[n].abs().max().item() for n in b)
    return num / den


# ------------------------------------------------------------------------------------------- SNIP


def test_prospr_needs_a_step_and_says_snip_is_the_method_for_none():
    with pytest.raises(ValueError, match="M = 0 is SNIP: use method='snip'"):
        prospr_scores(mlp_with_bn_and_dropout(), ce_loss, [make_batch(seed=1)], steps=0)


def test_snip_matches_plain_backward_on_the_first_batch():
    torch.manual_seed(1)
    model = mlp_with_bn_and_dropout()
    first, second = make_batch(seed=3), make_batch(seed=4)

    torch.manual_seed(9)  # the same dropout draws for the reference and the scorer
    net = copy.deepcopy(model).train()
    ce_loss(net, first).backward()
    expected = {
        n: (p.detach() * p.grad).abs() for n, p in net.named_parameters() if n in ("0.weight", "4.weight")
    }

    torch.manual_seed(9)
    scores = snip_scores(model, ce_loss, [first, second])
    assert max_relative_error(scores, expected) < 1e-12
    assert all(s.dtype == torch.float64 and (s >= 0).all() for s in scores.values())


def test_snip_rejects_non_finite_scores_naming_the_parameter():
    model = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[1].weight[0, 0] = 0.0  # d sqrt|w| / dw = inf there, and 0 * inf = NaN

    def sqrt_loss(m, batch):
        return m[0].weight.abs().sum() + m[1].weight.abs().sqrt().sum()

    with pytest.raises(UnrollError, match=r"SNIP score of '1\.weight' is not finite"):
        snip_scores(model, sqrt_loss, [None], parameters=["0.weight", "1.weight"])  # no matmul to watch


def test_empty_batches_are_refused():
    with pytest.raises(ValueError, match="empty"):
        snip_scores(nn.Linear(2, 2), ce_loss, [])


# ------------------------------------------------------------------------------------------ GraSP


def hand_mlp_loss(flat, shapes, biases, batch, temperature, keep=1.0):
    """CE of a Linear-tanh-(dropout)-Linear network written by hand, on logits / temperature."""
    (s1, s2), (b1, b2) = shapes, biases
    w1 = flat[: s1.numel()].reshape(s1)
    w2 = flat[s1.numel() :].reshape(s2)
    x, y = batch
    logits = (torch.tanh(x @ w1.T + b1) * keep) @ w2.T + b2
    return F.cross_entropy(logits / temperature, y)


def brute_force_theta_hg(model, batches, temperature, keeps=None):
    """theta * (H g) from the full Hessian of the summed loss over the flattened weights."""
    w1, w2 = model[0].weight.detach(), model[-1].weight.detach()
    biases = (model[0].bias.detach(), model[-1].bias.detach())
    theta = torch.cat([w1.reshape(-1), w2.reshape(-1)])
    keeps = keeps or [1.0] * len(batches)

    def total(flat):
        return sum(
            hand_mlp_loss(flat, (w1.shape, w2.shape), biases, b, temperature, k)
            for b, k in zip(batches, keeps, strict=True)
        )

    hessian = torch.autograd.functional.hessian(total, theta)
    flat = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(total(flat), flat)
    value = theta * (hessian @ g)
    return {
        "0.weight": value[: w1.numel()].reshape(w1.shape),
        f"{len(model) - 1}.weight": value[w1.numel() :].reshape(w2.shape),
    }


def tanh_mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


@pytest.mark.parametrize(("temperature", "num_batches"), [(200.0, 1), (1.0, 1), (200.0, 2)])
def test_grasp_matches_brute_force_hessian(temperature, num_batches):
    torch.manual_seed(2)
    model = tanh_mlp()
    batches = [make_batch(n=6, d=4, seed=s) for s in (10, 11, 12)]
    scores = grasp_scores(model, ce_loss, batches, temperature=temperature, num_batches=num_batches)
    expected = brute_force_theta_hg(model, batches[:num_batches], temperature)
    assert list(scores) == ["0.weight", "2.weight"]
    assert max_relative_error(scores, expected) < 1e-10
    # Signed: GraSP's scores are not magnitudes.
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    assert (flat < 0).any() and (flat > 0).any()


def test_grasp_passes_see_the_same_dropout_draws():
    """Both passes (g, then Hg) must differentiate one function: the same dropout masks."""
    torch.manual_seed(17)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 3)).double()
    batches = [make_batch(n=6, d=4, seed=s) for s in (18, 19)]
    torch.manual_seed(20)  # the draws nn.Dropout makes, one (6, 5) tensor per batch, in order
    keeps = [F.dropout(torch.ones(6, 5, dtype=torch.float64), 0.5, training=True) for _ in batches]
    assert all(0 < int((k == 0).sum()) < 30 for k in keeps)
    expected = brute_force_theta_hg(model, batches, 200.0, keeps)
    torch.manual_seed(20)
    scores = grasp_scores(model, ce_loss, batches, num_batches=2)
    assert max_relative_error(scores, expected) < 1e-10


def test_grasp_temperature_changes_the_scores():
    torch.manual_seed(3)
    model = tanh_mlp()
    batch = make_batch(n=6, d=4, seed=13)
    hot = grasp_scores(model, ce_loss, [batch], temperature=200.0)
    cold = grasp_scores(model, ce_loss, [batch], temperature=1.0)
    assert max_relative_error(hot, cold) > 1e-3
    assert max_relative_error(hot, brute_force_theta_hg(model, [batch], 1.0)) > 1e-3


def test_grasp_removes_the_weights_with_the_highest_paper_score():
    """GraSP removes the largest S(-theta) = -theta * Hg; selection on our scores must agree."""
    torch.manual_seed(4)
    model = tanh_mlp()
    batch = make_batch(n=6, d=4, seed=14)
    paper = {n: -v for n, v in brute_force_theta_hg(model, [batch], 200.0).items()}
    flat = torch.cat([v.reshape(-1) for v in paper.values()])
    sparsity = 0.4
    removed = pruned_count(sparsity, flat.numel())
    expected_removed = set(torch.topk(flat, removed).indices.tolist())

    masks = global_masks(grasp_scores(model, ce_loss, [batch]), sparsity)
    keep = torch.cat([m.reshape(-1) for m in masks.values()])
    assert set((~keep).nonzero().reshape(-1).tolist()) == expected_removed


def test_grasp_temperature_on_a_submodule_and_the_errors():
    class Wrapper(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):  # never called by the loss below
            return self.net(x)

    torch.manual_seed(5)
    model = tanh_mlp()
    batch = make_batch(n=6, d=4, seed=15)
    wrapped = Wrapper(copy.deepcopy(model))

    def inner_loss(m, b):
        return F.cross_entropy(m.net(b[0]), b[1])

    with pytest.raises(ValueError, match="never called it"):
        grasp_scores(wrapped, inner_loss, [batch])
    scores = grasp_scores(wrapped, inner_loss, [batch], logits_module="net")
    expected = brute_force_theta_hg(model, [batch], 200.0)
    assert max_relative_error({n.removeprefix("net."): s for n, s in scores.items()}, expected) < 1e-10
    assert not wrapped.net._forward_hooks and not wrapped._forward_hooks  # hooks removed

    class TupleOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3).double()

        def forward(self, x):
            return self.fc(x), x

    tuple_model = TupleOut()
    with pytest.raises(UnrollError, match="not a tensor"):
        grasp_scores(tuple_model, lambda m, b: F.cross_entropy(m(b[0])[0], b[1]), [batch])
    assert not tuple_model._forward_hooks
    with pytest.raises(ValueError, match="not a submodule"):
        grasp_scores(model, ce_loss, [batch], logits_module="nope")
    with pytest.raises(ValueError, match="temperature"):
        grasp_scores(model, ce_loss, [batch], temperature=0.0)


# ---------------------------------------------------------------------------------------- SynFlow


def test_synflow_matches_closed_form_for_two_linear_layers():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False))  # float32, signed
    a1 = model[0].weight.detach().double().abs()
    a2 = model[1].weight.detach().double().abs()
    # R = 1^T |W2| |W1| 1: dR/d|W1|[i, j] = sum_k |W2|[k, i], dR/d|W2|[k, i] = sum_j |W1|[i, j].
    expected = {"0.weight": a1 * a2.sum(0)[:, None], "1.weight": a2 * a1.sum(1)[None, :]}

    scores = synflow_scores(model, input_shape=(4,))
    assert all(s.dtype == torch.float64 for s in scores.values())  # float64 by design
    assert max_relative_error(scores, expected) < 1e-14
    from_example = synflow_scores(model, example_input=torch.randn(7, 4))
    assert all(torch.equal(from_example[n], scores[n]) for n in scores)
    single = synflow_scores(model, input_shape=(4,), dtype=torch.float32)
    assert all(s.dtype == torch.float32 for s in single.values())
    assert max_relative_error(single, expected) < 1e-5


def test_synflow_uses_eval_mode_and_matches_the_reference_algorithm():
    """Reference: Synaptic-Flow's linearize() (abs of the state_dict, in place) on a deep copy."""
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, 4),
    )
    with torch.no_grad():
        model[1].running_mean.copy_(torch.randn(3))
        model[1].running_var.copy_(torch.rand(3) + 0.5)
        model[1].weight.copy_(torch.randn(3))
    model.train()

    net = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for tensor in net.state_dict().values():
            if tensor.is_floating_point():
                tensor.abs_()
    net(torch.ones(1, 2, 5, 5, dtype=torch.float64)).sum().backward()
    expected = {
        n: (p.detach() * p.grad).abs() for n, p in net.named_parameters() if n in ("0.weight", "5.weight")
    }

    scores = synflow_scores(model, input_shape=(2, 5, 5))  # a batch of 1 would fail in train-mode BN
    assert max_relative_error(scores, expected) < 1e-12


def test_synflow_argument_errors_and_non_finite_scores():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="exactly one"):
        synflow_scores(model)
    with pytest.raises(ValueError, match="exactly one"):
        synflow_scores(model, input_shape=(3,), example_input=torch.ones(1, 3))
    with torch.no_grad():
        model[0].weight[0, 0] = math.inf  # R = inf, and every score with it
    with pytest.raises(UnrollError, match=r"SynFlow score of '0\.weight' is not finite"):
        synflow_scores(model, input_shape=(3,))


def small_mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
def test_iterative_synflow_exact_count_and_nested_rounds(sparsity, monkeypatch):
    model = small_mlp(8)
    total = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    selected = []

    def spy(scores, target):
        masks = global_masks(scores, target)
        selected.append((target, masks))
        return masks

    monkeypatch.setattr(baselines, "global_masks", spy)
    rounds = 6
    masks = iterative_synflow_masks(model, sparsity, rounds=rounds, input_shape=(20,))
    assert len(selected) == rounds
    assert sum(int(m.sum()) for m in masks.values()) == total - pruned_count(sparsity, total)
    previous = None
    for r, (target, chosen) in enumerate(selected, start=1):
        assert target == pytest.approx(1 - (1 - sparsity) ** (r / rounds), abs=1e-12)
        assert sum(int(m.sum()) for m in chosen.values()) == total - pruned_count(target, total)
        if previous is not None:  # nothing once pruned comes back (checked before the final `&`)
            assert all(not (chosen[n] & ~previous[n]).any() for n in chosen)
        previous = chosen
    assert all(torch.equal(masks[n], previous[n]) for n in masks)


def test_iterative_synflow_nests_even_against_adversarial_scores(monkeypatch):
    """Nesting must come from the selection, not from SynFlow giving pruned weights a score of 0:
    with fresh random scores each round (a third of them exactly 0), no pruned weight comes back."""
    model = small_mlp(18)
    gen = torch.Generator().manual_seed(0)

    def adversarial(self, masks=None):
        out = {}
        for name, weight in self.absolute.items():
            s = torch.rand(weight.shape, generator=gen, dtype=torch.float64)
            out[name] = s.masked_fill(torch.rand(weight.shape, generator=gen) < 0.3, 0.0)
        return out

    selected = []

    def spy(scores, target):
        selected.append(global_masks(scores, target))
        return selected[-1]

    monkeypatch.setattr(baselines._SynFlow, "scores", adversarial)
    monkeypatch.setattr(baselines, "global_masks", spy)
    masks = iterative_synflow_masks(model, 0.9, rounds=8, input_shape=(20,))
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == total - pruned_count(0.9, total)
    for previous, chosen in itertools.pairwise(selected):
        assert all(not (chosen[n] & ~previous[n]).any() for n in chosen)


def test_one_round_is_one_shot_synflow():
    model = small_mlp(9)
    one_shot = global_masks(synflow_scores(model, input_shape=(20,)), 0.8)
    masks = iterative_synflow_masks(model, 0.8, rounds=1, input_shape=(20,))
    assert all(torch.equal(masks[n], one_shot[n]) for n in masks)


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_iterative_synflow_does_not_collapse_a_layer_at_99_percent(seed):
    model = small_mlp(seed)
    masks = iterative_synflow_masks(model, 0.99, input_shape=(20,))  # 100 rounds
    assert all(int(m.sum()) > 0 for m in masks.values()), {n: int(m.sum()) for n, m in masks.items()}
    # ... whereas one shot (and magnitude) do collapse layers here, so the test has teeth.
    one_shot = global_masks(synflow_scores(model, input_shape=(20,)), 0.99)
    assert any(int(m.sum()) == 0 for m in one_shot.values())
    assert any(int(m.sum()) == 0 for m in global_masks(magnitude_scores(model), 0.99).values())


# ----------------------------------------------------------------------------- magnitude / random


def test_magnitude_is_the_absolute_weight():
    torch.manual_seed(13)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 2))
    scores = magnitude_scores(model)
    assert list(scores) == ["0.weight", "2.weight"]
    for name, s in scores.items():
        weight = dict(model.named_parameters())[name]
        assert torch.equal(s, weight.detach().abs())
        assert s.data_ptr() != weight.data_ptr()


def test_random_is_seeded_private_and_uniform():
    model = nn.Sequential(nn.Linear(30, 40), nn.Linear(40, 50))
    torch.manual_seed(14)
    state = torch.get_rng_state()
    first = random_scores(model, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    again = random_scores(model, seed=3)
    other = random_scores(model, seed=4)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not any(torch.equal(first[n], other[n]) for n in first)
    expected_gen = torch.Generator().manual_seed(3)
    for name, s in first.items():
        weight = dict(model.named_parameters())[name]
        assert s.shape == weight.shape and s.dtype == weight.dtype and s.device == weight.device
        assert torch.equal(s, torch.rand(weight.shape, generator=expected_gen))
    flat = torch.cat([s.reshape(-1) for s in first.values()])
    assert 0 <= flat.min() and flat.max() < 1 and abs(flat.mean().item() - 0.5) < 0.02


def test_half_precision_weights_give_float32_scores():
    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(torch.bfloat16)
    batch = make_batch(dtype=torch.bfloat16)
    for scores in (
        snip_scores(model, ce_loss, [batch]),
        grasp_scores(model, ce_loss, [batch], temperature=2.0),
        magnitude_scores(model),
        random_scores(model),
    ):
        assert all(s.dtype == torch.float32 for s in scores.values())
    assert all(s.dtype == torch.float64 for s in synflow_scores(model, input_shape=(5,)).values())
    assert torch.equal(magnitude_scores(model)["0.weight"], model[0].weight.detach().float().abs())


def test_unknown_method_names_the_registry():
    assert list(METHODS) == ["prospr", "snip", "grasp", "synflow", "magnitude", "random"]
    with pytest.raises(ValueError, match=r"'snipp'.*prospr, snip, grasp, synflow, magnitude, random"):
        PruningSettings(0.5, method="snipp")


# ------------------------------------------------------------------------------ model untouched


SCORED = ["conv.weight", "fc.weight", "frozen.weight"]  # a frozen weight, scored by name
SCORERS = {
    "snip": lambda m, b: snip_scores(m, ce_loss, b, parameters=SCORED),
    "grasp": lambda m, b: grasp_scores(m, ce_loss, b, num_batches=2, parameters=SCORED),
    "synflow": lambda m, b: synflow_scores(m, input_shape=(1, 6, 6), parameters=SCORED),
    "iterative_synflow": lambda m, b: iterative_synflow_masks(
        m, 0.9, rounds=3, example_input=b[0][0], parameters=SCORED
    ),
    "magnitude": lambda m, b: magnitude_scores(m, parameters=SCORED),
    "random": lambda m, b: random_scores(m, seed=1, parameters=SCORED),
}


@pytest.mark.parametrize("pruned", [False, True])
@pytest.mark.parametrize("method", list(SCORERS))
def test_model_untouched_bit_for_bit(method, pruned):
    torch.manual_seed(0)
    model = Net()
    model(torch.randn(2, 1, 6, 6)).sum().backward()  # some .grad fields set
    model.fc.eval()  # a mixed train/eval state
    if pruned:
        prune.l1_unstructured(model.fc, "weight", amount=0.5)
    batches = [(torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))) for _ in range(2)]
    weight_attr = model.fc.weight
    before = snapshot(model)
    out = SCORERS[method](model, batches)
    assert_same(before, snapshot(model))
    assert model.fc.weight is weight_attr
    assert list(out) == SCORED
    for name, value in out.items():
        assert (
            value.shape
            == model.get_parameter(name + ("_orig" if pruned and name == "fc.weight" else "")).shape
        )
        assert value.dtype == torch.bool or torch.isfinite(value).all()


def test_snip_of_a_pruned_weight_is_snip_of_the_masked_weight():
    torch.manual_seed(16)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    permanent = copy.deepcopy(model)  # (a pruned module cannot be deep-copied)
    prune.random_unstructured(model[0], "weight", amount=0.4)
    with torch.no_grad():
        permanent[0].weight.mul_(model[0].weight_mask)
    batch = make_batch(seed=17)
    scores = snip_scores(model, ce_loss, [batch])
    expected = snip_scores(permanent, ce_loss, [batch])
    assert list(scores) == ["0.weight", "2.weight"]
    assert max_relative_error(scores, expected) < 1e-14
    assert (scores["0.weight"][model[0].weight_mask == 0] == 0).all()
