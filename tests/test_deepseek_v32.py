"""DeepSeek-V3.2 parity with transformers: MLA restricted to the lightning indexer's top-k keys (a small
`index_topk`, so that the selection really drops keys, and the default one, under which it keeps all),
the indexer keys cached beside MLA's latent, V3 routing and dense layers, both expert layouts, an
INT4 pack under a tight tiered budget, and the config checks."""

from __future__ import annotations

import json

import pytest
import torch

from moe_local.errors import ConfigError
from moe_local.models import build_model
from moe_local.models.dsa import IndexedMLAttention
from moe_local.runtime.loader import load_model
pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread on a shared box (conftest)
from tests.family_checks import check_pack_tiered_matches_resident, cli
from tests.tiny import (PROMPT_LEN, VOCAB, YARN, assert_matches_reference, fuse_experts, reference_logits, save_tiny,
                        v32_config)

def prompt(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed))


def _our_masks(lm, ids) -> dict[int, torch.Tensor]:
    """The [T, S] boolean key mask every layer's attention used on a prefill of `ids`."""
    masks: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(lm.model.model.layers):
        attn = layer.self_attn
        assert isinstance(attn, IndexedMLAttention)

        def spy(*args, attn=attn, i=i):
            masks[i] = IndexedMLAttention.key_mask(attn, *args)
            return masks[i]
        attn.key_mask = spy
    lm.model.setup_cache(ids.shape[0])
    lm.model(ids, 0)
    for layer in lm.model.model.layers:
        del layer.self_attn.key_mask
    return masks


def _reference_masks(ref, ids) -> dict[int, torch.Tensor]:
    """The same from transformers: its indexer's top-k indices, intersected with the causal mask."""
    picked: dict[int, torch.Tensor] = {}
    hooks = [layer.self_attn.indexer.register_forward_hook(lambda m, a, out, i=i: picked.__setitem__(i, out[0]))
             for i, layer in enumerate(ref.model.layers)]
    reference_logits(ref, ids)
    for h in hooks:
        h.remove()
    T = ids.shape[0]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return {i: torch.zeros(T, T, dtype=torch.bool).scatter_(-1, top.long(), True) & causal for i, top in picked.items()}


# --------------------------------------------------------------------------- parity
def test_sparse_selection_matches_transformers(tmp_path):
    """index_topk=4 on 16 tokens: each query keeps 4 keys, the same 4 transformers' indexer keeps."""
    ref = save_tiny(v32_config(), tmp_path)
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    ids = prompt()
    ours, theirs = _our_masks(lm, ids), _reference_masks(ref, ids)
    assert sorted(ours) == sorted(theirs) == [0, 1, 2]
    for i in ours:
        assert torch.equal(ours[i], theirs[i]), f"layer {i}"
        kept = ours[i].sum(-1)
        assert kept.tolist() == [min(t + 1, 4) for t in range(PROMPT_LEN)]  # keys really dropped past 4


def test_selection_changes_the_output(tmp_path):
    """The parity test proves the selection is used: with all keys kept the logits are different
    (and equal to transformers' with the same index_topk, which is then plain MLA)."""
    ref = save_tiny(v32_config(), tmp_path)
    ids = prompt()
    sparse = load_model(tmp_path, device="cpu", dtype="float32")
    sparse.model.setup_cache(PROMPT_LEN)
    sparse_logits = sparse.model(ids, 0)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "index_topk": 2048}))
    ref.config.index_topk = 2048
    for layer in ref.model.layers:
        layer.self_attn.indexer.index_topk = 2048
    dense = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    dense.model.setup_cache(PROMPT_LEN)
    assert (dense.model(ids, 0) - sparse_logits).abs().max() > 1e-2


def test_yarn_bias_and_dense_layer_plan_match_transformers(tmp_path):
    """The math-changing options in one variant: YaRN with mscale_all_dim (softmax scale), attention
    biases, un-normalised top-k, mlp_layer_types instead of first_k_dense_replace, 2 shared experts,
    a wider indexer (index_topk 6 of 16)."""
    cfg = v32_config(rope_parameters=dict(YARN), attention_bias=True, norm_topk_prob=False, n_shared_experts=2,
                     num_hidden_layers=4, mlp_layer_types=["sparse", "dense", "sparse", "sparse"],
                     routed_scaling_factor=1.5, index_topk=6, index_n_heads=4, index_head_dim=24)
    ref = save_tiny(cfg, tmp_path)
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    assert lm.model.args.moe_layers == [0, 2, 3]
    attn = lm.model.model.layers[0].self_attn
    assert attn.scale == pytest.approx(ref.model.layers[0].self_attn.scaling, rel=1e-12) and attn.scale != 24**-0.5
    assert attn.q_a_proj.bias is not None and attn.o_proj.bias is not None


