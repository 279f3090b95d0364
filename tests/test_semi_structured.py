"""N:M semi-structured masks: the pattern exact on every layer, checked by brute force; the options
it excludes; the callback; the export's refusals (the export itself runs in test_cuda.py)."""

from __future__ import annotations

import itertools

import pytest
import torch
from shared import ce_loss, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prospr import ProsprPruningCallback, PruningSettings, compute_masks
from lightning_prospr.models import LeNet300100, ResNet20
from lightning_prospr.semi_structured import input_dimension, nm_masks, parse_pattern, to_semi_structured


def brute_force(row: list[float], n: int, m: int) -> list[bool]:
    """Each group of m: the n positions of the best-scored subset (ties: the earlier positions)."""
    keep = []
    for start in range(0, len(row), m):
        group = row[start : start + m]
        best = max(
            itertools.combinations(range(m), n), key=lambda c: (sum(group[i] for i in c), [-i for i in c])
        )
        keep += [i in best for i in range(m)]
    return keep


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (1, 2)])
def test_nm_masks_match_brute_force(n, m):
    gen = torch.Generator().manual_seed(n * 10 + m)
    scores = torch.rand(5, 3 * m, generator=gen)
    masks, dense = nm_masks({"w": scores}, n, m, {"w": 1})
    assert dense == []
    expected = [brute_force(row, n, m) for row in scores.tolist()]
    assert masks["w"].tolist() == expected


def test_parse_pattern_refuses_nonsense():
    assert parse_pattern(" 4 : 8 ") == (4, 8)
    for bad in ("4:2", "0:4", "2-4", "2:4:8", "", "4:4"):
        with pytest.raises(ValueError, match="`pattern` must be 'N:M'"):
            parse_pattern(bad)


def two_of_four(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Kept weights per group of 4 consecutive inputs."""
    return (weight != 0).movedim(dim, -1).reshape(-1, 4).sum(dim=1)


def test_pattern_is_exact_on_every_layer_of_lenet_300_100():
    torch.manual_seed(0)
    model = LeNet300100()
    data = [(torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))) for _ in range(4)]
    result = compute_masks(model, ce_loss, data, PruningSettings(0.5, pattern="2:4", guard="off"))
    assert list(result.masks) == ["fc1.weight", "fc2.weight", "fc3.weight"]  # 784, 300, 100 inputs
    for mask in result.masks.values():
        assert torch.equal(two_of_four(mask, 1), torch.full_like(two_of_four(mask, 1), 2))
    assert sum(int(m.sum()) for m in result.masks.values()) * 2 == sum(
        m.numel() for m in result.masks.values()
    )


def test_convolutions_group_input_channels_and_narrow_inputs_stay_dense():
    torch.manual_seed(0)
    model = ResNet20()
    data = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(4)]
    settings = PruningSettings(0.75, method="snip", pattern="1:4", guard="off")
    with pytest.warns(UserWarning, match=r"leaves 1 weight\(s\) dense.*not a multiple of 4: conv1.weight"):
        result = compute_masks(model, ce_loss, data, settings)
    assert bool(result.masks["conv1.weight"].all())  # 3 input channels
    for name, mask in result.masks.items():
        if name != "conv1.weight":  # 16, 32 or 64 input channels at each kernel position
            counts = two_of_four(mask, 1)
            assert torch.equal(counts, torch.ones_like(counts)), name


def test_hugging_face_conv1d_groups_along_its_first_dimension():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8)
    model = transformers.GPT2LMHeadModel(config)
    assert input_dimension(model, "transformer.h.0.attn.c_attn.weight") == 0  # Conv1D is (in, out)
    assert input_dimension(model, "lm_head.weight") == 1

    def loss(m, batch):
        return m(input_ids=batch, labels=batch).loss

    data = [torch.randint(0, 32, (4, 8)) for _ in range(4)]
    result = compute_masks(model, loss, data, PruningSettings(0.5, method="snip", pattern="2:4", guard="off"))
    mask = result.masks["transformer.h.0.mlp.c_fc.weight"]  # (16, 64)
    assert torch.equal(two_of_four(mask, 0), torch.full((64 * 4,), 2))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sparsity": 0.9, "guard": "off"}, r"`sparsity`=0.9 contradicts pattern='2:4'.*pass sparsity=0.5"),
        ({"sparsity": 0.5}, r"`guard`='connected' does not apply with pattern.*guard='off'"),
        ({"sparsity": 0.5, "guard": "off", "allocation": "erk"}, "`allocation`='erk' does not apply"),
        ({"sparsity": 0.5, "guard": "off", "rounds": 5}, "`rounds`=5 does not apply"),
        ({"sparsity": 0.5, "guard": "off", "structured": True}, "`structured`=True does not apply"),
    ],
)
def test_options_the_pattern_excludes_are_errors(options, message):
    with pytest.raises(ValueError, match=message):
        PruningSettings(pattern="2:4", **options)


def test_synflow_with_a_pattern_is_one_round():
    settings = PruningSettings(0.5, method="synflow", pattern="2:4", guard="off")
    assert settings.rounds_used == 1
    assert settings.describe() == "SynFlow, 1 round, pattern 2:4, guard: off"


class Tiny(__import__("lightning.pytorch", fromlist=["LightningModule"]).LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def training_step(self, batch, batch_idx):
        return ce_loss(self.net, batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(64, 16, generator=gen)
        return DataLoader(TensorDataset(x, x[:, :4].argmax(1)), batch_size=16)


def test_callback_trains_under_the_pattern():
    torch.manual_seed(0)
    model = Tiny()
    pruning = ProsprPruningCallback(sparsity=0.5, pattern="2:4", guard="off", verbose=False)
    quiet_trainer([pruning], max_epochs=2).fit(model)
    for layer in (model.net[0], model.net[2]):
        counts = two_of_four(layer.weight, 1)  # the effective (masked) weight after training
        assert bool((counts <= 2).all()) and int((layer.weight != 0).sum()) == layer.weight.numel() // 2
    assert pruning.report.sparsity == 0.5
    assert "pattern 2:4" in pruning.description


def test_export_refuses_cpu_and_masked_layers():
    net = nn.Sequential(nn.Linear(8, 4))
    with torch.no_grad():
        net[0].weight[:, 1::2] = 0
    with pytest.raises(
        ValueError, match=r"`0.weight` is on cpu: semi-structured sparse kernels run on NVIDIA"
    ):
        to_semi_structured(net)
    with pytest.raises(ValueError, match=r"is not the weight of an nn\.Linear"):
        to_semi_structured(net, ["0.bias"])
    dense = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"no nn\.Linear weight follows the 2:4 pattern"):
        to_semi_structured(dense)
