"""Structured pruning and shrink of Hugging Face's decoders. GPT-2's `Conv1D` holds its weight as
`(in, out)`: the output channels are columns, the MLP width and the attention heads (of the packed
`c_attn`) are removed whole, and the shrunk model computes what the masked one computes. The Llama
family's attention heads (and GPT-NeoX's packed ones, and Phi-3's split `qkv_proj`) are grouped
from the module's layout, a key/value head with the query heads that read it (grouped-query
attention), and checked by running them (Bloom's fail the check and stay whole). torch-pruning's
own search round rotary embeddings never ends, and is bounded; a group it maps outside a tensor
(GPT-NeoX, Phi-3, with their layouts off) stays whole."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from shared import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prospr import ProsprPruningCallback, PruningSettings, channels, compute_masks, shrink
from lightning_prospr.masking import apply_masks
from lightning_prospr.pipeline import MaskResult

transformers = pytest.importorskip("transformers")

BLOCK = "transformer.h.0"


def gpt2(dropout: float = 0.0) -> nn.Module:
    """A 2-layer GPT-2 of width 32 (4 heads of 8, MLP width 128), random init."""
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16, bos_token_id=0,
        eos_token_id=0, attn_pdrop=dropout, resid_pdrop=dropout, embd_pdrop=dropout,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def tokens(n: int = 3, length: int = 8) -> torch.Tensor:
    return torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(3))


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, labels=ids).loss


def logits(model: nn.Module, ids: torch.Tensor, train: bool) -> torch.Tensor:
    model.train(train)
    torch.manual_seed(0)
    with torch.no_grad():
        return model(ids).logits


def assert_same_network(masked: nn.Module, small: nn.Module, ids: torch.Tensor) -> None:
    """The masked and the shrunk network compute the same logits in eval and train mode, and again
    after one SGD step on each."""
    for train in (False, True):
        a, b = logits(masked, ids, train), logits(small, ids, train)
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max())), train
    for net in (masked, small):  # one SGD step on each: still the same network
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
        lm_loss(net.train(), ids).backward()
        optimizer.step()
    a, b = logits(masked, ids, False), logits(small, ids, False)
    assert torch.allclose(a, b, rtol=1e-3, atol=1e-4 * float(a.abs().max()))


def quiet(model: nn.Module, settings: PruningSettings, ids: torch.Tensor):  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the residual stream stays whole (embeddings)
        return compute_masks(model, lm_loss, [ids], settings)


def test_gpt2_mlp_width_and_heads_are_columns_removed_whole_and_shrink_exactly():
    model, ids = gpt2(), tokens()
    settings = PruningSettings(0.5, method="snip", structured=True, head_sparsity=0.5)
    result = quiet(model, settings, ids)
    assert model.config.use_cache is True  # traced without the cache, then put back
    assert result.groups is not None
    mlp = result.groups.group_of(f"{BLOCK}.mlp.c_fc.weight")
    assert mlp is not None and mlp.size == 128 and [p.dim for p in mlp.producers] == [1]
    heads = result.groups.group_of(f"{BLOCK}.attn.c_attn.weight")
    assert heads is not None and (heads.size, heads.rows, heads.attention) == (4, 24, f"{BLOCK}.attn")
    # masks: whole columns of the (in, out) weights, with the bias of each removed column
    for name in (f"{BLOCK}.mlp.c_fc.weight", f"{BLOCK}.attn.c_attn.weight"):
        keep = result.channel_masks[name]
        assert result.masks[name].shape == dict(model.named_parameters())[name].shape
        assert torch.equal(result.masks[name], keep.reshape(1, -1).expand_as(result.masks[name]))
        assert torch.equal(result.coupled[name.replace(".weight", ".bias")], keep)
    qkv = result.channel_masks[f"{BLOCK}.attn.c_attn.weight"].reshape(3, 4, 8)  # (q/k/v, head, column)
    assert bool((qkv == qkv[:1, :, :1]).all()) and int(qkv[0, :, 0].sum()) == 2  # 2 of 4 heads, whole
    kept_width = int(result.channel_masks[f"{BLOCK}.mlp.c_fc.weight"].sum())
    assert 0 < kept_width < 128

    masked, small = copy.deepcopy(model), copy.deepcopy(model)
    apply_masks(masked, {**result.masks, **result.coupled})
    shrink(small, result.channel_masks, tokens(), loss_fn=lm_loss)
    block = small.transformer.h[0]
    assert block.mlp.c_fc.weight.shape == (32, kept_width) and block.mlp.c_fc.nf == kept_width
    assert block.mlp.c_proj.weight.shape == (kept_width, 32)
    assert (block.attn.num_heads, block.attn.split_size) == (2, 16)
    assert block.attn.c_attn.weight.shape == (32, 48) and block.attn.c_proj.weight.shape == (16, 32)
    assert small.config.use_cache is True
    assert_same_network(masked, small, ids)


def test_gpt2_channel_scores_sum_each_column():
    """Structured magnitude on the MLP: a channel's score is the sum of |w| down its column of the
    `(in, out)` weight, summed here by hand; half the columns of each layer are kept."""
    model, ids = gpt2(), tokens()
    names = [f"transformer.h.{i}.mlp.c_fc.weight" for i in (0, 1)]
    settings = PruningSettings(
        0.5, method="magnitude", structured=True, allocation="uniform", parameters=names
    )
    result = quiet(model, settings, ids)
    for name in names:
        weight = dict(model.named_parameters())[name].detach()
        expected = torch.zeros(128, dtype=torch.bool)
        expected[weight.abs().sum(dim=0).topk(64).indices] = True
        assert torch.equal(result.channel_masks[name], expected), name
    assert result.macs[names[0]] == 8 * 32 * 128  # per sequence: 8 positions x 32 inputs x 128 outputs


def test_gpt2_masked_network_matches_a_copy_with_the_columns_deleted():
    """Independent of torch-pruning: deleting the removed columns of `c_fc` and rows of `c_proj` by
    hand (with plain tensor indexing) gives the masked network's logits."""
    model, ids = gpt2(), tokens()
    name = f"{BLOCK}.mlp.c_fc.weight"
    settings = PruningSettings(0.75, method="snip", structured=True, allocation="uniform", parameters=[name])
    result = quiet(model, settings, ids)
    keep = result.channel_masks[name]
    assert int(keep.sum()) == 32
    masked, by_hand = copy.deepcopy(model), copy.deepcopy(model)
    apply_masks(masked, {**result.masks, **result.coupled})
    mlp = by_hand.transformer.h[0].mlp
    with torch.no_grad():
        mlp.c_fc.weight = nn.Parameter(mlp.c_fc.weight[:, keep].clone())
        mlp.c_fc.bias = nn.Parameter(mlp.c_fc.bias[keep].clone())
        mlp.c_fc.nf = int(keep.sum())
        mlp.c_proj.weight = nn.Parameter(mlp.c_proj.weight[keep, :].clone())
    a, b = logits(masked, ids, False), logits(by_hand, ids, False)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


