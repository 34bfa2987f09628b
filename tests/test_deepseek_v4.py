"""DeepSeek-V4 parity with transformers: sliding / compressed-sparse / heavily-compressed attention with
their own rope bases (YaRN on the compressed ones), the lightning indexer really dropping entries,
the hyper-connection residual, hash-routed and score-routed MoE under sqrtsoftplus / sigmoid /
softmax scoring, the clamped SwiGLU, prefill continued from the cached state, the hub's original
names with FP8 linears and FP4 experts dequantized on load, INT4 packs under a tight tiered budget,
hash-layer experts prefetched exactly, and `inspect` at V4-Flash's real size."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_local.errors import ConfigError
from moe_local.models import build_model
from moe_local.runtime.loader import load_model
pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread on a shared box (conftest)
from tests.family_checks import check_pack_tiered_matches_resident, cli
from tests.tiny import PROMPT_LEN, VOCAB, assert_matches_reference, reference_logits, v4_config


def ids_of(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def save_v4(config, path, seed: int = 0):
    """tests/tiny.save_tiny for V4, with the parameters transformers initialises to constants made to
    count: distinct random experts per token in the hash tables, random sinks, window biases (ape),
    hyper-connection biases and scales, routing biases and norm weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    E, k = config.n_routed_experts, config.num_experts_per_tok
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("tid2eid"):
                t.copy_(torch.stack([torch.randperm(E)[:k] for _ in range(t.shape[0])]))
            elif name.endswith("e_score_correction_bias"):
                t.copy_(torch.rand_like(t) * 0.5)
            elif name.endswith(("sinks", "position_bias", "hc_base", ".base")):
                t.copy_(torch.randn_like(t) * 0.5)
            elif name.endswith(("hc_scale", ".scale")) or (t.is_floating_point() and name.endswith("norm.weight")):
                t.copy_(1.0 + 0.2 * torch.randn_like(t))
            elif t.is_floating_point() and t.dim() >= 2 and "rotary" not in name:
                t.mul_(3.0)  # the default 0.02 init leaves every block near the identity
    model.eval()
    model.save_pretrained(path)
    return model


# --------------------------------------------------------------------------- parity
def test_v4_matches_transformers(tmp_path):
    ref = save_v4(v4_config(), tmp_path)
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    kinds = [layer.attn.o.kind for layer in lm.model.model.layers]
    assert kinds == ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                     "compressed_sparse_attention"]


def _set_config(path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **changes}))


def test_v4_options_match_transformers(tmp_path):
    """The math-changing options in one variant: sigmoid scoring, YaRN on the compressed layers' rope
    with their own bases, 4 streams, an HCA-first schedule with one hash layer, a window of 4, a
    wider indexer, and a swiglu_limit small enough to clamp (shown to change the logits)."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
            "beta_slow": 1}
    cfg = v4_config(scoring_func="sigmoid", rope_parameters=yarn, rope_theta=5000.0, compress_rope_theta=40000.0,
                    hc_mult=4, sliding_window=4, index_topk=3, swiglu_limit=0.3, num_hidden_layers=4,
                    layer_types=["heavily_compressed_attention", "compressed_sparse_attention", "sliding_attention",
                                 "heavily_compressed_attention"], mlp_layer_types=["hash_moe", "moe", "moe", "moe"])
    ref = save_v4(cfg, tmp_path, seed=3)
    assert ref.config.rope_parameters["compress"]["rope_type"] == "yarn"
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    ids = ids_of(PROMPT_LEN)
    lm.model.setup_cache(PROMPT_LEN)
    clamped = lm.model(ids, 0)
    _set_config(tmp_path, swiglu_limit=1e9)
    free = load_model(tmp_path, device="cpu", dtype="float32")
    free.model.setup_cache(PROMPT_LEN)
    assert (free.model(ids, 0) - clamped).abs().max() > 1e-3  # the limit really clamped


def _patch_softmax_scoring(monkeypatch) -> None:
    """transformers' V4 has no softmax scoring (ACT2FN has no "softmax"); the reference inference code
    (DeepSeek-V4-Flash inference/model.py, Gate.forward) scores with softmax over the experts and then
    does NOT renormalise the chosen weights. The oracle's routers get exactly that rule."""
    from transformers.models.deepseek_v4 import modeling_deepseek_v4 as m

    def topk(self, hidden_states):
        flat = hidden_states.reshape(-1, self.hidden_dim)
        logits = torch.nn.functional.linear(flat, self.weight)
        scores = logits.softmax(dim=-1)
        ids = torch.topk(scores + self.e_score_correction_bias, self.top_k, dim=-1, sorted=False).indices
        return logits, scores.gather(1, ids) * self.routed_scaling_factor, ids

    def hashed(self, hidden_states, input_ids):
        flat = hidden_states.reshape(-1, self.hidden_dim)
        logits = torch.nn.functional.linear(flat, self.weight)
        ids = self.tid2eid[input_ids.reshape(-1)].long()
        return logits, logits.softmax(dim=-1).gather(1, ids) * self.routed_scaling_factor, ids

    monkeypatch.setattr(m.DeepseekV4TopKRouter, "forward", topk)
    monkeypatch.setattr(m.DeepseekV4HashRouter, "forward", hashed)


