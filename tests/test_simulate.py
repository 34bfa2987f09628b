"""Routing trace round trip and bad files; the trace simulator on hand-made traces; `moe-local simulate`."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from moe_local.cache.simulate import parse_sizes, select_steps, simulate
from moe_local.units import parse_size
from moe_local.cache.trace import TraceWriter, read_trace
from moe_local.cli.app import app
from moe_local.errors import MoeLocalError

# 2 MoE layers (model layers 1 and 2), 4 experts, top-2. Hit counts below are worked out by hand
# in the test docstrings.
TOKENS = [
    ([[0, 1], [0, 1]], [None, [0, 1]]),
    ([[0, 2], [1, 0]], [None, [0, 3]]),
    ([[1, 0], [2, 3]], [None, [3, 2]]),
]


def write_trace(path, tokens=TOKENS, prefill=0, with_predicted=True, expert_bytes=1000):
    with TraceWriter(path, model="tiny", num_experts=4, top_k=2, moe_layers=[1, 2],
                     expert_bytes=expert_bytes) as w:
        for t, (experts, pred) in enumerate(tokens):
            w.record(t, "prefill" if t < prefill else "decode", experts, {1: pred} if with_predicted else None)
    return path


def test_trace_round_trip(tmp_path):
    path = tmp_path / "run.trace.jsonl"
    with TraceWriter(path, model="m", num_experts=8, top_k=2, moe_layers=[1, 3], expert_bytes=4096,
                     extra={"source": "test"}) as w:
        w.record(0, "prefill", [[1, 2], [3, 4]])
        w.record(1, "decode", [[7, 0], [5, 6]], predicted={1: [None, [5, 6, 7]], "2": [None, None]})
    tr = read_trace(path)
    assert (tr.model, tr.num_experts, tr.top_k, tr.moe_layers, tr.expert_bytes) == ("m", 8, 2, [1, 3], 4096)
    assert tr.extra == {"source": "test"}
    assert [(t.t, t.phase, t.experts) for t in tr.tokens] == [(0, "prefill", [[1, 2], [3, 4]]),
                                                              (1, "decode", [[7, 0], [5, 6]])]
    assert tr.tokens[0].predicted == {}
    assert tr.tokens[1].predicted == {1: [None, [5, 6, 7]], 2: [None, None]}
    assert tr.prediction_depths == [1]
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary name is gone


def test_trace_writer_leaves_nothing_on_error(tmp_path):
    path = tmp_path / "t.jsonl"
    with pytest.raises(RuntimeError):
        with TraceWriter(path, model="m", num_experts=4, top_k=1, moe_layers=[0], expert_bytes=1) as w:
            w.record(0, "decode", [[1]])
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


HEADER = {"format": "moe-local-trace", "version": 1, "model": "m", "num_experts": 4, "top_k": 2,
          "moe_layers": [1, 2], "expert_bytes": 10}


@pytest.mark.parametrize("lines, message", [
    ([], "empty file"),
    (["{not json"], "line 1: not a moe-local trace header"),
    ([json.dumps({"format": "something-else"})], 'line 1: not a moe-local trace (expected "format"'),
    ([json.dumps({**HEADER, "version": 9})], "unsupported trace version 9"),
    ([json.dumps({**HEADER, "top_k": 0})], "'top_k' must be a positive integer"),
    ([json.dumps(HEADER), '{"t": 0, "phase": "decode", "experts": [[0, 1], [2'], "line 2: invalid JSON"),
    ([json.dumps(HEADER), '{"t": 0, "phase": "decode", "experts": [[0, 1]]}'], "line 2: 'experts' must list"),
    ([json.dumps(HEADER), '{"t": 0, "phase": "decode", "experts": [[0, 1], [2, 9]]}'],
     "line 2: expert id 9 out of range 0..3"),
    ([json.dumps(HEADER), '{"t": 0, "phase": "warmup", "experts": [[0, 1], [2, 3]]}'], "line 2: 'phase' must be"),
    ([json.dumps(HEADER), '{"t": 0, "phase": "decode", "experts": [[0, 1], [2, 3]], "predicted": {"1": [[0]]}}'],
     "line 2: predicted['1'] must have one entry"),
])
def test_bad_trace_files_give_one_line_errors(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    with pytest.raises(MoeLocalError) as exc:
        read_trace(path)
    text = str(exc.value)
    assert message in text and str(path) in text and "\n" not in text


def test_missing_trace_file(tmp_path):
    with pytest.raises(MoeLocalError, match="trace file not found"):
        read_trace(tmp_path / "nope.jsonl")


def test_lru_and_belady_on_a_hand_made_trace(tmp_path):
    """Global LRU, 4 slots: t0 4 misses; t1 L1 (1,0) hit, (1,2) evicts (1,1), L2 2 hits; t2 L1 (1,0) hit,
    (1,1) evicts (1,2), L2 (2,2),(2,3) evict (2,0),(2,1) -> 4 hits of 12, 4 evictions."""
    tr = read_trace(write_trace(tmp_path / "t.jsonl"))
    r = simulate(tr, "lru", 4)
    assert (r.uses, r.hits, r.evictions) == (12, 4, 4)
    assert [(x["layer"], x["uses"], x["hits"]) for x in r.layers] == [(1, 6, 2), (2, 6, 2)]
    assert simulate(tr, "belady", 4).hits == 4
    # per layer, 2 slots each: L1 0,1 | 0,2 | 0,1 -> 2 hits (the 0s); L2 0,1 | 0,1 | 2,3 -> 2 hits
    per = simulate(tr, "lru", 4, per_layer=True)
    assert (per.slots, per.hits, [x["hits"] for x in per.layers]) == (4, 4, [2, 2])
    # everything fits: only first uses miss (1,0),(1,1),(2,0),(2,1),(1,2),(2,2),(2,3)
    assert simulate(tr, "arc", 8).hits == 12 - 7


def test_prefetch_accounting_on_a_hand_made_trace(tmp_path):
    """Global LRU, 4 slots, depth 1 (predictions for layer 2 made at layer 1):
    t0: L1 2 misses; prefetch (2,0),(2,1) [issued 2]; L2 uses both [used 2].
    t1: L1 (1,0) hit, (1,2) evicts (1,1); prediction [0,3]: (2,0) resident (protected), (2,3) evicts (2,1)
        [issued 3]; L2 (2,0) hit, (2,1) misses and evicts (1,0).
    t2: L1 (1,0) evicts (1,2), (1,1) evicts the unused (2,3) [wasted 1]; prediction [2,3]: both issued
        [issued 5] evicting (2,0),(2,1); L2 uses both [used 4].
    -> hits 6 of 12, misses 6; precision 4/5, recall 4/(4+6)."""
    tr = read_trace(write_trace(tmp_path / "t.jsonl"))
    r = simulate(tr, "lru", 4, prefetch_depth=1)
    p = r.prefetch
    assert (r.hits, p.issued, p.used, p.wasted, p.dropped) == (6, 5, 4, 1, 0)
    assert p.precision == pytest.approx(0.8) and p.recall == pytest.approx(0.4)


def test_first_layer_predictions_are_prefetched_at_the_start_of_the_step(tmp_path):
    """predicted["1"][0] was made before the first MoE layer ran (dense layer / its attention input).
    Global LRU, 4 slots, depth 1:
    t0: prefetch (1,0),(1,1) [issued 2]; L1 uses both [hits 2, used 2]; L2 (2,2),(2,3) miss.
    t1: prefetch (1,2) evicts (1,0), (1,3) evicts (1,1) [issued 4]; L1 hits both [used 4]; L2 hits both.
    -> hits 6 of 8 (layer 1: 4, layer 2: 2); without those predictions layer 1 would hit 0."""
    path = write_trace(tmp_path / "t.jsonl", tokens=[([[0, 1], [2, 3]], [[0, 1], None]),
                                                     ([[2, 3], [2, 3]], [[2, 3], None])])
    r = simulate(read_trace(path), "lru", 4, prefetch_depth=1)
    p = r.prefetch
    assert (r.hits, p.issued, p.used, p.wasted) == (6, 4, 4, 0)
    assert [x["hits"] for x in r.layers] == [4, 2]


def test_prefetch_needs_predictions(tmp_path):
    tr = read_trace(write_trace(tmp_path / "t.jsonl", with_predicted=False))
    with pytest.raises(MoeLocalError, match="needs router predictions"):
        simulate(tr, "lru", 4, prefetch_depth=1)


def test_prefill_tokens_form_one_step(tmp_path):
    tr = read_trace(write_trace(tmp_path / "t.jsonl", prefill=2))
    assert len(select_steps(tr)) == 1  # decode only by default
    steps = select_steps(tr, include_prefill=True)
    assert [s.experts for s in steps] == [[[0, 1, 2], [0, 1]], [[0, 1], [2, 3]]]
    with pytest.raises(MoeLocalError, match="no decode tokens"):
        select_steps(read_trace(write_trace(tmp_path / "p.jsonl", prefill=3)))


def test_cache_smaller_than_one_layer_is_an_error(tmp_path):
    tr = read_trace(write_trace(tmp_path / "t.jsonl"))
    with pytest.raises(MoeLocalError, match="at least top_k|needs 2 slots"):
        simulate(tr, "lru", 1)
    with pytest.raises(MoeLocalError, match="gives 1 per layer"):
        simulate(tr, "lru", 3, per_layer=True)


def test_parse_sizes_and_bytes(tmp_path):
    tr = read_trace(write_trace(tmp_path / "t.jsonl"))  # 2 layers x 4 experts = 8 keys
    assert parse_sizes("4,25%,3/layer,4", tr) == [2, 4, 6]
    with pytest.raises(MoeLocalError, match="bad cache size 'lots'"):
        parse_sizes("lots", tr)


@pytest.mark.parametrize("budget, slots", [("4000", 4), ("8KiB", 8), ("0.008MB", 8)])
def test_simulate_budget_uses_the_shared_size_parser(tmp_path, budget, slots):
    """--budget goes through budget.parse_size like --ram: same units (MB = 10^6, KiB = 2^10)."""
    path = write_trace(tmp_path / "t.jsonl")
    res = runner.invoke(app, ["simulate", str(path), "--policy", "lru", "--sizes", "4", "--json", "--budget", budget])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["recommendation"]["slots"] == slots


@pytest.mark.parametrize("bad", ["12XB", "six gigs", "auto"])
def test_simulate_budget_and_ram_refuse_a_bad_size_in_the_same_words(tmp_path, bad):
    path = write_trace(tmp_path / "t.jsonl")
    res = runner.invoke(app, ["simulate", str(path), "--budget", bad])
    assert res.exit_code == 1
    line = res.stderr.strip()
    assert line.count("\n") == 0
    assert f"--budget {bad!r} is not a size; write e.g. 6GiB, 512MiB, 1.5GB or a byte count" in line
    with pytest.raises(MoeLocalError) as ram:
        parse_size("12XB", "--ram")
    assert str(ram.value).replace("--ram", "--budget").replace("'12XB'", repr(bad)) in line


def test_prefetch_depth_deeper_than_the_trace_is_refused(tmp_path):
    """The hand-made trace holds depth-1 predictions only: depth 2 or 3 would replay depth 1 under
    another label, so both the function and the CLI refuse, naming the trace and the depths it holds."""
    path = write_trace(tmp_path / "t.jsonl")
    tr = read_trace(path)
    assert simulate(tr, "lru", 4, prefetch_depth=1).prefetch.issued == 5
    with pytest.raises(MoeLocalError, match=r"--prefetch-depth 3 needs .*depths 1\.\.3; this trace holds depth 1 only"):
        simulate(tr, "lru", 4, prefetch_depth=3)
    res = runner.invoke(app, ["simulate", str(path), "--prefetch-depth", "3"])
    assert res.exit_code == 1
    line = res.stderr.strip()
    assert line.count("\n") == 0 and "t.jsonl" in line and "holds depth 1 only" in line


def test_prefetch_depth_with_a_gap_is_refused(tmp_path):
    """Depths 1 and 3 recorded, 2 missing: depth 3 cannot be replayed faithfully."""
    path = tmp_path / "t.jsonl"
    with TraceWriter(path, model="tiny", num_experts=4, top_k=2, moe_layers=[1, 2, 3], expert_bytes=1000) as w:
        w.record(0, "decode", [[0, 1], [0, 1], [2, 3]], {1: [None, [0, 1], [2, 3]], 3: [None, None, [2, 3]]})
    tr = read_trace(path)
    assert tr.prediction_depths == [1, 3]
    with pytest.raises(MoeLocalError, match="holds depth 1, 3 only"):
        simulate(tr, "lru", 6, prefetch_depth=3)
    simulate(tr, "lru", 6, prefetch_depth=1)


def random_trace(path, rng: random.Random, n_layers: int, experts: int, top_k: int, n_tokens: int):
    with TraceWriter(path, model="r", num_experts=experts, top_k=top_k, moe_layers=list(range(n_layers)),
                     expert_bytes=1) as w:
        hot = list(range(experts))
        for t in range(n_tokens):
            # skewed routing so caches have something to learn
            w.record(t, "decode", [rng.sample(hot[: max(top_k, experts // 2)] if rng.random() < 0.7 else hot, top_k)
                                   for _ in range(n_layers)])
    return read_trace(path)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n_layers=st.integers(1, 3), experts=st.integers(3, 8),
       top_k=st.integers(1, 3), n_tokens=st.integers(1, 25), extra=st.integers(0, 12), per_layer=st.booleans())
def test_belady_beats_every_policy_on_random_layered_traces(tmp_path_factory, seed, n_layers, experts, top_k,
                                                            n_tokens, extra, per_layer):
    top_k = min(top_k, experts)
    tr = random_trace(tmp_path_factory.mktemp("r") / "t.jsonl", random.Random(seed), n_layers, experts, top_k,
                      n_tokens)
    slots = (top_k + extra) * (n_layers if per_layer else 1)
    best = simulate(tr, "belady", slots, per_layer=per_layer).hits
    for name in ("lru", "lfu-aging", "arc"):
        assert best >= simulate(tr, name, slots, per_layer=per_layer).hits, name


# ----------------------------------------------------------------------------- the CLI
runner = CliRunner()


def test_simulate_cli_table(tmp_path):
    path = write_trace(tmp_path / "t.jsonl")
    res = runner.invoke(app, ["simulate", str(path), "--sizes", "4,2/layer", "--prefetch-depth", "1"])
    assert res.exit_code == 0, res.output
    text = res.stdout
    for word in ("lru", "lfu-aging", "arc", "belady", "optimum", "4 slots", "issued", "precision"):
        assert word in text
    assert "33.3%" in text  # LRU and Belady without prefetch at 4 slots: 4 of 12
    assert "50.0%" in text  # LRU with prefetch depth 1: 6 of 12


def test_simulate_cli_json_and_budget(tmp_path):
    path = write_trace(tmp_path / "t.jsonl")
    res = runner.invoke(app, ["simulate", str(path), "--policy", "lru,belady", "--sizes", "4", "--json",
                              "--budget", "4000"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["mode"] == "global" and data["uses"] == 12 and data["steps"] == 3
    rows = {(r["policy"], r["slots"], r["prefetch_depth"]): r for r in data["results"]}
    assert rows[("lru", 4, 0)]["hits"] == 4 and rows[("belady", 4, 0)]["hit_rate"] == pytest.approx(4 / 12)
    rec = data["recommendation"]  # 4000 bytes / 1000 per expert = 4 slots; lru with prefetch 1 hits 6/12
    assert (rec["slots"], rec["policy"], rec["prefetch_depth"]) == (4, "lru", 1)
    assert rec["hit_rate"] == pytest.approx(0.5) and rec["belady_hit_rate"] == pytest.approx(4 / 12)


def test_simulate_cli_per_layer(tmp_path):
    path = write_trace(tmp_path / "t.jsonl")
    res = runner.invoke(app, ["simulate", str(path), "--policy", "lru", "--sizes", "2/layer", "--per-layer",
                              "--json"])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout)["results"]
    assert (row["per_layer"], row["slots"], row["hits"]) == (True, 4, 4)


@pytest.mark.parametrize("args, message", [
    (["--policy", "fifo"], "unknown cache policy 'fifo'"),
    (["--sizes", "1"], "a layer needs 2 slots at once, so the minimum is 2"),
    (["--budget", "1500"], "the minimum is 2"),
])
def test_simulate_cli_errors(tmp_path, args, message):
    path = write_trace(tmp_path / "t.jsonl")
    res = runner.invoke(app, ["simulate", str(path), *args])
    assert res.exit_code == 1
    assert message in res.stderr and res.stderr.strip().count("\n") == 0


def test_simulate_cli_bad_trace(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"format": "nope"}\n')
    res = runner.invoke(app, ["simulate", str(path)])
    assert res.exit_code == 1 and "not a moe-local trace" in res.stderr


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n_layers=st.integers(2, 3), top_k=st.integers(1, 2), n_tokens=st.integers(1, 20),
       extra=st.integers(0, 6), depth=st.integers(1, 2), name=st.sampled_from(["lru", "lfu-aging", "arc", "belady"]),
       per_layer=st.booleans())
def test_prefetch_counters_balance(tmp_path_factory, seed, n_layers, top_k, n_tokens, extra, depth, name, per_layer):
    """Every issued prefetch ends up used or wasted; prefetch only adds hits where it was used."""
    rng = random.Random(seed)
    experts = 6
    path = tmp_path_factory.mktemp("p") / "t.jsonl"
    with TraceWriter(path, model="r", num_experts=experts, top_k=top_k, moe_layers=list(range(n_layers)),
                     expert_bytes=1) as w:
        for t in range(n_tokens):
            # every depth 1..2 recorded (a 2-layer model's depth 2 targets its last layer from before the first)
            pred = {d: [None] * min(d, n_layers - 1)
                    + [rng.sample(range(experts), top_k + 1) for _ in range(n_layers - min(d, n_layers - 1))]
                    for d in (1, 2)}
            w.record(t, "decode", [rng.sample(range(experts), top_k) for _ in range(n_layers)], pred)
    tr = read_trace(path)
    slots = (top_k + extra) * (n_layers if per_layer else 1)
    r = simulate(tr, name, slots, per_layer=per_layer, prefetch_depth=depth)
    p = r.prefetch
    assert p.issued == p.used + p.wasted
    assert 0 <= r.hits <= r.uses == n_tokens * n_layers * top_k
    assert p.used <= r.hits


def test_prefill_passes_split_steps(tmp_path):
    """A chunked prefill: lines carry "pass"; each pass is one step (the runtime's format)."""
    path = tmp_path / "t.jsonl"
    rows = [(0, "prefill", [[0, 1], [0, 1]]), (0, "prefill", [[2, 1], [0, 1]]), (1, "prefill", [[3, 1], [2, 1]]),
            (2, "decode", [[0, 1], [0, 3]])]
    lines = [json.dumps(HEADER)] + [json.dumps({"t": t, "phase": ph, "pass": p, "experts": ex})
                                    for t, (p, ph, ex) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")
    steps = select_steps(read_trace(path), include_prefill=True)
    assert [s.experts for s in steps] == [[[0, 1, 2], [0, 1]], [[1, 3], [1, 2]], [[0, 1], [0, 3]]]


@pytest.mark.slow
def test_record_trace_of_the_trained_model(shared_model, tmp_path):
    """benchmarks/record_trace.py on real routing: valid trace, top-6 of 64 in 6 MoE layers, Belady >= LRU."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "record_trace.py"
    out = tmp_path / "real.trace.jsonl"
    subprocess.run([sys.executable, str(script), str(shared_model), str(out), "--tokens", "64", "--max-depth", "2"],
                   check=True, capture_output=True)
    tr = read_trace(out)
    assert (tr.num_experts, tr.top_k, tr.moe_layers, len(tr.tokens)) == (64, 6, [1, 2, 3, 4, 5, 6], 64)
    assert all(len(set(ids)) == 6 for tok in tr.tokens for ids in tok.experts)
    assert tr.prediction_depths == [1, 2]
    lru, opt = simulate(tr, "lru", 96), simulate(tr, "belady", 96)
    assert 0 < lru.hits <= opt.hits < opt.uses
    assert simulate(tr, "arc", 96, prefetch_depth=1).prefetch.issued > 0
