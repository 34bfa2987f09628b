"""THE invariant of the cache: greedy tokens and logits are bit-for-bit identical (torch.equal) for
every budget, policy, prefetch setting and miss mode on the same device type, against
ResidentExperts over the same pack. CPU grids over a tiny Mixtral pack and the shared trained
DeepSeek-V3-architecture model; the same on a GPU when one is present (marked `gpu`)."""

from __future__ import annotations

import itertools

import pytest
import torch

from moe_local.cache.options import CacheOptions, provider_factory
from moe_local.cache.simulate import future_from_trace
from tests.cache_helpers import eval_ids, make_deepseek_pack, run, tier, tiered_factory

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mixtral(pack):
    root = pack.parent
    ids = torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(11))
    logits, tokens, _ = run(pack, ids)  # ResidentExperts over the same pack
    trace = root / "trace.jsonl"
    run(pack, ids, tiered_factory(slots=7, depth=1, trace=trace))
    return pack, ids, logits, tokens, future_from_trace(trace)


POLICIES = ("lru", "lfu-aging", "arc", "belady")
PREFETCH = ((0, 0), (1, 0), (2, 2))
MISS = ("transfer", "cpu", "auto")


@pytest.mark.parametrize("slots", [2, 3, 5, 24])  # 2 = top-k (every prefill layer streams); 24 = all experts
def test_mixtral_pack_grid_is_bit_identical(mixtral, slots):
    pack, ids, ref_logits, ref_tokens, future = mixtral
    for i, (policy, (depth, extra)) in enumerate(itertools.product(POLICIES, PREFETCH)):
        miss = MISS[i % len(MISS)]
        factory = tiered_factory(slots, policy, depth, extra, future=future if policy == "belady" else None,
                                 miss=miss)
        logits, tokens, lm = run(pack, ids, factory)
        where = f"slots={slots} policy={policy} depth={depth} extra={extra} miss={miss}"
        assert torch.equal(logits, ref_logits), where
        assert tokens == ref_tokens, where
        assert lm.provider.report()["uses"] > 0


@pytest.mark.parametrize("gpu_slots,host_slots", [(2, 2), (2, 6), (5, 3), (24, 24)])
def test_mixtral_two_tier_grid_is_bit_identical(mixtral, gpu_slots, host_slots):
    """The GPU path's bookkeeping (device slots fed from RAM slots, `--miss cpu`) on the simulated
    device tier: a second CPU slab with synchronous copies, so it is exercised on CPU-only CI."""
    pack, ids, ref_logits, ref_tokens, future = mixtral
    for i, (policy, (depth, extra)) in enumerate(itertools.product(("lru", "arc", "belady"), PREFETCH)):
        miss = ("transfer", "cpu")[i % 2]
        factory = tiered_factory(host_slots, policy, depth, extra, future=future if policy == "belady" else None,
                                 miss=miss, gpu_slots=gpu_slots)
        logits, tokens, lm = run(pack, ids, factory)
        where = f"gpu={gpu_slots} ram={host_slots} policy={policy} depth={depth} extra={extra} miss={miss}"
        assert torch.equal(logits, ref_logits), where
        assert tokens == ref_tokens, where
        c = lm.provider.report()
        assert c["tiers"]["gpu"]["capacity"] == gpu_slots and c["bytes"]["ram_to_gpu"] > 0, where
        if miss == "transfer":
            assert c["cpu_computed"] == 0, where
        elif gpu_slots <= 5 and depth == 0:
            # Small device tiers without prefetch must miss during decode: those experts ran on the CPU.
            # (With prefetch, whether a miss happens depends on transfer timing.)
            assert c["cpu_computed"] > 0, where
        assert not tier(lm.provider, "ram").pins and not tier(lm.provider, "gpu").pins, where


@pytest.mark.parametrize("ram", ["700KiB", "1MiB", "64MiB"])
def test_mixtral_byte_budgets_through_cache_options(mixtral, ram):
    pack, ids, ref_logits, ref_tokens, _ = mixtral
    logits, tokens, lm = run(pack, ids, provider_factory(CacheOptions(ram=ram, policy="arc", prefetch_depth=1)))
    assert torch.equal(logits, ref_logits) and tokens == ref_tokens
    assert lm.provider.plan.host_slots == tier(lm.provider).capacity


def test_mixtral_checkpoint_without_pack_runs_through_the_adapter(mixtral):
    """A plain HF checkpoint is paged too (experts serialised on the fly): same result as resident."""
    pack, ids, _, _, _ = mixtral
    ckpt = pack.parent / "ckpt"
    ref_logits, ref_tokens, _ = run(ckpt, ids)
    logits, tokens, _ = run(ckpt, ids, provider_factory(CacheOptions(ram="1MiB", prefetch_depth=2)))
    assert torch.equal(logits, ref_logits) and tokens == ref_tokens