def test_softmax_scoring_follows_the_reference_code(tmp_path, monkeypatch):
    ref = save_v4(v4_config(scoring_func="sqrtsoftplus"), tmp_path, seed=5)
    _patch_softmax_scoring(monkeypatch)
    _set_config(tmp_path, scoring_func="softmax")
    assert_matches_reference(tmp_path, ref, vocab=VOCAB)


# --------------------------------------------------------------------------- the hub's checkpoints
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _pow2_scale(amax: torch.Tensor, top: float) -> torch.Tensor:
    return torch.exp2(torch.ceil(torch.log2(amax.clamp(min=1e-12) / top)))


def quantize_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 codes and one ue8m0 (power of two) scale per block x block tile, as the hub stores linears."""
    r, c = w.shape
    tiles = torch.nn.functional.pad(w, (0, -c % block, 0, -r % block)).unflatten(1, (-1, block)).unflatten(0, (-1, block))
    scale = _pow2_scale(tiles.abs().amax(dim=(1, 3)), 448.0)
    full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:r, :c]
    return (w / full).to(torch.float8_e4m3fn), scale.to(torch.float8_e8m0fnu)


def quantize_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e2m1 codes, two per int8 byte (low nibble first), one ue8m0 scale per 32 inputs: the hub's experts."""
    groups = w.unflatten(1, (-1, 32))
    scale = _pow2_scale(groups.abs().amax(dim=-1), 6.0)
    x = groups / scale[..., None]
    code = (x.abs()[..., None] - E2M1).abs().argmin(dim=-1) + 8 * (x < 0)
    code = code.flatten(1).to(torch.uint8)
    return (code[:, 0::2] | (code[:, 1::2] << 4)).view(torch.int8), scale.to(torch.float8_e8m0fnu)


def _hub_name(name: str) -> str:
    for ours, theirs in (("model.embed_tokens.", "embed."), ("model.norm.", "norm."), ("model.hc_head.hc_", "hc_head_"),
                         ("model.layers.", "layers.")):
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


