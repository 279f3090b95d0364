"""Third-party architectures, built from configs with random init (nothing is downloaded), and the
LightningModules that wrap them the way users write them: ``training_step`` calls the model, there
is no ``forward``.

Shared by benchmarks/real_models.py and tests/test_real_models.py (which loads it with
tests/benchmark_scripts.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import timm
import torch
import torchvision
import transformers
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader
from transformers.pytorch_utils import Conv1D

F = nn.functional
transformers.logging.set_verbosity_error()

VOCAB, LENGTH, CLASSES = 64, 8, 4


@dataclass(frozen=True)
class Case:
    """A model, how to make a batch for it, and how its loss is computed."""

    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator, torch.dtype], Any]
    loss: Callable[[nn.Module, Any], Tensor]
    #: The same loss without float32 casts, for float64 finite differences (Hugging Face's causal-LM
    #: loss casts the logits to float32); ``None``: ``loss`` is already exact.
    float64_loss: Callable[[nn.Module, Any], Tensor] | None = None

    @property
    def exact_loss(self) -> Callable[[nn.Module, Any], Tensor]:
        return self.float64_loss or self.loss


def images(gen: torch.Generator, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return torch.randn(4, 3, 32, 32, generator=gen, dtype=dtype), torch.randint(
        0, CLASSES, (4,), generator=gen
    )


def tokens(gen: torch.Generator, dtype: torch.dtype) -> dict[str, Tensor]:
    ids = torch.randint(0, VOCAB, (4, LENGTH), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def sentences(gen: torch.Generator, dtype: torch.dtype) -> dict[str, Tensor]:
    ids = torch.randint(0, VOCAB, (4, LENGTH), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 3}


def classify(model: nn.Module, batch: Any) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def hugging_face(model: nn.Module, batch: Any) -> Tensor:
    return model(**batch).loss


class _KeepFloat64(TorchFunctionMode):
    """Undo the float32 casts inside a float64 model (Llama's RMSNorm and rotary embedding compute
    in float32 by design), so that finite differences see a float64 function."""

    CASTS = frozenset({Tensor.float, Tensor.to, Tensor.type_as})

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in self.CASTS and isinstance(out, Tensor) and out.dtype == torch.float32:
            if isinstance(args[0], Tensor) and args[0].dtype == torch.float64:
                return args[0].to(out.device)  # the float64 values themselves, not rounded ones
        return out


def next_token_float64(model: nn.Module, batch: Any) -> Tensor:
    with _KeepFloat64():
        return next_token(model, batch)


def next_token(model: nn.Module, batch: Any) -> Tensor:
    """Hugging Face's causal-LM loss (predict token t + 1 from tokens up to t), in the logits' dtype."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _bert() -> nn.Module:
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB,
        max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def _llama() -> nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=16,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


CASES: dict[str, Case] = {
    "timm-resnet10t": Case(lambda: timm.create_model("resnet10t", num_classes=CLASSES), images, classify),
    "timm-vit": Case(
        lambda: timm.create_model(
            "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=CLASSES
        ),
        images,
        classify,
    ),
    "timm-convnext": Case(
        lambda: timm.create_model(
            "convnext_atto", depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), num_classes=CLASSES
        ),
        images,
        classify,
    ),
    "timm-mobilenetv3": Case(
        lambda: timm.create_model("mobilenetv3_small_050", num_classes=CLASSES), images, classify
    ),
    "torchvision-mobilenet_v3_small": Case(
        lambda: torchvision.models.mobilenet_v3_small(num_classes=CLASSES, dropout=0.0), images, classify
    ),
    "hf-gpt2": Case(_gpt2, tokens, hugging_face, next_token),
    "hf-bert": Case(_bert, sentences, hugging_face),
    "hf-llama": Case(_llama, tokens, hugging_face, next_token_float64),
}


def expected_matrices(model: nn.Module) -> list[str]:
    """Written out for the tests: the weight of every Linear, Conv2d and transformers Conv1D, in
    named_parameters() order, without the ones that are also an nn.Embedding's table (tied)."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    matrices = {
        id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, Conv1D))
    } - embedded
    return [n for n, p in model.named_parameters() if id(p) in matrices]


class Wrapped(pl.LightningModule):
    """A LightningModule around a third-party model, without ``forward``."""

    def __init__(self, case: str, batches: int = 6, lr: float = 0.01) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.case = CASES[case]
        self.model = self.case.build()
        gen = torch.Generator().manual_seed(1)
        self.data = [self.case.batch(gen, torch.float32) for _ in range(batches)]
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.case.loss(self.model, batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=None)  # the items are batches already