# ----------------------------------------------------------------------------- the shared trained model
@pytest.fixture(scope="module")
def deepseek(shared_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("inv-deepseek")
    pack = make_deepseek_pack(shared_model, root)
    ids = eval_ids(shared_model, 24)
    logits, tokens, _ = run(pack, ids, new=8)
    trace = root / "trace.jsonl"
    run(pack, ids, tiered_factory(slots=48, depth=1, trace=trace), new=8)
    return pack, ids, logits, tokens, future_from_trace(trace)


@pytest.mark.parametrize("slots", [6, 40, 384])  # 6 = top-k; 384 = all 6 x 64 routed experts
def test_deepseek_pack_grid_is_bit_identical(deepseek, slots):
    pack, ids, ref_logits, ref_tokens, future = deepseek
    for policy, (depth, extra) in itertools.product(("lru", "arc", "belady"), ((0, 0), (2, 2))):
        factory = tiered_factory(slots, policy, depth, extra, future=future if policy == "belady" else None)
        logits, tokens, lm = run(pack, ids, factory, new=8)
        where = f"slots={slots} policy={policy} depth={depth} extra={extra}"
        assert torch.equal(logits, ref_logits), where
        assert tokens == ref_tokens, where


# ----------------------------------------------------------------------------- GPU (not run on CPU-only CI)
@pytest.mark.gpu
@pytest.mark.parametrize("slots", [2, 5, 24])
def test_gpu_grid_is_bit_identical(mixtral, slots):
    pack, ids, _, _, future = mixtral
    ref_logits, ref_tokens, _ = run(pack, ids, device="cuda", dtype="bfloat16")
    for policy, (depth, extra) in itertools.product(POLICIES, PREFETCH):
        factory = tiered_factory(8, policy, depth, extra, future=future if policy == "belady" else None,
                                 gpu_slots=slots)
        logits, tokens, lm = run(pack, ids, factory, device="cuda", dtype="bfloat16")
        assert torch.equal(logits, ref_logits) and tokens == ref_tokens, (slots, policy, depth)
        assert lm.provider.report()["tiers"]["gpu"]["capacity"] == slots


def device_peak_since(free0: int, reserved0: int) -> int:
    """Device memory the run took at its peak, as the driver sees it: the caching allocator's peak
    reservation (fragmentation included) + everything outside the allocator that grew meanwhile
    (cuBLAS/Triton workspaces, CUDA context growth), from torch.cuda.mem_get_info."""
    torch.cuda.synchronize()
    free1, _ = torch.cuda.mem_get_info()
    outside = (free0 - free1) - (torch.cuda.memory_reserved() - reserved0)
    return torch.cuda.max_memory_reserved() - reserved0 + max(0, outside)


def small_gpu_budget(pack, extra_slots: int) -> int:
    """inspect's minimum --gpu-mem for this pack in bf16 + `extra_slots` expert slots: misses must happen."""
    from moe_local.runtime.inspect import summarize

    s = summarize(pack, "bfloat16")
    return s.memory_min_gpu + extra_slots * (-(-s.bytes_per_expert // 4096) * 4096)


@pytest.mark.gpu
def test_gpu_budget_is_a_hard_limit(mixtral):
    pack, ids, _, _, _ = mixtral
    torch.cuda.init()
    torch.empty(1, device="cuda")  # the CUDA context exists before the baseline
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    free0, reserved0 = torch.cuda.mem_get_info()[0], torch.cuda.memory_reserved()
    budget = small_gpu_budget(pack, 4)
    opts = CacheOptions(gpu_mem=budget, ram="64MiB", prefetch_depth=2, prefetch_extra=2, context=64)
    logits, tokens, lm = run(pack, ids, provider_factory(opts), device="cuda", dtype="bfloat16")
    peak = device_peak_since(free0, reserved0)
    assert peak <= budget, f"device peak {peak / 2**20:.1f} MiB > --gpu-mem {budget / 2**20:.1f} MiB"
    assert lm.provider.plan.gpu_slots >= 2


@pytest.mark.gpu
def test_gpu_cpu_miss_mode_matches_to_float_tolerance(mixtral):
    """--miss cpu computes misses on the CPU: a different device, so equal only to float tolerance.
    The budget holds one layer's top-k + 1 experts on the GPU, so misses (and CPU computes) happen."""
    pack, ids, _, _, _ = mixtral
    ref_logits, ref_tokens, _ = run(pack, ids, device="cuda", dtype="float32")
    from moe_local.runtime.inspect import summarize

    s = summarize(pack, "float32")
    budget = s.memory_min_gpu + (-(-s.bytes_per_expert // 4096) * 4096)
    logits, tokens, lm = run(pack, ids, provider_factory(CacheOptions(gpu_mem=budget, ram="64MiB", miss="cpu",
                                                                      context=64)), device="cuda", dtype="float32")
    assert torch.allclose(logits, ref_logits, atol=1e-3) and tokens == ref_tokens
    report = lm.provider.report()
    assert report["tiers"]["gpu"]["misses"] > 0 and report["cpu_computed"] > 0, report


@pytest.mark.parametrize("ram", ["16MiB", "64MiB"])  # 16 MiB: weights + KV cache (14 MiB) + ~20 slots
def test_deepseek_bf16_checkpoint_tiered_matches_resident(shared_model, ram):
    """The shared model's own bf16 checkpoint (no pack) paged through RAM slots and computed at
    float32 gives exactly the resident result: slot weights converted for the kernels must live
    until the layer's one grouped call has read them."""
    ids = eval_ids(shared_model, 24)
    ref_logits, ref_tokens, _ = run(shared_model, ids, new=8)
    logits, tokens, _ = run(shared_model, ids, provider_factory(CacheOptions(ram=ram, prefetch_depth=1)), new=8)
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, ref_logits) and tokens == ref_tokens
