"""The C kernels (moe_local.formats._cpu) against the reference dequantize + matmul, on every ISA
path this CPU runs; thread counts and expert grouping never change a bit of the result."""

from __future__ import annotations

import platform
import sys

import pytest
import torch
import torch.nn.functional as F

from moe_local.errors import MoeLocalError
from moe_local.experts import ACTIVATIONS, ExpertWeights, combine_experts
from moe_local.formats import kernels_cpu
from moe_local.formats.schemes import PackedWeight, get_scheme

SCHEMES = [
    ("int4", {"group_size": 32}), ("int4", {"group_size": 64}), ("int4", {"group_size": 128}),
    ("nf4", {"group_size": 64}), ("int8", {}), ("int8", {"group_size": 128}),
    ("ternary", {"group_size": 128}), ("ternary-absmean", {"group_size": 64}),
    ("bf16", {}), ("fp16", {}),
]
# odd sizes: rows not a multiple of any tile, in-features not a multiple of the group (or of 16),
# a row narrower than one group
SHAPES = [(37, 200), (64, 256), (33, 50), (130, 1000), (5, 2048)]
BATCHES = [1, 3, 4, 5, 17, 64, 300]  # 1..4: one token block; 300: the GEMM path (>= GEMM_MIN_BATCH)


@pytest.fixture(autouse=True)
def _restore():
    isa, threads = kernels_cpu.isa(), kernels_cpu.threads()
    yield
    if isa != "torch":
        kernels_cpu.set_isa(isa)
    kernels_cpu.set_threads(threads)


def test_extension_is_built_on_x86_64_linux():
    """CI proves the extension builds at install: without it every kernel here silently falls back."""
    if not (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")):
        pytest.skip("the build is asserted on x86-64 Linux")
    assert kernels_cpu._cpu is not None, "moe_local.formats._cpu is not importable: pip install -e . builds it"
    assert "portable" in kernels_cpu.isas() and "avx2" in kernels_cpu.isas()


needs_ext = pytest.mark.skipif(kernels_cpu._cpu is None, reason="C kernels not built")


def packed(name, params, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.05
    scheme = get_scheme(name, **params)
    return PackedWeight(scheme, scheme.quantize(w), shape)


@needs_ext
@pytest.mark.parametrize("isa", kernels_cpu.isas())
@pytest.mark.parametrize("name,params", SCHEMES, ids=[f"{n}-{p.get('group_size')}" for n, p in SCHEMES])
def test_linear_matches_dequantize_then_matmul(isa, name, params):
    kernels_cpu.set_isa(isa)
    for shape in SHAPES:
        pw = packed(name, params, shape)
        ref_w = pw.dequantize()
        for T in BATCHES:
            x = torch.randn(T, shape[1], generator=torch.Generator().manual_seed(T))
            y = pw.linear(x)
            ref = F.linear(x, ref_w)
            assert y.shape == ref.shape and y.dtype == torch.float32
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@needs_ext
def test_bf16_activations_and_leading_dims_keep_their_shape_and_dtype():
    pw = packed("int4", {"group_size": 64}, (48, 128))
    x = torch.randn(2, 3, 128).to(torch.bfloat16)
    y = pw.linear(x)
    assert y.shape == (2, 3, 48) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), F.linear(x.float(), pw.dequantize()), rtol=2e-2, atol=2e-2)


@needs_ext
def test_float_weight_under_fp32_x_goes_through_the_kernels_without_a_copy():
    from moe_local.formats.compute import linear

    w = torch.randn(70, 300).to(torch.bfloat16)
    x = torch.randn(1, 300)
    torch.testing.assert_close(linear(x, w), F.linear(x, w.float()), rtol=1e-5, atol=1e-5)
    assert kernels_cpu.descriptor(w) is not None  # described (views w), never converted


@needs_ext
@pytest.mark.parametrize("T", [1, 5, 40])
def test_thread_counts_give_bitwise_identical_results(T):
    pw = packed("int4", {"group_size": 64}, (515, 640))
    x = torch.randn(T, 640)
    results = []
    for n in (1, 2, 3):
        kernels_cpu.set_threads(n)
        results.append(pw.linear(x))
    assert all(torch.equal(results[0], r) for r in results[1:])


def experts_of(name, params, n=6, hidden=96, inter=80):
    return [ExpertWeights(packed(name, params, (inter, hidden), 3 * e), packed(name, params, (inter, hidden), 3 * e + 1),
                          packed(name, params, (hidden, inter), 3 * e + 2)) for e in range(n)]


def routing(T, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(T)])
    weights = torch.softmax(torch.randn(T, k, generator=g), -1)
    return ids, weights


@needs_ext
@pytest.mark.parametrize("isa", kernels_cpu.isas())
@pytest.mark.parametrize("name,params", [("int4", {"group_size": 32}), ("int8", {}), ("bf16", {}), ("ternary", {})])
@pytest.mark.parametrize("T", [1, 3, 200])  # 200: experts get more than one work item of _cpu.MAX_T tokens
def test_grouped_layer_matches_the_generic_loop(isa, name, params, T):
    kernels_cpu.set_isa(isa)
    experts = experts_of(name, params)
    kernel = kernels_cpu.layer_kernel(experts, "silu")
    assert kernel is not None
    x = torch.randn(T, 96)
    ids, weights = routing(T, 6, 2)
    ref_experts = [ExpertWeights(e.gate.dequantize(), e.up.dequantize(), e.down.dequantize()) for e in experts]
    ref = combine_experts(x, ids, weights, lambda e: ref_experts[e], ACTIVATIONS["silu"])
    torch.testing.assert_close(kernel(x, ids, weights), ref, rtol=1e-5, atol=1e-6)


