"""The offload benchmark's harness works (CPU scale): synthetic INT4 store, routing, table, JSON, replay."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("offload_bench", ROOT / "benchmarks" / "offload.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is created
    spec.loader.exec_module(mod)
    return mod


def test_cpu_smoke_writes_a_table_and_json(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--cpu-smoke", "--tokens", "6", "--warmup", "2", "--policies", "lru", "--json", str(out),
                       "--workdir", str(tmp_path)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {r["shape"] for r in rows} == {"mixtral-tiny", "qwen3-tiny"}
    for r in rows:
        assert 0.0 <= r["hit_rate"] <= 1.0 and r["tokens"] == 6 and r["tokens_per_s"] > 0
    no_cache = [r for r in rows if r["config"] == "no-cache"]
    assert len(no_cache) == 2 and all(r["hit_rate"] == 0.0 and r["bytes_per_token"] > 0 for r in no_cache)
    assert any("accelerate" in n for n in result["notes"])
    assert "tokens/s" in capsys.readouterr().out
    assert not list(tmp_path.glob("moe-local-bench-*"))  # the synthetic store is deleted


def test_store_is_int4_and_checksummed(bench, tmp_path):
    shape = bench.SMOKE_SHAPES["qwen3"]
    store = bench.SyntheticInt4Store(tmp_path, shape)
    w = store.load(1, 3)
    x = torch.randn(2, shape.hidden)
    assert w.gate.scheme.name == "int4" and torch.isfinite(w(x, torch.nn.functional.silu)).all()
    assert store.stride % 4096 == 0
    store.close()
    data = bytearray(store.path.read_bytes())
    data[store._offset(1, 3) + 5] ^= 1
    store.path.write_bytes(bytes(data))
    store.fd = os.open(store.path, os.O_RDONLY)
    from moe_local.errors import MoeLocalError

    with pytest.raises(MoeLocalError, match="layer 1 expert 3: checksum"):
        store.load(1, 3)


def test_replay_of_a_recorded_trace(bench, tmp_path):
    from tests.cache_helpers import make_mixtral_pack, run, tiered_factory

    pack = make_mixtral_pack(tmp_path / "m")
    trace = tmp_path / "t.jsonl"
    run(pack, torch.arange(10), tiered_factory(slots=6, depth=1, trace=trace), new=8)
    shape = bench.SMOKE_SHAPES["qwen3"]
    routing = bench.replay_routing(trace, shape, 12)
    assert len(routing) == 12 and all(len(row) == shape.layers for row in routing)
    assert all(len(set(ids)) == shape.top_k for row in routing for ids in row)
    assert bench.main(["--cpu-smoke", "--shape", "mixtral", "--tokens", "4", "--warmup", "1", "--policies", "lru",
                       "--replay", str(trace), "--workdir", str(tmp_path)]) == 0
