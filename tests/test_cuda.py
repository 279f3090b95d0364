"""The engine and the callback on a CUDA GPU (skipped without one): ``python -m pytest -m cuda``."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from shared import ce_loss as ce
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prospr import ProsprPruningCallback, global_masks, prospr_scores
from lightning_prospr.models import ResNet20

pytestmark = pytest.mark.cuda
F = nn.functional


def batches(count=4, seed=0, n=16):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen))
        for _ in range(count)
    ]


def to(batch, device, dtype=None):
    x, y = batch
    return x.to(device, dtype), y.to(device)


@pytest.fixture(autouse=True)
def exact_kernels():
    """No TF32 in the comparisons against float64."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def relative_error(scores, reference):
    top = max(float(r.max()) for r in reference.values())
    return max(float((scores[n].double().cpu() - reference[n]).abs().max()) for n in reference) / top


@pytest.mark.parametrize("mode", [{}, {"mode": "recompute"}, {"mode": "first_order"}])
def test_cuda_scores_match_float64_cpu_scores(mode):
    """Within float32's own rounding: the CUDA scores are as close to the float64 ones as the CPU's
    float32 scores are (lr 0.01 keeps the unroll well conditioned; at lr 0.1 BatchNorm ResNets
    amplify rounding, see docs/results.md)."""
    torch.manual_seed(0)
    model = ResNet20()
    data = batches()
    options = {"steps": 3, "lr": 0.01, **mode}
    reference = prospr_scores(model.double(), ce, [to(b, "cpu", torch.float64) for b in data], **options)
    model.float()
    cpu = prospr_scores(model, ce, [to(b, "cpu") for b in data], **options)
    model.cuda()
    scores = prospr_scores(model, ce, [to(b, "cuda") for b in data], **options)
    assert all(s.is_cuda for s in scores.values())
    floor, error = relative_error(cpu, reference), relative_error(scores, reference)
    print(f"{mode}: error relative to the largest score: CUDA {error:.1e}, CPU float32 {floor:.1e}")
    assert error < max(1e-5, 3 * floor)
    cuda_masks = global_masks({n: s.double().cpu() for n, s in scores.items()}, 0.9)
    cpu_masks = global_masks(reference, 0.9)
    agree = sum(int((cuda_masks[n] == cpu_masks[n]).sum()) for n in cpu_masks)
    assert agree / sum(m.numel() for m in cpu_masks.values()) > 0.99


def test_cudnn_lstm_scores_in_full_mode_match_cpu():
    """cuDNN's RNN has no double backward: scoring runs it on the native CUDA kernels."""
    torch.manual_seed(0)

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(6, 8, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.lstm(x)[0][:, -1])

    model = Tagger()
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(5, 7, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen)) for _ in range(3)]
    reference = prospr_scores(model.double(), ce, [(x.double(), y) for x, y in data], steps=2)
    model.float().cuda()
    scores = prospr_scores(model, ce, [(x.cuda(), y.cuda()) for x, y in data], steps=2)
    assert "lstm.weight_ih_l0" in scores and "lstm.weight_hh_l0" in scores
    assert relative_error(scores, reference) < 1e-4


def test_scoring_frees_what_it_allocated():
    torch.manual_seed(0)
    model = ResNet20().cuda()
    data = [to(b, "cuda") for b in batches()]
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    scores = prospr_scores(model, ce, data, steps=3)
    torch.cuda.synchronize()
    held = sum(s.numel() * s.element_size() for s in scores.values())
    peak = torch.cuda.max_memory_allocated()
    print(f"peak {peak / 2**20:.0f} MiB over a baseline of {baseline / 2**20:.0f} MiB")
    assert peak > baseline  # the unroll did allocate
    del scores
    assert torch.cuda.memory_allocated() == baseline, (torch.cuda.memory_allocated(), baseline, held)


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = ResNet20()
        self.dropout = nn.Dropout(0.2)  # draws from the CUDA RNG while scoring

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(self.dropout(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Watch(pl.Callback):
    def __init__(self, pruning):
        self.pruning = pruning

    def setup(self, trainer, pl_module, stage):
        self.rng = torch.cuda.get_rng_state()

    def on_fit_start(self, trainer, pl_module):  # after the pruning callback's
        self.rng_after = torch.cuda.get_rng_state()
        self.buffer_devices = {b.device.type for n, b in pl_module.named_buffers() if n.endswith("_mask")}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_fit_on_the_gpu(precision, tmp_path):
    torch.manual_seed(0)
    x, y = torch.cat([b[0] for b in batches(6)]), torch.cat([b[1] for b in batches(6)])
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    pruning = ProsprPruningCallback(sparsity=0.9, verbose=False)
    watch = Watch(pruning)
    module = Module()
    pl.Trainer(
        accelerator="gpu", devices=1, precision=precision, max_steps=3, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=[pruning, watch],
    ).fit(module, train_dataloaders=loader)  # fmt: skip
    assert torch.equal(watch.rng, watch.rng_after)  # scoring's dropout did not move the CUDA RNG
    assert watch.buffer_devices == {"cuda"}
    assert pruning.report is not None and pruning.report.sparsity == pytest.approx(0.9, abs=1e-4)
    for name, mask in pruning.masks.items():
        module_name, _, attr = name.rpartition(".")
        weight = getattr(module.get_submodule(module_name), attr)
        assert weight.is_cuda and torch.count_nonzero(weight[~mask.to(weight.device)]) == 0


def test_two_four_masks_export_to_semi_structured_kernels():
    """pattern='2:4' masks, baked in, run on the sparse tensor cores and give the masked outputs."""
    from lightning_prospr import PruningSettings, compute_masks, make_permanent
    from lightning_prospr.masking import apply_masks
    from lightning_prospr.semi_structured import to_semi_structured

    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("semi-structured sparse kernels need compute capability 8.0 or later")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128)).cuda()
    data = [
        (torch.randn(64, 128, device="cuda"), torch.randint(0, 128, (64,), device="cuda")) for _ in range(4)
    ]
    result = compute_masks(net, ce, data, PruningSettings(0.5, pattern="2:4", guard="off"))
    apply_masks(net, result.masks)
    make_permanent(net)
    net = net.half().eval()
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    with torch.no_grad():
        expected = net(x)
        assert to_semi_structured(net) == ["0.weight", "2.weight"]
        got = net(x)
    assert type(net[0].weight).__name__.startswith("SparseSemiStructuredTensor")
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)
