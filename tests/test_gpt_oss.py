"""gpt-oss parity with transformers: attention sinks, alternating sliding/full attention, YaRN,
attention biases, the biased router (softmax over the top-k logits), expert biases and the clamped
SwiGLU on interleaved gate/up rows; the hub's MXFP4 expert layout read natively (transformers'
own MXFP4 dequantizer is the reference) and kept bit for bit by `quantize --scheme mxfp4`; packs
carry the expert biases; tiered == resident; `inspect` at the real gpt-oss-20b / 120b sizes."""

from __future__ import annotations

import json

import pytest
import torch

from moe_local.experts import ClampedSwiGLU
from moe_local.formats.pack import Pack
from moe_local.formats.schemes import PackedWeight, get_scheme
from moe_local.runtime.inspect import summarize
from tests.family_checks import check_pack_tiered_matches_resident, cli
from tests.tiny import VOCAB, assert_matches_reference, gpt_oss_config, save_tiny, to_mxfp4_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread on a shared box (conftest)


def mxfp4_reference(path):
    """transformers' GptOss loaded from an MXFP4 checkpoint, dequantized by its integrations/mxfp4.py
    (on a CPU without its kernels that is what transformers does; float32 here)."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                                quantization_config=Mxfp4Config(dequantize=True)).eval()


# --------------------------------------------------------------------------- parity
def test_gpt_oss_matches_transformers(tmp_path):
    ref = save_tiny(gpt_oss_config(), tmp_path)
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    a = lm.model.args
    assert [layer.mixer.o.sliding_window for layer in lm.model.model.layers] == [5, None, 5]
    assert a.expert_act == ClampedSwiGLU(1.702, 7.0) and lm.model.args.rope_config().kind == "yarn"
    w = lm.source.load(0, 3)
    assert all(b is not None and b.abs().sum() > 0 for b in w.biases)  # biases really are read


def test_gpt_oss_options_match_transformers(tmp_path):
    """The options that change the math: a SwiGLU limit that clamps most gate/up values and another
    alpha, no attention biases, a layer_types schedule other than the default alternation."""
    cfg = gpt_oss_config(swiglu_limit=0.1, swiglu_alpha=1.0, attention_bias=False, sliding_window=3,
                         layer_types=["full_attention", "sliding_attention", "sliding_attention"])
    ref = save_tiny(cfg, tmp_path)
    lm = assert_matches_reference(tmp_path, ref, vocab=VOCAB)
    layers = lm.model.model.layers
    assert [layer.mixer.o.sliding_window for layer in layers] == [None, 3, 3]
    assert layers[0].mixer.q_proj.bias is None and lm.model.args.expert_act == ClampedSwiGLU(1.0, 0.1)


@pytest.mark.parametrize("bf16", [False, True])
def test_gpt_oss_mxfp4_hub_layout_matches_transformers(tmp_path, bf16):
    """Experts as `*_blocks` + `*_scales` (quantization_config mxfp4): our model keeps the codes
    packed (mxfp4 PackedWeight, never dequantized to a stored float copy) and matches transformers'
    dequantized model; also with every other tensor in bfloat16 as on the hub, run in float32 (the
    bf16 matrices then stay bf16 in our model, the biases and sinks are cast)."""
    save_tiny(gpt_oss_config(), tmp_path / "float")
    to_mxfp4_checkpoint(tmp_path / "float", tmp_path / "mxfp4", bf16=bf16)
    lm = assert_matches_reference(tmp_path / "mxfp4", mxfp4_reference(tmp_path / "mxfp4"), vocab=VOCAB)
    w = lm.source.load(1, 5)
    assert all(isinstance(p, PackedWeight) and p.scheme.name == "mxfp4" for p in (w.gate, w.up, w.down))
    assert lm.source.is_mxfp4(1) and w.gate.packed["codes"].dtype == torch.uint8


# --------------------------------------------------------------------------- mxfp4 scheme
def test_mxfp4_codes_are_the_hub_bytes_and_dequantize_like_transformers():
    """Our dequantize of (codes, scales) equals transformers' convert_moe_packed_tensors on the same
    bytes (its LUT, nibble order and ldexp), and quantizing a dequantized weight gives the bytes back."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    scheme = get_scheme("mxfp4")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=g) * torch.logspace(-4, 2, 48)[:, None]
    packed = scheme.quantize(w)
    assert packed["codes"].shape == (48, 48) and packed["scales"].shape == (48, 3)
    theirs = convert_moe_packed_tensors(packed["codes"].reshape(1, 48, 3, 16), packed["scales"][None],
                                        dtype=torch.float32)[0].t()
    ours = scheme.dequantize(packed, (48, 96))
    assert torch.equal(ours, theirs) and torch.equal(scheme._expand(packed, (48, 96)), ours)
    again = scheme.quantize(ours)
    assert all(torch.equal(again[k], packed[k]) for k in packed)
    x = torch.randn(5, 96, generator=g)
    assert torch.equal(PackedWeight(scheme, packed, (48, 96)).linear(x), x @ ours.t())