def test_a_loss_that_turns_the_cache_on_gets_a_clear_error_and_an_unchanged_model():
    model, ids = gpt2(), tokens()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def cached(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return m(batch, labels=batch, use_cache=True).loss

    with pytest.raises(ValueError, match=r"torch-pruning could not trace which channels are coupled"):
        compute_masks(model, cached, [ids], PruningSettings(0.5, method="snip", structured=True))
    assert model.config.use_cache is True
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def decoder(config_type: str, model_type: str, **config: object) -> nn.Module:
    """A 2-layer Hugging Face decoder of width 32 with 4 query heads, from its config."""
    common = {"vocab_size": 64, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    torch.manual_seed(0)
    return getattr(transformers, model_type)(getattr(transformers, config_type)(**common, **config))


SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 16}
GQA = {**SIZES, "num_key_value_heads": 2, "intermediate_size": 64}
MQA = {**GQA, "num_key_value_heads": 1}  # multi-query attention: one key/value head


def llama() -> nn.Module:
    """A 2-layer Llama of width 32: 4 query heads of 8 on 2 key/value heads, MLP width 64."""
    return decoder("LlamaConfig", "LlamaForCausalLM", **GQA)


def attention_names(layer: int) -> list[str]:
    return [f"model.layers.{layer}.self_attn.{w}_proj.weight" for w in "qkv"]


def gpt2_shrunk(lm: nn.Module) -> None:
    for block in lm.transformer.h:
        assert block.mlp.c_fc.weight.shape == (32, 64) and block.mlp.c_proj.weight.shape == (64, 32)
        assert (block.attn.num_heads, block.attn.split_size) == (2, 16)


def llama_shrunk(lm: nn.Module) -> None:
    for layer in lm.model.layers:
        attention = layer.self_attn
        assert attention.q_proj.weight.shape == (16, 32) and attention.o_proj.weight.shape == (32, 16)
        assert attention.k_proj.weight.shape == attention.v_proj.weight.shape == (8, 32)
        assert layer.mlp.gate_proj.weight.shape == layer.mlp.down_proj.weight.shape == (32, 32)


DECODERS = {"gpt2": (gpt2, gpt2_shrunk), "llama": (llama, llama_shrunk)}


class DecoderModule(pl.LightningModule):
    """A LightningModule around a Hugging Face decoder with only `training_step` (no `forward`)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.lm = DECODERS[name][0]()

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return self.lm(batch[0], labels=batch[0]).loss

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(tokens(12)), batch_size=4)


@pytest.mark.parametrize("name", list(DECODERS))
def test_the_callback_shrinks_a_decoder_with_prospr_and_resumes(tmp_path: Path, name: str):
    """ProsPr's meta-gradients (M = 3) with one mask per `Conv1D` column (GPT-2) or per key/value
    head with its query heads (Llama), then a smaller network trained by `fit` with its optimizer
    made again; the checkpoint holds the small network, resuming re-shrinks a fresh dense one
    first, and a plain one loads it after `shrink`."""

    def callback() -> ProsprPruningCallback:
        return ProsprPruningCallback(
            sparsity=0.5, structured=True, shrink=True, head_sparsity=0.5, allocation="uniform", verbose=False
        )

    module = DecoderModule(name)
    dense = sum(p.numel() for p in module.parameters())
    first = callback()
    trainer = quiet_trainer([first], max_epochs=1, limit_train_batches=2, default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer.fit(module)
    DECODERS[name][1](module.lm)
    held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert held == {id(p) for p in module.parameters()}
    assert trainer.global_step == 2
    small = sum(p.numel() for p in module.parameters())
    assert first.report is not None and first.report.shrunk == (dense, small)

    path = tmp_path / "small.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    assert {k: v.shape for k, v in checkpoint["state_dict"].items()} == {
        k: v.shape for k, v in module.state_dict().items()
    }
    fresh = DecoderModule(name)
    resumed = quiet_trainer([callback()], max_epochs=2, limit_train_batches=2, default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        resumed.fit(fresh, ckpt_path=path)
    assert resumed.global_step == 4 and sum(p.numel() for p in fresh.parameters()) == small
    DECODERS[name][1](fresh.lm)

    plain = DecoderModule(name)
    masks = checkpoint["callbacks"][first.state_key]["channel_masks"]
    shrink(plain, masks, (tokens(),), loss_fn=lambda m, b: m.training_step(b, 0))
    plain.load_state_dict(checkpoint["state_dict"])
    ids = tokens()
    assert torch.allclose(logits(module.lm, ids, False), logits(plain.lm, ids, False), atol=1e-6)


def test_llama_key_value_heads_go_with_their_query_heads_and_shrink_exactly():
    """Grouped-query attention, 4 query heads on 2 key/value heads: a channel is key/value head j
    with query heads 2j and 2j + 1 (Hugging Face's `repeat_kv` order). `head_sparsity=0.5` removes
    one of each layer's two; the masked, the shrunk and a copy cut by hand agree."""
    model, ids = llama(), tokens()
    settings = PruningSettings(0.5, method="snip", structured=True, head_sparsity=0.5)
    with pytest.warns(UserWarning, match=r"keeps 4 weight\(s\) whole"):  # o_proj, down_proj: residual
        result = compute_masks(model, lm_loss, [ids], settings)
    assert result.groups is not None
    for layer in (0, 1):
        group = result.groups.group_of(attention_names(layer)[0])
        assert group is not None and (group.size, group.rows) == (2, 16)
        assert [p.name for p in group.producers] == attention_names(layer)
        assert [r.name for r in group.readers] == [f"model.layers.{layer}.self_attn.o_proj.weight"]
        q, k, v = (result.channel_masks[n] for n in attention_names(layer))
        kept = int(k.reshape(2, 8)[:, 0].nonzero())  # the key/value head kept
        assert torch.equal(k, v) and torch.equal(k, torch.arange(16) // 8 == kept)
        assert torch.equal(q, torch.arange(32) // 16 == kept)  # its two query heads, whole

    masked, small, by_hand = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    apply_masks(masked, {**result.masks, **result.coupled})
    apply_masks(by_hand, {n: m for n, m in {**result.masks, **result.coupled}.items() if ".mlp." in n})
    shrink(small, result.channel_masks, ids, loss_fn=lm_loss)
    for layer in (0, 1):
        attention = small.model.layers[layer].self_attn
        assert attention.q_proj.weight.shape == (16, 32) and attention.o_proj.weight.shape == (32, 16)
        assert attention.k_proj.weight.shape == attention.v_proj.weight.shape == (8, 32)
        assert attention.num_key_value_groups == 2
        # independent of the package: cut the kept heads' rows and columns with plain indexing
        q, k = (result.channel_masks[n] for n in attention_names(layer)[:2])
        cut = by_hand.model.layers[layer].self_attn
        for proj, rows in ((cut.q_proj, q), (cut.k_proj, k), (cut.v_proj, k)):
            proj.weight = nn.Parameter(proj.weight[rows].detach().clone())
        cut.o_proj.weight = nn.Parameter(cut.o_proj.weight[:, q].detach().clone())
    c = logits(by_hand, ids, False)
    assert torch.allclose(logits(masked, ids, False), c, rtol=1e-4, atol=1e-5 * float(c.abs().max()))
    assert_same_network(masked, small, ids)

    plain = llama()  # loads the small network after `shrink` with the same masks
    shrink(plain, result.channel_masks, ids, loss_fn=lm_loss)
    plain.load_state_dict(small.state_dict())
    assert torch.equal(logits(plain, ids, False), logits(small, ids, False))


def test_llama_head_scores_sum_the_query_key_and_value_rows_of_each_key_value_head():
    """Structured magnitude: key/value head j scores the sum of |w| over its rows in k_proj and
    v_proj and the rows of its two query heads in q_proj, summed here by hand; one of two kept."""
    model, ids = llama(), tokens()
    names = attention_names(0) + attention_names(1)
    settings = PruningSettings(
        0.5, method="magnitude", structured=True, allocation="uniform", parameters=names
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = compute_masks(model, lm_loss, [ids], settings)
    weights = dict(model.named_parameters())
    for layer in (0, 1):
        q, k, v = (weights[n].detach().abs().sum(dim=1) for n in attention_names(layer))
        score = q.reshape(2, 16).sum(1) + k.reshape(2, 8).sum(1) + v.reshape(2, 8).sum(1)
        expected = torch.arange(16) // 8 == int(score.argmax())
        assert torch.equal(result.channel_masks[attention_names(layer)[1]], expected), layer


def structured_snip(model: nn.Module, ids: torch.Tensor, **settings: Any) -> MaskResult:
    """Structured SNIP masks at 50 %, the warning about weights kept whole silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return compute_masks(
            model, lm_loss, [ids], PruningSettings(0.5, method="snip", structured=True, **settings)
        )


ARCHITECTURES = {  # name: (config class, model class, config, key/value heads per layer)
    "qwen2 (q/k/v biases)": ("Qwen2Config", "Qwen2ForCausalLM", GQA, 2),
    "qwen3 (per-head q/k norms)": ("Qwen3Config", "Qwen3ForCausalLM", {**GQA, "head_dim": 8}, 2),
    "mistral": ("MistralConfig", "MistralForCausalLM", GQA, 2),
    "mixtral (experts)": ("MixtralConfig", "MixtralForCausalLM", {**GQA, "num_local_experts": 2}, 2),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**GQA, "head_dim": 8}, 2),
    "opt (out_proj, no rotary)": (
        "OPTConfig",
        "OPTForCausalLM",
        {**SIZES, "ffn_dim": 64, "word_embed_proj_dim": 32},
        4,
    ),
    "phi (dense, partial rotary)": ("PhiConfig", "PhiForCausalLM", {**SIZES, "intermediate_size": 64}, 4),
    "gpt-j (out_proj, rotary)": (
        "GPTJConfig",
        "GPTJForCausalLM",
        {"n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4, "n_positions": 16},
        4,
    ),
    "phi-3 (split qkv_proj)": ("Phi3Config", "Phi3ForCausalLM", GQA, 2),
    "gemma-3 (sliding window, q/k norms)": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {**GQA, "head_dim": 8},
        2,
    ),
    "granite": ("GraniteConfig", "GraniteForCausalLM", GQA, 2),
    "cohere (parallel block)": ("CohereConfig", "CohereForCausalLM", GQA, 2),
    "starcoder2 (biases)": ("Starcoder2Config", "Starcoder2ForCausalLM", GQA, 2),
    "llama, multi-query (query heads)": ("LlamaConfig", "LlamaForCausalLM", MQA, 4),
    "gemma, multi-query (gemma-2b)": ("GemmaConfig", "GemmaForCausalLM", {**MQA, "head_dim": 8}, 4),
    "phi-3, multi-query": ("Phi3Config", "Phi3ForCausalLM", MQA, 4),
    "gpt-neox (packed per head)": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        {**SIZES, "intermediate_size": 64},
        4,
    ),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_the_llama_family_layout_finds_the_heads_of_other_decoders(name: str):
    config_type, model_type, config, units = ARCHITECTURES[name]
    model, ids = decoder(config_type, model_type, **config), tokens()
    result = structured_snip(model, ids, allocation="uniform")  # half of each group
    assert result.groups is not None
    heads = [g for g in result.groups.groups if g.readers]
    assert len(heads) == 2 and all(g.size == units for g in heads)
    masked, small = copy.deepcopy(model), copy.deepcopy(model)
    apply_masks(masked, {**result.masks, **result.coupled})
    shrink(small, result.channel_masks, ids, loss_fn=lm_loss)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    for group in heads:  # half the heads: half the group's rows of the (query or packed) projection
        rows = next(m for m in group.producers if m.name == group.root).index.numel()
        assert (
            small.get_parameter(group.root).shape[0] == model.get_parameter(group.root).shape[0] - rows // 2
        )
    a, b = logits(masked, ids, False), logits(small, ids, False)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


def phi3_attention_masks() -> tuple[nn.Module, torch.Tensor, list[str], MaskResult]:
    """A Phi-3 (4 query heads of 8 on 2 key/value heads, one `qkv_proj` each layer) and the masks
    of structured SNIP on its `qkv_proj` weights only, one of each layer's 2 units removed."""
    model, ids = decoder("Phi3Config", "Phi3ForCausalLM", **GQA), tokens()
    names = [f"model.layers.{i}.self_attn.qkv_proj.weight" for i in (0, 1)]
    return model, ids, names, structured_snip(model, ids, allocation="uniform", parameters=names)


def test_phi3_split_projection_removes_whole_units_and_matches_transformers_own_smaller_attention():
    """Phi-3's `qkv_proj` holds all 32 query rows, then the 16 key rows, then the 16 value rows. A
    unit is key/value head j with query heads 2j and 2j + 1: query rows 16j..16j+15, key rows
    32+8j..32+8j+7 and value rows 48+8j..48+8j+7. Each shrunk attention module gets its own config
    with its head counts (its forward splits the rows at `config.num_attention_heads x head_dim`);
    the model's config keeps the dense counts. The shrunk model equals a copy whose attention
    modules are transformers' own `Phi3Attention` built for 2 query heads on 1 key/value head,
    given the kept rows and columns by plain indexing."""
    model, ids, names, result = phi3_attention_masks()
    assert result.groups is not None and not result.groups.excluded
    small, by_hand = copy.deepcopy(model), copy.deepcopy(model)
    shrink(small, result.channel_masks, ids, loss_fn=lm_loss)
    config = copy.copy(model.config)  # transformers' config for 2 query heads of 8 on 1 key/value head
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 8
    for layer, name in enumerate(names):
        group = result.groups.group_of(name)
        assert group is not None and (group.size, group.rows) == (2, 32)
        assert [r.name for r in group.readers] == [f"model.layers.{layer}.self_attn.o_proj.weight"]
        rows = result.channel_masks[name]
        kept = int(rows[32:48].reshape(2, 8)[:, 0].nonzero())
        unit = torch.arange(64)
        expected = torch.where(
            unit < 32, unit // 16, torch.where(unit < 48, (unit - 32) // 8, (unit - 48) // 8)
        )
        assert torch.equal(rows, expected == kept)
        attention = small.model.layers[layer].self_attn
        assert attention.qkv_proj.weight.shape == (32, 32) and attention.o_proj.weight.shape == (32, 16)
        assert (attention.config.num_attention_heads, attention.num_key_value_heads) == (2, 1)
        # independent of the package: transformers' own smaller attention, given the kept rows
        dense = by_hand.model.layers[layer].self_attn
        cut = transformers.models.phi3.modeling_phi3.Phi3Attention(config, layer)
        cut.qkv_proj.weight = nn.Parameter(dense.qkv_proj.weight[rows].detach().clone())
        cut.o_proj.weight = nn.Parameter(dense.o_proj.weight[:, rows[:32]].detach().clone())
        by_hand.model.layers[layer].self_attn = cut
    assert small.config.num_attention_heads == 4 and small.config.num_key_value_heads == 2
    masked = copy.deepcopy(model)
    apply_masks(masked, {**result.masks, **result.coupled})
    c = logits(by_hand, ids, False)
    assert torch.allclose(logits(small, ids, False), c, rtol=1e-4, atol=1e-5 * float(c.abs().max()))
    assert_same_network(masked, small, ids)


def test_phi3_heads_stay_whole_by_the_check_when_the_attention_keeps_the_dense_head_counts(
    monkeypatch: pytest.MonkeyPatch,
):
    """Without its own config, a shrunk Phi-3 attention splits its rows at the dense query width:
    removing the heads no longer gives the masked network, and the check leaves them whole (here,
    with nothing else to prune, an error that names them)."""
    monkeypatch.setattr(channels, "_own_config", lambda *args: None)
    with pytest.raises(ValueError, match="structured pruning found no channel group") as caught:
        phi3_attention_masks()
    for i in (0, 1):
        assert f"by the layout of `model.layers.{i}.self_attn` does not give the masked" in str(caught.value)


def test_multi_query_attention_removes_query_heads_and_their_output_columns_and_keeps_the_shared_head():
    """One key/value head read by 4 query heads (multi-query attention, as in Gemma-2B): a unit per
    query head, its 8 query rows and its 8 output columns, which are masked too (a head whose
    query rows are zero still averages the shared values). The key and value projections stay
    whole, with the reason. The shrunk model equals a copy whose attention modules are
    transformers' own `LlamaAttention` built for 2 query heads on 1 key/value head, given the
    kept rows and columns by plain indexing."""
    model, ids = decoder("LlamaConfig", "LlamaForCausalLM", **MQA), tokens()
    names = [n for i in (0, 1) for n in attention_names(i)]
    result = structured_snip(model, ids, allocation="uniform", parameters=names)
    assert result.groups is not None
    small, by_hand = copy.deepcopy(model), copy.deepcopy(model)
    shrink(small, result.channel_masks, ids, loss_fn=lm_loss)
    config = copy.copy(model.config)  # transformers' config for 2 query heads of 8 on 1 key/value head
    config.num_attention_heads, config.head_dim = 2, 8
    for layer in (0, 1):
        q_name, k_name, v_name = attention_names(layer)
        for name in (k_name, v_name):
            assert "one key/value head, read by all its 4 query heads" in result.groups.excluded[name]
        group = result.groups.group_of(q_name)
        assert group is not None and (group.size, group.rows, group.shared_key_value) == (4, 8, True)
        rows = result.channel_masks[q_name]
        assert int(rows.sum()) == 16 and torch.equal(
            rows, (rows.reshape(4, 8)[:, :1]).expand(4, 8).reshape(-1)
        )
        o_name = f"model.layers.{layer}.self_attn.o_proj.weight"
        assert torch.equal(result.coupled[o_name], rows.expand(32, 32))  # the dead heads' columns
        attention = small.model.layers[layer].self_attn
        assert attention.q_proj.weight.shape == (16, 32) and attention.o_proj.weight.shape == (32, 16)
        assert attention.k_proj.weight.shape == attention.v_proj.weight.shape == (8, 32)
        assert attention.num_key_value_groups == 2
        # independent of the package: transformers' own smaller attention, given the kept rows
        dense = by_hand.model.layers[layer].self_attn
        cut = transformers.models.llama.modeling_llama.LlamaAttention(config, layer)
        cut.load_state_dict(
            {
                "q_proj.weight": dense.q_proj.weight[rows],
                "k_proj.weight": dense.k_proj.weight,
                "v_proj.weight": dense.v_proj.weight,
                "o_proj.weight": dense.o_proj.weight[:, rows],
            }
        )
        by_hand.model.layers[layer].self_attn = cut
    masked = copy.deepcopy(model)
    apply_masks(masked, {**result.masks, **result.coupled})
    c = logits(by_hand, ids, False)
    assert torch.allclose(logits(small, ids, False), c, rtol=1e-4, atol=1e-5 * float(c.abs().max()))
    assert_same_network(masked, small, ids)


def test_bloom_heads_fail_the_layout_check_and_stay_whole_with_the_reason():
    """Bloom's packed query_key_value has GPT-NeoX's layout, but its ALiBi biases are built for the
    model's head count, outside the attention module: removing heads by the layout changes what it
    computes, the check sees it, and the projection stays whole; the MLP width still shrinks."""
    model, ids = decoder("BloomConfig", "BloomForCausalLM", hidden_size=32, n_layer=2, n_head=4), tokens()
    result = structured_snip(model, ids)
    assert result.groups is not None
    for i in (0, 1):
        why = result.groups.excluded[f"transformer.h.{i}.self_attention.query_key_value.weight"]
        assert f"by the layout of `transformer.h.{i}.self_attention` does not give the masked" in why
        assert result.groups.group_of(f"transformer.h.{i}.mlp.dense_h_to_4h.weight") is not None


def test_olmo2_heads_fail_the_layout_check_and_stay_whole_with_the_reason():
    """OLMo-2 normalizes the query and key projections over all heads at once (`q_norm` over
    heads x head size): removing a head changes the others' normalization, the check sees it, and
    the projections stay whole; the MLP width still shrinks."""
    model, ids = decoder("Olmo2Config", "Olmo2ForCausalLM", **GQA), tokens()
    result = structured_snip(model, ids)
    assert result.groups is not None
    for i in (0, 1):
        for name in attention_names(i):
            assert "by the layout of `model.layers" in result.groups.excluded[name]
        assert result.groups.group_of(f"model.layers.{i}.mlp.gate_proj.weight") is not None


def test_a_failure_inside_torch_prunings_search_leaves_that_group_whole_with_the_reason():
    """Falcon's grouped heads (`new_decoder_architecture`, 4 query heads on 2 key/value heads in
    one `query_key_value`) made torch-pruning's own index mapping divide by zero, and structured
    pruning crashed. That projection now stays whole with torch-pruning's error as the reason; the
    MLP width shrinks, and the masked network equals the shrunk one."""
    config = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_kv_heads": 2}
    model = decoder("FalconConfig", "FalconForCausalLM", new_decoder_architecture=True, **config)
    ids = tokens()
    result = structured_snip(model, ids)
    assert result.groups is not None
    for i in (0, 1):
        why = result.groups.excluded[f"transformer.h.{i}.self_attention.query_key_value.weight"]
        assert "torch-pruning's search for the channels coupled with it failed (ZeroDivisionError" in why
    masked, small = copy.deepcopy(model), copy.deepcopy(model)
    apply_masks(masked, {**result.masks, **result.coupled})
    shrink(small, result.channel_masks, ids, loss_fn=lm_loss)
    assert small.transformer.h[0].mlp.dense_h_to_4h.out_features < 128
    a, b = logits(masked, ids, False), logits(small, ids, False)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


class NamedLikeLlama(nn.Module):
    """Projections named like Llama's attention: 2 query heads of 4 on an input of width 8, key and
    value projections of `kv` rows, an output projection to `out` channels."""

    def __init__(self, kv: int = 8, out: int = 8) -> None:
        super().__init__()
        self.head_dim = 4
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, kv), nn.Linear(8, kv)
        self.o_proj = nn.Linear(8, out)


class TransposedHeads(NamedLikeLlama):
    """Named like Llama's attention, but the output projection reads the heads' outputs
    interleaved, `(position, head size, head)`: the layout's rows are then the wrong ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (
            p(x).unflatten(-1, (-1, self.head_dim)).transpose(0, 1)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v  # (head, position, head size)
        return self.o_proj(out.permute(1, 2, 0).flatten(1))


def test_a_module_named_like_llama_attention_that_mixes_its_heads_stays_whole_with_the_reason():
    model, x = nn.Sequential(nn.Linear(8, 8), TransposedHeads()), torch.randn(5, 8)
    before = copy.deepcopy(model.state_dict())
    names = [f"1.{w}_proj.weight" for w in "qkv"]
    found = channels.channel_groups(model, lambda m, b: m(b).square().mean(), x, names)
    assert all("by the layout of `1`" in found.excluded[n] for n in names) and not found.groups
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())


def test_a_zero_initialized_head_does_not_hide_a_wrong_removal_from_the_check(
    monkeypatch: pytest.MonkeyPatch,
):
    """Behind a zero-initialized classifier every removal computes the same predictions (zeros),
    so a check at those values would accept the mixed heads above, and the shrunk network would
    part from the masked one once the classifier trains. The check gives all-zero parameters
    random values first, and the heads stay whole; without that, they would pass."""
    head = nn.Linear(8, 3)
    nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
    model, x = nn.Sequential(nn.Linear(8, 8), TransposedHeads(), head), torch.randn(5, 8)
    names = [f"1.{w}_proj.weight" for w in "qkv"]

    def loss(m: nn.Module, b: torch.Tensor) -> torch.Tensor:
        return m(b).square().mean()

    found = channels.channel_groups(model, loss, x, names)
    assert all("by the layout of `1`" in found.excluded[n] for n in names) and not found.groups
    assert not head.weight.any() and not head.bias.any()  # the fill was undone
    monkeypatch.setattr(channels, "_fill_zeros", lambda model: None)
    assert len(channels.channel_groups(model, loss, x, names).groups) == 1


class MultiQuery(NamedLikeLlama):
    """Llama-named multi-query attention: 2 query heads of 4 on one key/value head, and an output
    projection to 6 channels that are not a residual stream (they feed a plain Linear)."""

    def __init__(self) -> None:
        super().__init__(kv=4, out=6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(x).unflatten(-1, (-1, self.head_dim)).transpose(0, 1)  # (head, position, size)
        out = torch.softmax(q @ self.k_proj(x).T, dim=-1) @ self.v_proj(x)
        return self.o_proj(out.transpose(0, 1).flatten(1))


def test_output_projection_rows_and_the_columns_of_multi_query_heads_keep_both_masks():
    """`o_proj` is in two groups: its columns die with the query heads, and its rows are channels
    of their own (read by the next Linear). Its mask keeps both; the masked network equals the
    shrunk one, in which `o_proj` lost rows and columns."""
    model, x = nn.Sequential(nn.Linear(8, 8), MultiQuery(), nn.ReLU(), nn.Linear(6, 3)), torch.randn(5, 8)

    def loss(m: nn.Module, b: torch.Tensor) -> torch.Tensor:
        return m(b).square().mean()

    names = ["1.q_proj.weight", "1.k_proj.weight", "1.v_proj.weight", "1.o_proj.weight"]
    settings = PruningSettings(
        0.5, method="magnitude", structured=True, allocation="uniform", parameters=names
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = compute_masks(model, loss, [x], settings)
    assert result.groups is not None and len(result.groups.groups) == 2
    heads = result.channel_masks["1.q_proj.weight"].reshape(2, 4)[:, 0]
    rows = result.channel_masks["1.o_proj.weight"]
    assert int(heads.sum()) == 1 and int(rows.sum()) == 3
    o_mask = result.masks["1.o_proj.weight"]
    assert torch.equal(o_mask, rows[:, None] & heads.repeat_interleave(4)[None, :])
    masked, small = copy.deepcopy(model), copy.deepcopy(model)
    apply_masks(masked, {**result.masks, **result.coupled})
    shrink(small, result.channel_masks, x, loss_fn=loss)
    assert small[1].o_proj.weight.shape == (3, 4) and small[3].weight.shape == (3, 3)
    with torch.no_grad():
        assert torch.allclose(masked(x), small(x), atol=1e-6)


@pytest.mark.timeout(300)
def test_without_the_layout_llama_attention_stays_whole_by_the_search_bound(monkeypatch: pytest.MonkeyPatch):
    """Torch-pruning's own search for the query projection's group never returns without a bound
    (rotary embeddings concatenate the halves of each head, and the index sets shift for ever); it
    is bounded, the projections stay whole with the reason, and the MLP width still shrinks."""
    monkeypatch.setattr(channels, "_layout_heads", lambda *args: None)
    model, ids = llama(), tokens()
    with pytest.warns(UserWarning, match=r"keeps 10 weight\(s\) whole"):
        result = compute_masks(model, lm_loss, [ids], PruningSettings(0.5, method="snip", structured=True))
    assert result.groups is not None
    for i in (0, 1):
        for w in ("q_proj", "k_proj"):
            assert "did not end" in result.groups.excluded[f"model.layers.{i}.self_attn.{w}.weight"]
        group = result.groups.group_of(f"model.layers.{i}.mlp.gate_proj.weight")
        assert group is not None and {p.name for p in group.producers} == {
            f"model.layers.{i}.mlp.{w}.weight" for w in ("gate_proj", "up_proj")
        }
    masked, small = copy.deepcopy(model), copy.deepcopy(model)
    apply_masks(masked, {**result.masks, **result.coupled})
    shrink(small, result.channel_masks, ids, loss_fn=lm_loss)
    assert small.model.layers[0].mlp.down_proj.weight.shape[1] < 64
    assert small.model.layers[0].self_attn.q_proj.weight.shape == (32, 32)
    a, b = logits(masked, ids, False), logits(small, ids, False)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


OUT_OF_RANGE = {  # name: (config, model, config, packed projection, MLP input layer, MLP width)
    "gpt-neox, layout off": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        {**SIZES, "intermediate_size": 64},
        "gpt_neox.layers.{}.attention.query_key_value",
        "gpt_neox.layers.{}.mlp.dense_h_to_4h",
        64,
    ),
    "phi-3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        GQA,
        "model.layers.{}.self_attn.qkv_proj",
        "model.layers.{}.mlp.down_proj",
        64,
    ),
}


@pytest.mark.parametrize("name", list(OUT_OF_RANGE))
def test_positions_outside_a_tensor_from_the_graph_leave_its_group_whole_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, name: str
):
    """torch-pruning's graph maps a packed query/key/value projection to positions outside it:
    GPT-NeoX's (split per head, rotary on part of each head; searched here with its layout off)
    to negative ones, Phi-3's (all query rows, then key, then value, with grouped-query attention)
    to ones past its end. Structured pruning crashed on them with an IndexError. The projection
    stays whole with the reason; the MLP width still shrinks, exactly."""
    monkeypatch.setattr(channels, "_layout_heads", lambda *args: None)
    config_type, model_type, config, packed, mlp, width = OUT_OF_RANGE[name]
    model, ids = decoder(config_type, model_type, **config), tokens()
    result = structured_snip(model, ids)
    assert result.groups is not None
    rows = dict(model.named_parameters())[f"{packed.format(0)}.weight"].shape[0]
    for i in (0, 1):
        why = result.groups.excluded[f"{packed.format(i)}.weight"]
        assert "maps its channels to positions" in why and f"which has {rows}" in why
    masked, small = copy.deepcopy(model), copy.deepcopy(model)
    apply_masks(masked, {**result.masks, **result.coupled})
    shrink(small, result.channel_masks, ids, loss_fn=lm_loss)
    narrowed = small.get_submodule(mlp.format(0))
    assert min(narrowed.in_features, narrowed.out_features) < width
    a, b = logits(masked, ids, False), logits(small, ids, False)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


def test_the_search_bound_counts_torch_prunings_searches(monkeypatch: pytest.MonkeyPatch):
    """The bound counts calls of torch-pruning's `Group.add_dep`; with no revisit allowed, even a
    plain MLP's group is cut short. If an upgrade stopped calling `add_dep`, this fails."""
    monkeypatch.setattr(channels, "SEARCH_REVISITS", 0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    found = channels.channel_groups(model, lambda m, b: m(b).sum(), torch.randn(3, 4), ["0.weight"])
    assert "did not end" in found.excluded["0.weight"]