def test_fused_expert_layout_matches_transformers(tmp_path):
    ref = save_tiny(v32_config(first_k_dense_replace=0, num_hidden_layers=2), tmp_path)
    fuse_experts(tmp_path, "model.layers.{}.mlp.experts", ("gate_proj", "up_proj", "down_proj"), 2, 16)
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    assert lm.source.is_fused(0) and lm.source.is_fused(1)


def test_absorbed_and_expanded_attention_agree_under_the_selection(tmp_path):
    """Decode attends in latent space (absorbed); forced on a whole prompt it must still give the reference."""
    ref = save_tiny(v32_config(), tmp_path)
    lm = load_model(tmp_path, device="cpu", dtype="float32")
    ids = prompt(2)
    expected = reference_logits(ref, ids)
    for absorb in (True, False):
        for layer in lm.model.model.layers:
            layer.self_attn.absorb = absorb
        lm.model.setup_cache(PROMPT_LEN)
        assert (lm.model(ids, 0) - expected).abs().max() <= 1e-4, absorb


# --------------------------------------------------------------------------- the cache and dtypes
def test_cache_holds_latent_rope_key_and_indexer_key(tmp_path):
    cfg = v32_config()
    save_tiny(cfg, tmp_path)
    lm = load_model(tmp_path, device="cpu", dtype="float32")
    lm.model.setup_cache(40)
    per_token = cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.index_head_dim  # 32 + 8 + 16; 512 + 64 + 128 at V3.2 sizes
    for layer in lm.model.model.layers:
        assert layer.self_attn.cache.values_per_token == per_token
    assert lm.model.kv_cache_bytes() == cfg.num_hidden_layers * 40 * per_token * 4
    s = json.loads(_inspect_json(tmp_path, "bfloat16"))
    assert s["kv_bytes_per_token"] == cfg.num_hidden_layers * per_token * 2 and s["state_bytes"] == 0


def _inspect_json(path, dtype: str) -> str:
    return cli("inspect", path, "--json", "--dtype", dtype)


def test_indexer_head_weights_stay_float32_in_bfloat16(tmp_path):
    """As transformers keeps them (_keep_in_fp32_modules): they weigh the heads' scores that pick keys."""
    save_tiny(v32_config(), tmp_path)
    lm = load_model(tmp_path, device="cpu", dtype="bfloat16")
    attn = lm.model.model.layers[1].self_attn
    assert attn.indexer.weights_proj.weight.dtype == torch.float32
    assert attn.indexer.wq_b.weight.dtype == torch.bfloat16
    assert lm.model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    lm.model.setup_cache(PROMPT_LEN)
    assert torch.isfinite(lm.model(prompt(), 0)).all()


# --------------------------------------------------------------------------- packs, tiers, look-ahead
def test_int4_pack_tiered_budget_gives_resident_tokens(tmp_path):
    save_tiny(v32_config(first_k_dense_replace=0, num_hidden_layers=2), tmp_path / "ckpt")
    check_pack_tiered_matches_resident(tmp_path / "ckpt", tmp_path, prompt().tolist())


# --------------------------------------------------------------------------- config handling
def test_config_errors_name_the_key():
    cfg = v32_config().to_dict()
    for bad, words in (({"q_lora_rank": None}, "q_lora_rank"),
                       ({"index_head_dim": 4}, "index_head_dim"),
                       ({"mlp_layer_types": ["dense", "sparse"]}, "mlp_layer_types"),
                       ({"mlp_layer_types": ["dense", "moe", "sparse"]}, "mlp_layer_types")):
        with pytest.raises(ConfigError, match=words) as info:
            build_model({**cfg, **bad})
        assert "\n" not in str(info.value)
    model = build_model({**cfg, "mlp_layer_types": None, "first_k_dense_replace": 2})
    assert model.args.moe_layers == [2]