def test_mxfp4_quantize_follows_the_mx_rule():
    """Shared exponent floor(log2(absmax)) - 2, nearest E2M1 value, clamp at 6: a block holding
    exactly representable values round-trips exactly, an all-zero block stays zero."""
    scheme = get_scheme("mxfp4")
    row = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0] * 4) * 2.0**-3
    w = torch.stack([row, -row, torch.zeros(32)])
    packed = scheme.quantize(w)
    assert packed["scales"][:2, 0].tolist() == [127 - 3, 127 - 3] and packed["scales"][2, 0] == 0
    assert torch.equal(scheme.dequantize(packed, (3, 32)), w)


# --------------------------------------------------------------------------- packs and the cache
def test_quantize_mxfp4_keeps_the_checkpoint_codes_and_the_biases(tmp_path):
    save_tiny(gpt_oss_config(), tmp_path / "float")
    to_mxfp4_checkpoint(tmp_path / "float", tmp_path / "hub")
    cli("quantize", tmp_path / "hub", tmp_path / "pack", "--scheme", "mxfp4")
    from moe_local.runtime.loader import load_model

    cli("quantize", tmp_path / "float", tmp_path / "from-float", "--scheme", "mxfp4")
    src = load_model(tmp_path / "hub", device="cpu", dtype="float32").source
    pack, from_float = Pack(tmp_path / "pack"), Pack(tmp_path / "from-float")
    for layer, e in ((0, 0), (2, 7)):
        a, b, c = src.load(layer, e), pack.load(layer, e), from_float.load(layer, e)
        for p in ("gate", "up", "down"):
            for part in ("codes", "scales"):
                # kept from the hub bytes, and the same bytes quantize makes from the float experts
                assert torch.equal(getattr(a, p).packed[part], getattr(b, p).packed[part]), (layer, e, p, part)
                assert torch.equal(getattr(c, p).packed[part], getattr(b, p).packed[part]), (layer, e, p, part)
        assert all(torch.equal(x.float(), y) for x, y in zip(a.biases, b.biases))
    assert json.loads((tmp_path / "pack" / "moe-pack.json").read_text())["minor_version"] >= 1
    # the pack runs exactly like the checkpoint it came from
    prompt = ",".join(str(i) for i in range(3, 19))
    run = ("--prompt-ids", prompt, "-n", 12, "--temperature", "0", "--ignore-eos", "--json")
    assert json.loads(cli("generate", tmp_path / "pack", *run))["tokens"] == \
        json.loads(cli("generate", tmp_path / "hub", *run))["tokens"]


@pytest.mark.parametrize("layout", ["float", "mxfp4"])
def test_gpt_oss_pack_tiered_matches_resident(tmp_path, layout):
    save_tiny(gpt_oss_config(num_local_experts=16, num_hidden_layers=4), tmp_path / "float")
    src = tmp_path / "float"
    if layout == "mxfp4":
        to_mxfp4_checkpoint(src, tmp_path / "mxfp4")
        src = tmp_path / "mxfp4"
    check_pack_tiered_matches_resident(src, tmp_path, list(range(5, 25)))
    # the cache also pages a checkpoint's experts (no pack): biases and MXFP4 parts travel too
    run = ("--prompt-ids", "5,9,13,17,21,25,29,33", "-n", 10, "--temperature", "0", "--ignore-eos", "--json")
    tiered = json.loads(cli("generate", src, *run, "--experts", "tiered", "--ram", "2MiB", "--policy", "lru"))
    assert tiered["tokens"] == json.loads(cli("generate", src, *run, "--experts", "resident"))["tokens"]


