"""Models under ``torch.compile``: scoring runs them eagerly, training afterwards runs compiled.

AOTAutograd (behind every ``torch.compile`` backend but ``"eager"``) refuses to differentiate a
compiled backward pass, which ProsPr's full mode, ``mode="recompute"`` and GraSP all do. The tests use
the ``aot_eager`` backend: the same AOTAutograd graph capture as ``inductor`` (and the same refusal),
without compiling C++ kernels.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from model_state import assert_same, snapshot
from shared import ce_loss
from test_callback import PRUNED, DataModule, Module
from torch import nn
from torch._dynamo.utils import counters

from lightning_prospr import ProsprPruningCallback, prospr_scores
from lightning_prospr.baselines import grasp_scores
from lightning_prospr.errors import UnrollError
from lightning_prospr.masking import effective_weight

F = nn.functional


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    ).train()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 5, (8,), generator=gen)


@pytest.mark.parametrize(
    "options", [{}, {"mode": "recompute"}, {"mode": "first_order"}], ids=["full", "recompute", "first-order"]
)
def test_scores_of_a_compiled_model_are_those_of_the_model(options: dict[str, bool]) -> None:
    net = convnet()
    expected = prospr_scores(net, ce_loss, [batch()], steps=2, **options)
    compiled = torch.compile(net, backend="aot_eager")
    before = snapshot(net)

    scores = prospr_scores(compiled, ce_loss, [batch()], steps=2, **options)
    assert counters["frames"]["ok"] == 0  # scoring ran the model eagerly: nothing was compiled
    assert set(expected) == {"0.weight", "4.weight"}  # the conv and the classifier: not an empty check

    assert {name.removeprefix("_orig_mod."): s for name, s in scores.items()}.keys() == expected.keys()
    for name, score in scores.items():
        torch.testing.assert_close(score, expected[name.removeprefix("_orig_mod.")], rtol=0, atol=0)
    assert_same(before, snapshot(net))  # parameters, BN statistics, grads, modes, hooks, RNG
    # The compiled model still runs compiled afterwards.
    out = compiled(batch()[0])
    assert out.shape == (8, 5)
    assert counters["frames"]["ok"] >= 1


def test_grasp_of_a_compiled_model_is_that_of_the_model() -> None:
    net = convnet()
    expected = grasp_scores(net, ce_loss, [batch()], temperature=1.0)
    scores = grasp_scores(torch.compile(net, backend="aot_eager"), ce_loss, [batch()], temperature=1.0)
    assert {name.removeprefix("_orig_mod.") for name in scores} == set(expected) == {"0.weight", "4.weight"}
    for name, score in scores.items():
        torch.testing.assert_close(score, expected[name.removeprefix("_orig_mod.")], rtol=0, atol=0)


def test_without_set_stance_the_error_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch < 2.6 has no ``torch.compiler.set_stance``: the refusal becomes advice, the model intact."""
    monkeypatch.delattr(torch.compiler, "set_stance")
    net = convnet()
    before = snapshot(net)
    compiled = torch.compile(net, backend="aot_eager")
    with pytest.raises(UnrollError, match=r"full mode .* runs under torch.compile.*Score the uncompiled"):
        prospr_scores(compiled, ce_loss, [batch()], steps=2)
    assert_same(before, snapshot(net))
    with pytest.raises(UnrollError, match=r"GraSP's Hessian-gradient product differentiates the model"):
        grasp_scores(compiled, ce_loss, [batch()], temperature=1.0)


def fit(tmp_path: Path, module: pl.LightningModule | nn.Module, callback: ProsprPruningCallback) -> None:
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    trainer.fit(module, datamodule=DataModule(shuffle=False))


@pytest.mark.parametrize("where", ["lightning-module", "submodule"])
def test_callback_prunes_a_compiled_model_like_the_plain_one(tmp_path: Path, where: str) -> None:
    torch.manual_seed(0)
    plain = Module()
    torch.manual_seed(0)
    module = Module()
    reference = ProsprPruningCallback(sparsity=0.6, steps=2, verbose=False)
    callback = ProsprPruningCallback(sparsity=0.6, steps=2, verbose=False)
    fit(tmp_path / "plain", plain, reference)

    if where == "submodule":
        module.net = torch.compile(module.net, backend="aot_eager")
        fit(tmp_path / "compiled", module, callback)
        prefix = "net._orig_mod."
    else:
        fit(tmp_path / "compiled", torch.compile(module, backend="aot_eager"), callback)
        prefix = "net."

    masks = {name.replace(prefix, "net.", 1): mask for name, mask in callback.masks.items()}
    assert masks.keys() == set(PRUNED)
    for name in PRUNED:
        assert torch.equal(masks[name], reference.masks[name]), name
    assert counters["frames"]["ok"] >= 1  # training ran compiled
    # Trained under the masks: the pruned weights are still exactly zero.
    for name, mask in callback.masks.items():
        weight = effective_weight(module, name)
        assert not weight[~mask].any(), name
        assert weight[mask].abs().sum() > 0, name