def test_hub_checkpoint_fp8_fp4_and_original_names(tmp_path):
    """The hub layout of DeepSeek-V4-Flash in miniature: original tensor names (`layers.N.attn.wq_a`,
    `embed`, `hc_head_fn`), the config's legacy keys (compress_ratios listing the MTP layer too,
    num_hash_layers, qk_rope_head_dim, rope_scaling, compress_rate_hca), attention and shared-expert
    linears in FP8 with ue8m0 block scales, routed experts in FP4, an MTP tensor never read. The
    oracle is transformers on the same weights dequantized by transformers' own FP8/FP4 dequantizer."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
            "beta_slow": 1}
    save_v4(v4_config(rope_parameters=yarn, moe_intermediate_size=64), tmp_path / "float", seed=7)
    tensors = load_file(tmp_path / "float" / "model.safetensors")
    dequant = Fp8Dequantize(None)._dequantize_one
    hub, deq = {}, {}
    for name, t in tensors.items():
        kind = None
        if ".ffn.experts." in name:
            kind = quantize_fp4
        elif name.endswith(".weight") and t.dim() == 2 and (".shared_experts." in name or (
                ".attn." in name and ".compressor." not in name and "weights_proj" not in name)):
            kind = quantize_fp8
        if kind is None:
            hub[_hub_name(name)], deq[name] = t, t
            continue
        codes, scale = kind(t)
        hub[_hub_name(name)], hub[_hub_name(name)[: -len(".weight")] + ".scale"] = codes, scale
        deq[name] = dequant(codes, scale, torch.float32)
        assert (deq[name] - t).abs().max() <= t.abs().max() * 0.3  # a real quantization, not garbage
    hub["mtp.0.attn.wq_a.weight"] = torch.zeros(4, 4)
    cfg = json.loads((tmp_path / "float" / "config.json").read_text())
    for d in ("deq", "hub"):
        (tmp_path / d).mkdir()
    (tmp_path / "deq" / "config.json").write_text(json.dumps(cfg))
    save_file(deq, tmp_path / "deq" / "model.safetensors", metadata={"format": "pt"})
    for key in ("layer_types", "mlp_layer_types", "rope_parameters", "compress_rates", "partial_rotary_factor"):
        cfg.pop(key)
    cfg.update(compress_ratios=[0, 4, 128, 4, 0], compress_rate_hca=8, num_hash_layers=2, qk_rope_head_dim=8,
               rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
                             "beta_slow": 1},
               expert_dtype="fp4", quantization_config={"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                                        "weight_block_size": [128, 128]})
    (tmp_path / "hub" / "config.json").write_text(json.dumps(cfg))
    save_file(hub, tmp_path / "hub" / "model.safetensors", metadata={"format": "pt"})

    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "deq", attn_implementation="eager", dtype=torch.float32).eval()
    lm = assert_matches_reference(tmp_path / "hub", ref, vocab=VOCAB)
    assert lm.model.args.layer_types == v4_config().layer_types
    assert lm.model.model.layers[1].attn.wq_a.weight.dtype == torch.float32
    from moe_local.loading.checkpoint import Checkpoint
    from moe_local.models.weights import unread_tensors
    assert unread_tensors(lm.model, Checkpoint(tmp_path / "hub")) == []


# --------------------------------------------------------------------------- the running state
def test_prefill_in_parts_continues_the_compressors(tmp_path):
    """Prompts fed in pieces cut inside windows (CSA 4, HCA 8, sliding 8) give the whole prompt's
    logits: the unfinished windows, the CSA overlap halves and the window keys carry over; a forward
    that does not continue where the state stopped is refused, one from 0 starts afresh."""
    save_v4(v4_config(), tmp_path)
    lm = load_model(tmp_path, device="cpu", dtype="float32")
    ids = ids_of(30, seed=4)
    lm.model.setup_cache(30)
    whole = lm.model(ids, 0)
    assert lm.model.can_resume(30) and not lm.model.can_resume(12)
    parts = torch.cat([lm.model(ids[a:b], a) for a, b in ((0, 5), (5, 6), (6, 13), (13, 30))])
    assert (parts - whole).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="cannot continue"):
        lm.model(ids[:3], 12)
    assert (lm.model(ids, 0) - whole).abs().max() <= 1e-6


def test_cache_holds_the_window_and_the_compressed_entries(tmp_path):
    cfg = v4_config()
    save_v4(cfg, tmp_path)
    lm = load_model(tmp_path, device="cpu", dtype="float32")
    lm.model.setup_cache(64)
    D, Di, w = cfg.head_dim, cfg.index_head_dim, cfg.sliding_window - 1
    want = [w * D, w * D + 64 // 4 * (D + Di), w * D + 64 // 8 * D, w * D + 64 // 4 * (D + Di)]
    assert [layer.attn.cache.nbytes() // 4 for layer in lm.model.model.layers] == want
    s = json.loads(cli("inspect", tmp_path, "--json", "--dtype", "bfloat16"))
    # per token: D values every 4 tokens (+ Di for the indexer) in two CSA layers, D every 8 in the HCA one
    assert s["kv_bytes_per_token"] == int(2 * (2 * (D + Di) / 4 + D / 8))
    assert s["state_bytes"] == 4 * w * D * 2


# --------------------------------------------------------------------------- packs, tiers, look-ahead
def test_int4_pack_tiered_budget_gives_resident_tokens(tmp_path):
    save_v4(v4_config(), tmp_path / "ckpt")
    check_pack_tiered_matches_resident(tmp_path / "ckpt", tmp_path, ids_of(PROMPT_LEN).tolist())


@pytest.mark.parametrize("slots", [2, 3, 4, 5, 6, 7])
def test_hash_layer_experts_are_resident_before_use(tmp_path, slots):
    """Hash layers' experts follow from the token ids, so the look-ahead names them exactly and the
    cache loads them at the layer's attention input, when the layer before has released its slots:
    at any compute-tier budget from one token's working set (top-k = 2 slots) up, every decode use
    of a hash layer's expert is a hit. The device tier is the CPU-simulated one (synchronous copies
    from RAM, which holds every expert after a first identical run), so "arrived" is deterministic."""
    from moe_local.cache.options import as_bytes_source
    from moe_local.cache.tiered import TieredExperts

    cfg = v4_config(mlp_layer_types=["hash_moe", "hash_moe", "moe", "hash_moe"])
    save_v4(cfg, tmp_path)
    lm = load_model(tmp_path, device="cpu", dtype="float32")
    model, a = lm.model, lm.model.args
    cache = TieredExperts(as_bytes_source(lm.source), top_k=a.num_experts_per_tok,
                          host_slots=len(a.moe_layers) * a.num_experts, gpu_slots=slots, act=a.expert_act,
                          device="cpu", dtype=torch.float32, predictor=model.lookahead(depth=1), two_tier=True)
    model.experts.provider = cache
    hash_layers = [0, 1, 3]
    assert cache.predictor.sources() == [(0, "attn"), (1, "attn"), (3, "attn")]
    prompt = ids_of(6, seed=9)
    runs = []
    for _ in range(2):  # the second, identical run finds every expert in RAM
        model.setup_cache(32)
        tok = int(model(prompt, 0, last_only=True)[-1].argmax())
        before = {l: (c.uses, c.hits) for l, c in cache.stats.layers.items()}
        out = []
        for pos in range(6, 20):
            out.append(tok)
            tok = int(model(torch.tensor([tok]), pos)[-1].argmax())
        cache.drain()
        runs.append(out)
    cache.close()
    assert runs[0] == runs[1]
    for layer in hash_layers:
        c = cache.stats.layers[layer]
        uses, hits = c.uses - before[layer][0], c.hits - before[layer][1]
        assert uses == 14 * a.num_experts_per_tok and hits == uses, (layer, uses, hits)


def test_hash_routers_are_predicted_exactly_without_spares(tmp_path):
    save_v4(v4_config(), tmp_path)
    model = load_model(tmp_path, device="cpu", dtype="float32").model
    ids = ids_of(5)
    model.setup_cache(5)
    model(ids, 0)
    la = model.lookahead(depth=2, extra=3)
    x = torch.randn(5, 64)
    (d1, t1, ranked1), (d2, t2, ranked2) = la.predict(0, x, "attn")
    table = model.model.layers[0].ffn.gate.tid2eid
    assert (t1, t2) == (0, 1) and sorted(ranked1) == sorted(set(table[ids].flatten().tolist()))
    assert sorted(ranked2) == sorted(set(model.model.layers[1].ffn.gate.tid2eid[ids].flatten().tolist()))
    (_, t3, ranked3), _ = la.predict(1, x, "mlp")
    (_, _, plain), _ = model.lookahead(depth=2).predict(1, x, "mlp")
    assert t3 == 2 and len(ranked3) > len(plain)  # a learned router's prediction gets its spares


# --------------------------------------------------------------------------- inspect and config
V4_FLASH = {  # DeepSeek-V4-Flash's config.json (hub deepseek-ai/DeepSeek-V4-Flash), the keys sizes depend on
    "model_type": "deepseek_v4", "vocab_size": 129280, "hidden_size": 4096, "moe_intermediate_size": 2048,
    "num_hidden_layers": 43, "num_attention_heads": 64, "num_key_value_heads": 1, "head_dim": 512, "q_lora_rank": 1024,
    "qk_rope_head_dim": 64, "n_routed_experts": 256, "num_experts_per_tok": 6, "n_shared_experts": 1,
    "num_hash_layers": 3, "o_groups": 8, "o_lora_rank": 1024, "index_n_heads": 64, "index_head_dim": 128,
    "index_topk": 512, "sliding_window": 128, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6,
    "scoring_func": "sqrtsoftplus", "routed_scaling_factor": 1.5, "swiglu_limit": 10.0, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 1048576, "rope_theta": 10000, "compress_rope_theta": 160000,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32,
                     "beta_slow": 1},
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0], "num_nextn_predict_layers": 1, "tie_word_embeddings": False,
    "expert_dtype": "fp4", "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                                   "weight_block_size": [128, 128]},
}


def test_inspect_deepseek_v4_flash_real_size(tmp_path):
    """The model card: 284B parameters, 13B activated (huggingface.co/deepseek-ai/DeepSeek-V4-Flash).
    Our count from the config: 284.33B total; 13.80B active per token, 13.27B of them beyond the
    input embedding (a lookup, not compute), which is the model card's 13B."""
    (tmp_path / "config.json").write_text(json.dumps(V4_FLASH))
    s = json.loads(cli("inspect", tmp_path, "--json"))
    embed = 129280 * 4096
    assert s["family"] == "deepseek_v4" and s["layers"] == s["moe_layers"] == 43
    assert abs(s["total_params"] / 284e9 - 1) < 0.005, s["total_params"]
    assert 13.0e9 <= s["active_params"] - embed < 13.5e9, s["active_params"]