def test_bf16_logits_do_not_depend_on_the_cache(tmp_path):
    """bfloat16, an MXFP4 pack with float32 expert biases, 6 of 24 experts cached (every expert paged
    in and out of the slots): logits bit-identical to all experts resident, and the same tokens."""
    from tests.cache_helpers import run, tiered_factory

    save_tiny(gpt_oss_config(), tmp_path / "float")
    to_mxfp4_checkpoint(tmp_path / "float", tmp_path / "hub")
    cli("quantize", tmp_path / "hub", tmp_path / "pack", "--scheme", "mxfp4")
    ids = torch.randint(0, VOCAB, (16,), generator=torch.Generator().manual_seed(3))
    resident = run(tmp_path / "pack", ids, dtype="bfloat16", new=8)
    tiered = run(tmp_path / "pack", ids, provider=tiered_factory(6), dtype="bfloat16", new=8)
    assert torch.equal(resident[0], tiered[0]) and resident[1] == tiered[1]


@pytest.mark.gpu
def test_gpt_oss_mxfp4_on_cuda_matches_the_cpu(tmp_path):
    """The torch MXFP4 kernel and the sink attention on a GPU (float32): the hub-layout checkpoint's
    logits match the CPU run's, and so do its greedy tokens."""
    from moe_local.runtime.loader import load_model

    save_tiny(gpt_oss_config(), tmp_path / "float")
    to_mxfp4_checkpoint(tmp_path / "float", tmp_path / "hub")
    ids = torch.randint(0, VOCAB, (16,), generator=torch.Generator().manual_seed(1))
    logits, tokens = [], []
    for device in ("cpu", "cuda"):
        model = load_model(tmp_path / "hub", device=device, dtype="float32").model
        model.setup_cache(24)
        out = model(ids.to(device), 0)
        logits.append(out.cpu())
        seq = [int(out[-1].argmax())]
        for pos in range(16, 23):
            seq.append(int(model(torch.tensor([seq[-1]], device=device), pos)[-1].argmax()))
        tokens.append(seq)
    assert (logits[0] - logits[1]).abs().max() < 1e-3 and tokens[0] == tokens[1]


# --------------------------------------------------------------------------- real sizes
GPT_OSS_120B = {  # openai/gpt-oss-120b config.json (numbers as published; layer_types elided: the default)
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
    "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
    "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
    "num_experts_per_tok": 4, "num_hidden_layers": 36, "num_key_value_heads": 8, "num_local_experts": 128,
    "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "use_cache": True, "vocab_size": 201088,
}
GPT_OSS_20B = {**GPT_OSS_120B, "num_hidden_layers": 24, "num_local_experts": 32, "router_aux_loss_coef": 0.9}


@pytest.mark.parametrize("config, total, active", [(GPT_OSS_120B, 116.83e9, 5.13e9), (GPT_OSS_20B, 20.91e9, 3.61e9)])
def test_inspect_gives_the_published_gpt_oss_sizes(tmp_path, config, total, active):
    """OpenAI's model card: 116.83B / 5.13B active (120b), 20.91B / 3.61B (20b). Its active figure
    counts the unembedding but not the embedding lookup, so we compare active minus the embedding."""
    (tmp_path / "config.json").write_text(json.dumps(config))
    s = summarize(tmp_path)
    embedding = config["vocab_size"] * config["hidden_size"]
    assert abs(s.total_params - total) < 0.005e9, s.total_params
    assert abs(s.active_params - embedding - active) < 0.005e9, s.active_params
    assert (s.moe_layers, s.experts_per_layer, s.top_k) == (config["num_hidden_layers"], config["num_local_experts"], 4)


def test_inspect_sizes_an_mxfp4_checkpoint_by_its_stored_bytes(tmp_path):
    """An MXFP4 expert is 4.25 bits per weight on disk and stays so when run: bytes per expert are
    the blocks + scales (+ biases) of one expert, not its parameters at some float width."""
    save_tiny(gpt_oss_config(), tmp_path / "float")
    to_mxfp4_checkpoint(tmp_path / "float", tmp_path / "hub")
    s = summarize(tmp_path / "hub", "float32")
    H, I = 64, 96
    assert s.checkpoint_dtype == "MXFP4 experts"
    assert s.bytes_per_expert == (2 * I * H + H * I) * 17 // 32 + (2 * I + H) * 4  # codes + e8m0 scales, f32 biases
    assert s.total_params == summarize(tmp_path / "float", "float32").total_params
