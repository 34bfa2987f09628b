"""The tiered expert cache on CPU: sizes and budgets, slots, hand-counted hits, streaming prefill,
prefetch accounting, traces, reports, and corrupt packs (a clear error, never wrong tokens)."""

from __future__ import annotations

import json

import pytest
import torch

from moe_local.cache.budget import plan_budget
from moe_local.cache.options import CacheOptions, provider_factory
from moe_local.cache.simulate import future_from_trace
from moe_local.cache.tiered import TieredExperts
from moe_local.cache.tiers import SlotTable
from moe_local.errors import MoeLocalError
from moe_local.experts import ResidentExperts
from moe_local.formats.pack import Pack
from moe_local.runtime.loader import load_model
from moe_local.units import GiB, MiB, parse_size
from tests.cache_helpers import eval_ids, make_deepseek_pack, make_mixtral_pack, run, tier, tiered_factory

pytestmark = pytest.mark.usefixtures("one_thread")

H = 64  # hidden size of the tiny Mixtral


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(3))


def provider(pack_dir, slots, **kw) -> tuple[TieredExperts, ResidentExperts]:
    src = Pack(pack_dir)
    return TieredExperts(src, top_k=2, host_slots=slots, **kw), ResidentExperts(src)


def call(p, layer, expert_ids, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(expert_ids)
    x = torch.randn(ids.shape[0], H, generator=g)
    w = torch.rand(ids.shape, generator=g)
    return p.forward(layer, x, ids, w), (layer, x, ids, w)


# ----------------------------------------------------------------------------- sizes and budgets
@pytest.mark.parametrize("text,value", [("6GiB", 6 * GiB), ("512 MiB", 512 * MiB), ("1.5G", 1_500_000_000),
                                         ("4096", 4096), ("2kib", 2048), (None, None), ("auto", None)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["lots", "6 GiBs", "-1G", "1e9"])
def test_parse_size_rejects_garbage_with_the_flag_name(text):
    with pytest.raises(MoeLocalError, match="--ram"):
        parse_size(text, "--ram")


def test_gpu_budget_too_small_states_the_minimum_and_the_minimum_works():
    kw = dict(slot_bytes=10 * MiB, num_keys=100, top_k=2, resident_bytes=300 * MiB, kv_bytes=50 * MiB,
              expanded_bytes=1 * MiB, ram_budget=1 * GiB, cuda=True)
    # fixed: 300 + 50 + workspace (256 + 2 x 1 expanded + 128 cuBLAS/Triton) + 2 x 10 slots = 756 MiB,
    # which must be 95% of the budget (5% fragmentation reserve): 795.79 MiB, rounded up as printed
    with pytest.raises(MoeLocalError, match=r"--gpu-mem .* too small.*\(0 tokens\).*at least 795\.79 MiB"):
        plan_budget(gpu_budget=600 * MiB, **kw)
    shown = parse_size("795.79MiB")
    plan = plan_budget(gpu_budget=shown, **kw)  # the figure the message printed is accepted
    assert plan.gpu_slots == 2 and plan.workspace_bytes == 386 * MiB + int(0.05 * shown)
    with pytest.raises(MoeLocalError, match="too small"):
        plan_budget(gpu_budget=795 * MiB, **kw)
    assert plan_budget(gpu_budget=100 * GiB, **kw).gpu_slots == 100  # never more slots than experts


def test_ram_budget_too_small_is_a_clear_error(pack, prompt):
    opts = CacheOptions(ram="64KiB", prefetch_depth=0)
    with pytest.raises(MoeLocalError, match=r"--ram 64\.00 KiB is too small: .* need at least"):
        run(pack, prompt, provider_factory(opts), new=1)


def test_bad_options_are_refused():
    for kw in ({"policy": "fifo"}, {"miss": "gpu"}, {"prefetch_depth": -1}, {"policy": "belady"}):
        with pytest.raises(MoeLocalError):
            provider_factory(CacheOptions(**kw))


# ----------------------------------------------------------------------------- slots
def test_slot_table_assigns_lowest_free_slot_and_tracks_pins():
    t = SlotTable(3)
    assert [t.assign(k) for k in "abc"] == [0, 1, 2] and not t.has_free
    t.pin("b")
    assert t.pinned() == {"b"}
    assert t.release("a") == 0 and t.assign("d", transient=True) == 0
    assert t.pinned() == {"b", "d"} and t.cached_keys() == ["b", "c"]
    t.unpin("b")
    assert t.pinned() == {"d"}


# ----------------------------------------------------------------------------- hand-counted hits
def test_lru_hits_misses_evictions_by_hand_and_outputs_equal_resident(pack):
    p, ref = provider(pack, slots=3, policy="lru")
    # cache after each call (LRU order oldest..newest) -- see the comments for the hand count
    calls = [[[0, 1]],  # miss 0, miss 1                 -> {0,1}
             [[1, 2]],  # hit 1, miss 2                  -> {0,1,2}
             [[0, 3]],  # hit 0, miss 3 evicts 1 (LRU)   -> {0,2,3}
             [[1, 2]]]  # miss 1 evicts 0 (2 is pinned), hit 2 -> {1,2,3}
    for i, ids in enumerate(calls):
        y, args = call(p, 1, ids, seed=i)
        assert torch.equal(y, ref.forward(*args))
    c = p.report()
    assert (c["uses"], c["tiers"]["ram"]["hits"], c["tiers"]["ram"]["misses"], c["tiers"]["ram"]["evictions"]) == (8, 3, 5, 2)
    assert c["hit_rate"] == pytest.approx(3 / 8)
    assert tier(p).cached == {(1, 1), (1, 2), (1, 3)}
    assert c["bytes"]["disk_to_ram"] == 5 * Pack(pack).expert_nbytes(1, 0)
    p.close()


def test_wide_prefill_layer_streams_without_flushing_the_cache(pack):
    p, ref = provider(pack, slots=4, policy="lru")
    for i, ids in enumerate([[[0, 1]], [[2, 3]]]):  # warm: experts 0..3 of layer 1 cached
        call(p, 1, ids, seed=i)
    wide = [[4, 5], [6, 7], [0, 5], [6, 4]]  # 5 distinct experts > 4 slots: streamed
    y, args = call(p, 1, wide, seed=9)
    assert torch.equal(y, ref.forward(*args))
    c = p.report()
    assert c["streamed_uses"] == 4  # experts 4..7 passed through transient slots
    assert c["tiers"]["ram"]["evictions"] <= p.stream_window  # at most a window of the cache was given up
    assert {(1, 0)} <= tier(p).cached  # the hit stayed; transients were never inserted
    assert not tier(p).transient and not tier(p).pins
    p.close()


# ----------------------------------------------------------------------------- prefetch accounting
class FixedPredictor:
    """A predictor with known guesses (the router lookahead is tested end to end below)."""

    depth, extra = 1, 0

    def __init__(self, guesses):
        self.guesses = guesses  # layer -> [(depth, target, ids)]

    def sources(self):
        return []

    def listen(self, callback):
        raise AssertionError("a predictor without sources is never listened to")

    def predict(self, layer, x, site="mlp"):
        return self.guesses.get(layer, [])


def test_prefetch_issued_used_wasted(pack):
    p, ref = provider(pack, slots=6, policy="lru", predictor=FixedPredictor({0: [(1, 1, [2, 3])]}))
    y0, a0 = call(p, 0, [[0, 1]], seed=1)
    y1, a1 = call(p, 1, [[3, 4]], seed=2)  # 3 was predicted (used), 2 was not needed (wasted)
    assert torch.equal(y0, ref.forward(*a0)) and torch.equal(y1, ref.forward(*a1))
    pf = p.report()["prefetch"]
    assert (pf["issued"], pf["used"], pf["wasted"]) == (2, 1, 1)
    assert pf["precision"] == 0.5 and pf["recall"] == pytest.approx(1 / 2)  # 4 was an uncovered miss
    layer1 = p.report()["layers"][1]
    assert layer1["hits"] + pf["late"] == 1 + 0 and layer1["uses"] == 2  # expert 3: a hit unless it arrived late
    p.close()


def test_prefetch_never_evicts_an_expert_needed_now(pack):
    # two slots, both held by the layer being computed: nowhere to prefetch to
    p, ref = provider(pack, slots=2, policy="lru", predictor=FixedPredictor({0: [(1, 1, [5, 6])]}))
    y, args = call(p, 0, [[0, 1]], seed=4)
    assert torch.equal(y, ref.forward(*args))
    assert p.report()["prefetch"]["issued"] == 0
    assert tier(p).cached == {(0, 0), (0, 1)}
    p.close()


def test_router_lookahead_predicts_and_counts(pack, prompt):
    _, _, lm = run(pack, prompt, tiered_factory(slots=10, depth=2, extra=1))
    c = lm.provider.report()
    pf = c["prefetch"]
    assert pf["issued"] > 0 and 0 < pf["used"] <= pf["issued"]
    assert pf["issued"] >= pf["used"] + pf["wasted"] - pf["issued"]  # every settled prefetch is used or wasted
    assert 0.0 < pf["router_recall"] <= 1.0


def test_lookahead_is_off_when_the_cache_holds_every_expert(pack, prompt):
    """24 slots hold the 3 x 8 experts: nothing is ever evicted, so no prediction is made (a
    skipped look-ahead is no prefetch miss: recall has nothing to count); the tokens are the same."""
    logits, tokens, lm = run(pack, prompt, tiered_factory(slots=24, depth=2, extra=1))
    ref_logits, ref_tokens, ref = run(pack, prompt, tiered_factory(slots=10, depth=2, extra=1))
    assert tokens == ref_tokens and torch.equal(logits, ref_logits)
    pf, pf_ref = lm.provider.report()["prefetch"], ref.provider.report()["prefetch"]
    assert pf_ref["lookahead"] and pf_ref["issued"] > 0
    assert not pf["lookahead"] and (pf["issued"], pf["used"], pf["wasted"], pf["recall"]) == (0, 0, 0, 0.0)
    assert lm.provider.report()["tokens"] == ref.provider.report()["tokens"]  # passes still counted


class MoeLayersOnly:
    """The look-ahead as it was before the first MoE layer got its own predictions: MoE layers only."""

    def __init__(self, model, depth, extra):
        self.inner, self.depth, self.extra = model.lookahead(depth, extra), depth, extra

    def sources(self):
        return []

    def listen(self, callback):
        raise AssertionError("a predictor without sources is never listened to")

    def predict(self, layer, x, site="mlp"):
        return self.inner.predict(layer, x, site)


def test_first_moe_layer_is_predicted_and_the_model_stops_calling_after_close(pack, prompt, tmp_path):
    """Tiny Mixtral (no dense layer): layer 0 is predicted from its own attention input."""
    from moe_local.cache.trace import read_trace

    path = tmp_path / "t.jsonl"
    _, _, lm = run(pack, prompt, tiered_factory(slots=8, depth=1, trace=path))
    assert lm.model.lookahead(1).sources() == [(0, "attn")]
    tr = read_trace(path)
    last_of_pass = [tok for i, tok in enumerate(tr.tokens)
                    if i + 1 == len(tr.tokens) or tr.tokens[i + 1].pass_id != tok.pass_id]
    assert len(last_of_pass) == 2 + 16  # two prompt passes, then one pass per decode step
    assert all(tok.predicted[1][0] is not None for tok in last_of_pass)
    assert lm.provider.report()["tokens"] == {"prefill": 32, "decode": 16}  # each pass counted once
    closed = lm.provider  # close() stopped listening: another forward does not reach it
    lm.model.experts.provider = ResidentExperts(Pack(pack))
    lm.model.setup_cache(prompt.shape[0])
    lm.model(prompt, 0)
    assert closed.report()["tokens"] == {"prefill": 32, "decode": 16}


def test_dense_layer_and_attention_hooks_lift_the_first_moe_layer(shared_model, tmp_path):
    """The shared model: layer 0 is dense, so layer 1 used to be a cold miss (~40-60% hits against
    ~85% at layers 2-6). Predicting it from layer 0's MLP input and layer 1's attention input must
    lift it well above that, with bit-identical logits. 96 slots = 25% of the 384 routed experts."""
    pack = make_deepseek_pack(shared_model, tmp_path)
    ids = eval_ids(shared_model, 64).tolist()
    results = {}
    for cls in (MoeLayersOnly, None):
        lm = load_model(pack, device="cpu", dtype="float32",
                        provider=tiered_factory(96, "arc", depth=1, extra=2, predictor_cls=cls))
        lm.model.setup_cache(len(ids))
        logits = torch.cat([lm.model(torch.tensor([t]), pos, last_only=True) for pos, t in enumerate(ids)])
        lm.provider.close()
        c = lm.provider.report()
        assert c["tokens"]["decode"] == len(ids)
        results[cls] = logits, {r["layer"]: r["hit_rate"] for r in c["layers"]}
    (before, hits_before), (after, hits_after) = results[MoeLayersOnly], results[None]
    assert torch.equal(before, after)
    assert lm.model.lookahead(1).sources() == [(0, "mlp"), (1, "attn")]
    assert hits_after[1] >= hits_before[1] + 0.15, (hits_before, hits_after)


# ----------------------------------------------------------------------------- traces and reports
def test_trace_is_readable_and_replays_the_demand_sequence(pack, prompt, tmp_path):
    from moe_local.cache.trace import read_trace

    path = tmp_path / "run.trace.jsonl"
    _, _, lm = run(pack, prompt, tiered_factory(slots=8, depth=1, trace=path, record=True))
    tr = read_trace(path)
    assert tr.moe_layers == [0, 1, 2] and tr.top_k == 2
    assert len(tr.tokens) == 2 * 16 + 16  # our_greedy re-runs the prompt, then 16 decode steps
    assert all(len(ids) == 2 for tok in tr.tokens for ids in tok.experts)
    assert 1 in tr.prediction_depths
    passes = [tok.pass_id for tok in tr.tokens]  # written by trace.TraceWriter through the recorder
    assert passes[:32] == [0] * 16 + [1] * 16 and passes[32:] == list(range(2, 2 + 16))
    assert future_from_trace(path) == lm.provider.access_log


def test_belady_trace_of_another_prompt_warns_once_and_keeps_the_tokens(pack, prompt, tmp_path, capfd):
    """--belady-trace recorded on prompt A: a run of A is silent; a run of prompt B says once on stderr
    that the trace does not match (naming it), and its tokens are those of all-resident experts."""
    path = tmp_path / "a.trace.jsonl"
    run(pack, prompt, tiered_factory(slots=8, trace=path))
    capfd.readouterr()
    opts = CacheOptions(ram="416KiB", policy="belady", belady_trace=path, prefetch_depth=0)  # ~5 slots (+ 96 KiB KV)
    _, same_tokens, _ = run(pack, prompt, provider_factory(opts))
    assert capfd.readouterr().err == ""

    other = torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(11))
    _, ref_tokens, _ = run(pack, other)
    logits, tokens, lm = run(pack, other, provider_factory(opts))
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: ")
    assert f"--belady-trace {path} does not match this run" in err and "tokens are unaffected" in err
    assert tokens == ref_tokens
    assert lm.provider.report()["tiers"]["ram"]["misses"] > 0  # the budget was tight: eviction really ran


def test_belady_future_shorter_than_the_run_warns(pack, prompt, capfd):
    src = Pack(pack)
    keys = [(0, 0), (0, 1)]
    tiered = TieredExperts(src, top_k=2, host_slots=4, policy="belady", future=keys, future_label="--belady-trace t")
    x = torch.randn(1, H)
    w = torch.ones(1, 2) / 2
    tiered.forward(0, x, torch.tensor([[1, 0]]), w)
    assert capfd.readouterr().err == ""
    tiered.forward(0, x, torch.tensor([[1, 0]]), w)
    tiered.forward(0, x, torch.tensor([[2, 3]]), w)
    tiered.close()
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "--belady-trace t does not match this run" in err and "went past the 2" in err


def test_trace_to_an_unwritable_place_is_a_clear_error(tmp_path):
    from moe_local.cache.trace import TraceRecorder

    with pytest.raises(MoeLocalError, match="cannot write the routing trace"):
        TraceRecorder(tmp_path / "missing-dir" / "t.jsonl", "m", 8, 2, [0, 1], 4096)


def test_report_cache_section_has_the_contract_fields(pack, prompt):
    _, _, lm = run(pack, prompt, tiered_factory(slots=5, depth=1))
    c = lm.provider.report()
    json.dumps(c)
    assert set(c) >= {"hit_rate", "tiers", "layers", "prefetch", "bytes", "stall_s", "cpu_computed"}
    assert set(c["tiers"]) == {"ram"}  # no GPU tier on a CPU-only machine
    assert set(c["prefetch"]) >= {"issued", "used", "late", "wasted", "precision", "recall"}
    assert set(c["bytes"]) == {"disk_to_ram", "ram_to_gpu", "per_token"} and c["bytes"]["ram_to_gpu"] == 0
    assert [r["layer"] for r in c["layers"]] == [0, 1, 2]
    assert sum(r["uses"] for r in c["layers"]) == c["uses"] and 0 <= c["hit_rate"] <= 1
    assert c["bytes"]["per_token"] == pytest.approx(c["bytes"]["disk_to_ram"] / (2 * 16 + 16))


# ----------------------------------------------------------------------------- corrupt packs
def test_corrupt_expert_range_is_a_clear_error_never_wrong_tokens(tmp_path, prompt):
    pack = make_mixtral_pack(tmp_path)
    src = Pack(pack)
    r = src.expert_range(1, 5)
    path = src.files[r.file]
    src.close()
    data = bytearray(path.read_bytes())
    data[r.offset + 7] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(MoeLocalError, match=r"layer 1 expert 5: checksum mismatch"):
        run(pack, prompt, tiered_factory(slots=24, depth=1))
    # a provider that hit the error keeps refusing that expert (its slot is never served)
    p = TieredExperts(Pack(pack), top_k=2, host_slots=4)
    for _ in range(2):
        with pytest.raises(MoeLocalError, match="layer 1 expert 5"):
            call(p, 1, [[5, 0]])
    assert (1, 5) not in tier(p).cached | tier(p).transient and not tier(p).pins
    y, args = call(p, 1, [[0, 1]])  # the rest of the pack still serves correct results
    assert torch.equal(y, ResidentExperts(Pack(pack)).forward(*args))
    p.close()


def test_run_report_renders_with_the_report_module(pack, prompt, tmp_path):
    from moe_local.cli.report_view import render_report
    from moe_local.runtime.report import load_report, run_report, write_json_atomic

    _, _, lm = run(pack, prompt, tiered_factory(slots=6, depth=1))
    rep = run_report(model="tiny-mixtral", device="cpu", dtype="float32",
                     options=CacheOptions(ram="1MiB", prefetch_depth=1).report_dict(), prompt_tokens=16,
                     generated_tokens=5, ttft_s=0.05, prompt_s=0.04, token_latencies_s=[0.01, 0.02, 0.03, 0.04],
                     cache=lm.provider.report())
    assert rep["timings"]["token_latency_s"]["p50"] in (0.02, 0.03) and rep["timings"]["gen_tps"] == pytest.approx(40)
    path = write_json_atomic(tmp_path / "run.json", rep)
    loaded = load_report(path)
    assert loaded["cache"]["hit_rate"] == rep["cache"]["hit_rate"]
    render_report(loaded)


def test_stats_rows_for_chat(pack, prompt):
    from moe_local.cli.run_cmds import cache_rows

    _, _, lm = run(pack, prompt, tiered_factory(slots=6, depth=1))
    rows = dict(cache_rows(lm.provider.live()))
    assert rows["expert hit rate"].endswith(f"of {lm.provider.report()['uses']} uses")
    assert rows["cache slots"].startswith("ram ") and "prefetch" in rows


# ----------------------------------------------------------------------------- random schedules
class RandomPredictor:
    """Arbitrary (often wrong) guesses: accounting and slot safety must hold whatever is predicted."""

    def __init__(self, rng, depth):
        self.rng, self.depth, self.extra = rng, depth, 0

    def sources(self):
        return []

    def listen(self, callback):
        raise AssertionError("a predictor without sources is never listened to")

    def predict(self, layer, x, site="mlp"):
        return [(d, layer + d, self.rng.sample(range(8), self.rng.randint(0, 4)))
                for d in range(1, self.depth + 1) if layer + d <= 2]


def test_random_schedules_keep_results_and_slots_consistent(pack):
    """Random routing (decode and prefill-sized calls), random predictions, one and two tiers, every
    policy but belady: outputs equal ResidentExperts, no pins leak, tables and policies agree."""
    import random

    src = Pack(pack)
    ref = ResidentExperts(src)
    for seed in range(16):
        rng = random.Random(seed)
        two = seed % 2 == 1
        p = TieredExperts(src, top_k=2, host_slots=rng.randint(2, 10), gpu_slots=rng.randint(2, 8) if two else 0,
                          two_tier=two, policy=("lru", "lfu-aging", "arc")[seed % 3],
                          predictor=RandomPredictor(rng, rng.randint(0, 2)), miss=("transfer", "cpu")[(seed // 2) % 2],
                          io_threads=rng.randint(1, 3))
        for step in range(10):
            T = rng.choice((1, 1, 1, 5))
            for layer in (0, 1, 2):
                ids = [rng.sample(range(8), 2) for _ in range(T)]
                y, args = call(p, layer, ids, seed=step * 3 + layer)
                assert torch.equal(y, ref.forward(*args)), (seed, step, layer)
                for state in p.tier_states():
                    assert not state.transient and state.used <= state.capacity
                    assert all(n > 0 for n in state.pins.values())
        p.drain()
        for state in p.tier_states():
            assert not state.pins and not state.transient
        c = p.report()
        assert c["uses"] == sum(r["uses"] for r in c["layers"])
        assert c["prefetch"]["used"] + c["prefetch"]["wasted"] <= c["prefetch"]["issued"]
        p.close()


def test_cpu_ram_too_small_names_what_counts_and_no_empty_kv_cache():
    """On a CPU the KV cache is not in the slot budget (kv_bytes=0): the message must not claim "KV cache 0 B"."""
    kw = dict(slot_bytes=1 * MiB, num_keys=100, top_k=2, resident_bytes=10 * MiB, kv_bytes=0,
              expanded_bytes=1 * MiB, gpu_budget=None, cuda=False)
    with pytest.raises(MoeLocalError) as info:
        plan_budget(ram_budget=5 * MiB, **kw)
    msg = str(info.value)
    assert "resident weights 10.00 MiB + one layer's top-2 experts" in msg and "KV cache" not in msg
    assert "need at least 12.00 MiB" in msg
    assert plan_budget(ram_budget=12 * MiB, **kw).host_slots == 2  # the stated minimum works
