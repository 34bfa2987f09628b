"""Checks every model family must pass beyond parity, run through the real CLI on a tiny checkpoint:
an INT4 pack made by `moe-local quantize` generates the same greedy tokens with tiered experts under
a RAM budget that holds only part of them as with all experts resident, and the router look-ahead
predicts experts that are then used (prefetch precision > 0 in the run report)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from moe_local.cli.app import app
from moe_local.runtime.inspect import summarize

runner = CliRunner()


def cli(*args) -> str:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.stdout


def check_pack_tiered_matches_resident(ckpt: Path, tmp: Path, prompt: list[int], new: int = 16) -> dict:
    """Returns the tiered run's report (its `cache` section) for family-specific checks."""
    pack = tmp / "int4"
    cli("quantize", ckpt, pack, "--scheme", "int4")
    s = summarize(pack, "float32")
    experts = s.moe_layers * s.experts_per_layer
    # resident weights + one layer's top-k (the minimum) + a quarter of all experts: well below all of them
    ram = s.memory_min_offload + (experts // 4) * s.bytes_per_expert
    args = ("--prompt-ids", ",".join(map(str, prompt)), "-n", new, "--temperature", "0", "--ignore-eos", "--json")
    resident = json.loads(cli("generate", pack, *args, "--experts", "resident"))
    stats = tmp / "run.json"
    tiered = json.loads(cli("generate", pack, *args, "--experts", "tiered", "--ram", str(ram), "--policy", "lru",
                            "--prefetch-depth", "1", "--stats-json", stats))
    assert tiered["tokens"] == resident["tokens"] and len(resident["tokens"]) == new
    report = json.loads(stats.read_text())["cache"]
    ram_tier = report["tiers"]["ram"]
    assert ram_tier["capacity"] < experts and ram_tier["misses"] > 0, ram_tier  # the budget really was tight
    assert report["prefetch"]["issued"] > 0 and report["prefetch"]["precision"] > 0, report["prefetch"]
    return report


def inspect_config_only(tmp: Path, config: dict, dtype: str = "bfloat16") -> dict:
    """`moe-local inspect --json` on a folder holding only `config` as config.json (a real model's, for its
    published sizes): the model is built on the meta device, no weight exists or is allocated. Memory
    figures for a `dtype` run (bf16, as these models are run)."""
    (tmp / "config.json").write_text(json.dumps(config))
    assert "sizes from config.json" in cli("inspect", tmp, "--dtype", dtype)
    return json.loads(cli("inspect", tmp, "--json", "--dtype", dtype))