def test_config_errors_name_the_key():
    cfg = json.loads(v4_config().to_json_string())
    for bad, words in (({"num_key_value_heads": 2}, "num_key_value_heads"),
                       ({"scoring_func": "relu"}, "scoring_func"),
                       ({"layer_types": ["sliding_attention"] * 3}, "layer_types"),
                       ({"layer_types": None, "compress_ratios": [0, 4, 64, 4]}, "compress_ratios"),
                       ({"mlp_layer_types": ["hash_moe", "dense", "moe", "moe"]}, "mlp_layer_types"),
                       ({"o_groups": 3}, "o_groups"),
                       ({"n_shared_experts": 2}, "n_shared_experts")):
        with pytest.raises(ConfigError, match=words) as info:
            build_model({**cfg, **bad})
        assert "\n" not in str(info.value)
    model = build_model({**cfg, "mlp_layer_types": None, "num_hash_layers": 1})
    assert [l for l in range(4) if model.args.is_hash_layer(l)] == [0]


def test_bfloat16_run_keeps_the_float32_parameters(tmp_path):
    """As transformers keeps them (_keep_in_fp32_modules_strict): the hyper-connection maps, sinks,
    window biases, routing bias and norms; the hash table stays an integer table."""
    save_v4(v4_config(), tmp_path)
    lm = load_model(tmp_path, device="cpu", dtype="bfloat16")
    layer = lm.model.model.layers[1]
    for p in (layer.hc_attn_fn, layer.attn.attn_sink, layer.attn.compressor.ape, layer.ffn_norm.weight,
              layer.attn.indexer.compressor.norm.weight, lm.model.model.layers[2].ffn.gate.bias):
        assert p.dtype == torch.float32
    assert layer.attn.wq_a.weight.dtype == torch.bfloat16
    assert lm.model.model.layers[0].ffn.gate.tid2eid.dtype == torch.int64
    lm.model.setup_cache(PROMPT_LEN)
    assert torch.isfinite(lm.model(ids_of(PROMPT_LEN), 0)).all()


def test_grouped_output_of_a_packed_and_a_bfloat16_weight(tmp_path):
    """`wo_a` may be held packed (a pack's --dense int8) or at its bf16 storage in a float32 run; the
    grouped output projection gives what the float32 weight gives for the same values."""
    from moe_local.formats.schemes import PackedWeight, get_scheme

    save_v4(v4_config(), tmp_path)
    attn = load_model(tmp_path, device="cpu", dtype="float32").model.model.layers[1].attn
    x = torch.randn(3, 2, 64, generator=torch.Generator().manual_seed(0))
    w = attn.wo_a.weight.detach().clone()
    scheme = get_scheme("int8")
    packed = PackedWeight(scheme, scheme.quantize(w), tuple(w.shape))
    for held, exact in ((packed, packed.dequantize()), (w.to(torch.bfloat16), w.to(torch.bfloat16).float())):
        attn.wo_a.weight = torch.nn.Parameter(exact, requires_grad=False)
        want = attn._grouped_out(x)
        del attn.wo_a.weight
        attn.wo_a.weight = held
        assert (attn._grouped_out(x) - want).abs().max() <= 1e-4 * want.abs().max()
        del attn.wo_a.weight