@needs_ext
def test_grouped_layer_does_not_depend_on_threads_or_on_which_experts_share_a_call():
    """What the cache's invariance rests on: one call, per-expert calls, any thread count: same bits."""
    experts = experts_of("int4", {"group_size": 32}, n=8)
    rows = torch.stack([kernels_cpu.expert_row(e) for e in experts])
    x = torch.randn(4, 96)
    ids, weights = routing(4, 8, 3, seed=1)
    results = []
    for n in (1, 2):
        kernels_cpu.set_threads(n)
        whole = torch.zeros(4, 96)
        kernels_cpu.moe_accumulate(whole, x, ids, weights, rows, None, "silu")
        apart = torch.zeros(4, 96)
        for e in sorted(set(ids.reshape(-1).tolist())):
            kernels_cpu.moe_accumulate(apart, x, ids, weights, rows[e : e + 1], torch.tensor([e]), "silu")
        results += [whole, apart]
    assert all(torch.equal(results[0], r) for r in results[1:])


# the ISAs whose kernels compute a (row, token) by the same operations in any batch (block kernels)
BLOCK_ISAS = [i for i in ("avx2", "avx512") if kernels_cpu._cpu is not None and i in kernels_cpu.isas()]
block_isas = pytest.mark.parametrize("isa", BLOCK_ISAS or [pytest.param("avx2", marks=pytest.mark.skip(
    reason="the block kernels need an AVX2 or AVX-512 CPU"))])


@block_isas
@pytest.mark.parametrize("name,params", [s for s in SCHEMES if not s[0].startswith("ternary")],
                         ids=[f"{n}-{p.get('group_size')}" for n, p in SCHEMES if not n.startswith("ternary")])
def test_a_token_computes_the_same_bits_in_any_batch(isa, name, params):
    """On the block-kernel ISAs a prompt's tokens get exactly what decoding them one at a time
    would get: each (row, token) is computed by the same operations whatever the batch (up to
    GEMM_MIN_BATCH), so a cached prefix and a re-read prompt agree to the bit."""
    kernels_cpu.set_isa(isa)
    for shape in SHAPES:
        pw = packed(name, params, shape)
        x = torch.randn(11, shape[1], generator=torch.Generator().manual_seed(1))
        whole = pw.linear(x)
        for t in range(x.shape[0]):
            assert torch.equal(whole[t], pw.linear(x[t:t + 1])[0]), (shape, t)


@block_isas
def test_grouped_layer_gives_a_prompt_the_bits_of_token_by_token_decoding(isa):
    kernels_cpu.set_isa(isa)
    experts = experts_of("int4", {"group_size": 32}, n=4)
    kernel = kernels_cpu.layer_kernel(experts, "silu")
    x = torch.randn(150, 96)
    ids, weights = routing(150, 4, 2)
    whole = kernel(x, ids, weights)
    for t in range(0, 150, 7):
        assert torch.equal(whole[t], kernel(x[t:t + 1], ids[t:t + 1], weights[t:t + 1])[0]), t


@needs_ext
def test_a_long_prompt_chunk_in_scratch_sized_slices_gives_the_same_bits(monkeypatch):
    experts = experts_of("int4", {"group_size": 32}, n=4)
    kernel = kernels_cpu.layer_kernel(experts, "silu")
    x = torch.randn(90, 96)
    ids, weights = routing(90, 4, 2)
    whole = kernel(x, ids, weights)
    monkeypatch.setattr(kernels_cpu, "MOE_SCRATCH_FLOATS", 2 * (3 * 96 + 4 * 80) * 7)  # 7 tokens a slice
    assert torch.equal(kernel(x, ids, weights), whole)


@needs_ext
def test_batches_beyond_the_grouped_kernel_are_left_to_the_generic_loop():
    kernel = kernels_cpu.layer_kernel(experts_of("int8", {}, n=3), "silu")
    x = torch.randn(kernels_cpu.MAX_BATCH + 1, 96)
    ids, weights = routing(x.shape[0], 3, 2)
    assert kernel(x, ids, weights) is None
    assert kernels_cpu.layer_kernel(experts_of("int8", {}, n=3), "no-such-act") is None


@needs_ext
def test_forcing_an_isa_this_cpu_lacks_or_does_not_know_is_one_clear_error():
    with pytest.raises(MoeLocalError, match="MOE_LOCAL_CPU_ISA must be one of portable, avx2, avx512"):
        kernels_cpu.set_isa("sse9")
    missing = [i for i in kernels_cpu.ISAS if i not in kernels_cpu.isas()]
    for name in missing:
        with pytest.raises(MoeLocalError, match="does not support it"):
            kernels_cpu.set_isa(name)
