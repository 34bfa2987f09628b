"""Budgets with one meaning: `--ram` / `--gpu-mem` are the memory the process uses for the model
(resident weights, KV cache, expert slots; on a GPU also the workspace), the same figure for
`inspect`, `simulate --budget` and `generate`; the KV cache never grows past what was planned; a long
prefill runs in chunks with the same logits. The CUDA-only parts are `gpu`-marked at the end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moe_local.cache.budget import prefill_chunk
from moe_local.cache.options import CacheOptions, provider_factory
from moe_local.cache.tiers import allocate_slab, pinned_piece_sizes
from moe_local.errors import GenerationError
from moe_local.runtime.generate import GenerateOptions, Generator
from moe_local.runtime.loader import load_model
from moe_local.runtime.sampling import SamplingOptions
from moe_local.units import parse_size
from tests.tiny import mixtral_config, qwen3_next_config, save_tiny, v32_config

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
GREEDY = SamplingOptions(temperature=0)


def cli(*args) -> str:
    r = runner.invoke(app_(), [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


def app_():
    from moe_local.cli.app import app

    return app


def inspect_minimum(path: Path, *dtype: str) -> tuple[str, str]:
    """(dtype, figure) of inspect's "min --ram, offload (DTYPE)" row, as printed."""
    table = " ".join(cli("inspect", path, *dtype).replace("│", " ").split())
    m = re.search(r"min --ram, offload \((\w+)\) ([0-9.]+) (B|KiB|MiB|GiB)", table)
    assert m, table
    return m.group(1), m.group(2) + m.group(3)


@pytest.mark.parametrize("dtype", [[], ["--dtype", "bfloat16"]], ids=["default dtype", "bfloat16"])
def test_inspect_prints_the_minimum_ram_the_run_accepts(pack, dtype):
    """The figure inspect prints (for the dtype the run will use) is accepted as it is; 1 KiB less is not."""
    run_dtype, figure = inspect_minimum(pack, *dtype)
    assert run_dtype == ("bfloat16" if dtype else "float32")  # a default CPU run is float32
    gen = ["generate", pack, "--prompt-ids", "1,2,3", "-n", "2", "--temperature", "0", "--ram", figure,
           "--prefetch-depth", "0", *dtype]
    r = runner.invoke(app_(), [str(a) for a in gen])
    assert r.exit_code == 0, r.output
    less = f"{parse_size(figure) - 1024}"
    r = runner.invoke(app_(), [str(a) for a in gen[:-len(dtype) - 4 if dtype else -4]] + ["--ram", less, "--prefetch-depth",
                                                                                         "0", *dtype])
    assert r.exit_code == 1 and "is too small" in r.output and "KV cache" in r.output, r.output


def test_simulate_budget_buys_the_slots_ram_bought(pack, tmp_path):
    """`simulate --budget X` on a trace of a `--ram X` run recommends for exactly that run's RAM slots."""
    run_dtype, figure = inspect_minimum(pack)
    ram = parse_size(figure) + 10 * 8192  # the minimum + about ten more slots
    trace, report = tmp_path / "t.jsonl", tmp_path / "r.json"
    cli("generate", pack, "--prompt-ids", ",".join(map(str, range(1, 40))), "-n", "8", "--temperature", "0",
        "--ram", ram, "--trace", trace, "--stats-json", report)
    capacity = json.loads(report.read_text())["cache"]["tiers"]["ram"]["capacity"]
    sim = json.loads(cli("simulate", trace, "--sizes", "4", "--budget", ram, "--json"))
    assert sim["recommendation"]["slots"] == capacity
    text = cli("simulate", trace, "--sizes", "4", "--budget", ram)
    assert "for resident weights and KV cache (as the recorded run's --ram counted them)" in " ".join(text.split())


def test_kv_cache_never_grows_past_the_planned_context(pack):
    lm = load_model(pack, device="cpu", dtype="float32",
                    provider=provider_factory(CacheOptions(ram="8MiB", context=24, prefetch_depth=0)))
    try:
        assert lm.provider.plan.kv_tokens == 24 and lm.provider.plan.kv_bytes == lm.model.kv_cache_bytes(24)
        gen = Generator(lm)
        assert gen.context_length == 24 < gen.model_context
        with pytest.raises(GenerationError, match="memory budget reserved a KV cache of 24 tokens"):
            gen.generate(list(range(1, 30)), GenerateOptions(GREEDY, max_tokens=2))
        result = gen.generate(list(range(1, 11)), GenerateOptions(GREEDY, max_tokens=100, ignore_eos=True))
        assert result.stop_reason == "context" and len(result.tokens) == 14
        assert lm.model.max_len <= 24 and lm.model.kv_cache_bytes() <= lm.provider.plan.kv_bytes
    finally:
        lm.provider.close()


@pytest.mark.parametrize("config", [mixtral_config, v32_config, qwen3_next_config],
                         ids=["attention", "sparse attention (DSA)", "hybrid (DeltaNet)"])
def test_prefill_in_chunks_gives_the_same_logits_and_tokens(tmp_path, config):
    save_tiny(config(), tmp_path / "m")
    lm = load_model(tmp_path / "m", device="cpu", dtype="float32")
    prompt = torch.randint(0, 200, (37,), generator=torch.Generator().manual_seed(0)).tolist()
    steps: list[int] = []
    whole = Generator(lm, prefill_chunk=1000)
    whole.reserve(64)
    logits_whole = whole._forward(prompt, 0, "prefill").clone()  # one forward of the whole prompt
    tokens_whole = whole.generate(prompt, GenerateOptions(GREEDY, max_tokens=6, ignore_eos=True)).tokens
    chunked = Generator(lm, prefill_chunk=8, on_step=lambda s: steps.append(s.tokens), reuse_prefix=False)
    chunked.reserve(64)
    logits_chunked = chunked._forward(prompt, 0, "prefill")
    assert steps == [8, 8, 8, 8, 5]
    steps.clear()
    torch.testing.assert_close(logits_chunked, logits_whole, rtol=1e-5, atol=1e-5)
    assert chunked.generate(prompt, GenerateOptions(GREEDY, max_tokens=6, ignore_eos=True)).tokens == tokens_whole


def test_prefill_chunk_fits_the_workspace():
    assert prefill_chunk(heads=32, context=4096) == 128  # Mixtral: 32 x 128 x 4096 x 4 B x 2 = 128 MiB
    assert prefill_chunk(heads=4, context=2048) == 512  # the shared model: capped
    assert prefill_chunk(heads=128, context=163840) == 16  # DeepSeek-V3 at full context: the floor


def test_pinned_slab_pieces_are_powers_of_two_and_waste_less_than_a_slot_each():
    """torch's pinned host allocator rounds every block up to a power of two (24.7 GB would pin
    32 GiB): the RAM slab is allocated in pieces that are powers of two already."""
    for slots, slot_bytes in [(1, 4096), (7, 12288), (1000, 28672), (3000, 90 << 20), (123, 3 << 20)]:
        pieces = pinned_piece_sizes(slots, slot_bytes)
        assert sum(n for _, n in pieces) == slots
        for nbytes, n in pieces:
            assert nbytes & (nbytes - 1) == 0 and n * slot_bytes <= nbytes < (n + 1) * slot_bytes or n == 0
        assert len(pieces) <= 2 * max(1, slots.bit_length()) + 2


def test_a_slab_in_pieces_addresses_every_slot_separately():
    slab = allocate_slab(11, 8192, torch.device("cpu"), pieces=True)
    assert slab.shape[0] == 11
    for s in range(11):
        slab[s, :8192].fill_(s)
    assert [int(slab[s, :8192].float().mean()) for s in range(11)] == list(range(11))
    assert len({slab[s, :1].data_ptr() for s in range(11)}) == 11


# --------------------------------------------------------------------------- peak memory of a real process
RSS_SCRIPT = r"""
import json, sys, threading, time
from moe_local.cli.app import app

def anon():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

peak = [0]
stop = False
def sample():
    while not stop:
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)

# The baseline: interpreter, torch and moe_local imported, and torch's one-off lazy initialisation
# done by building this model once on the meta device (about 67 MiB the first time, 0 the second:
# it is the same for every model and budget, so it is not the model's memory).
import gc
from moe_local.loading.checkpoint import read_json
from moe_local.models import build_model
from pathlib import Path
build_model(read_json(Path(sys.argv[2]) / "config.json"))
gc.collect()
base = anon()
t = threading.Thread(target=sample, daemon=True)
t.start()
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    stop = True
    t.join()
print("RSS " + json.dumps({"base": base, "peak": max(peak[0], anon())}))
"""

ALLOWANCE = 24 << 20  # activations of a prefill chunk, Python objects, torch's CPU allocator, the run report


def peak_rss(pack: Path, ram: int, tmp: Path) -> tuple[int, dict]:
    report = tmp / f"r{ram}.json"
    ids = ",".join(str((i * 37) % 6000 + 10) for i in range(160))
    r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, "generate", str(pack), "--prompt-ids", ids, "-n", "64",
                        "--temperature", "0", "--ignore-eos", "--ram", str(ram), "--prefetch-depth", "0",
                        "--stats-json", str(report)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                                          "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.rsplit("RSS ", 1)[1])
    return m["peak"] - m["base"], json.loads(report.read_text())["cache"]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from /proc")
def test_peak_memory_grows_with_ram_and_stays_under_it(shared_model, tmp_path):
    """On a CPU, the process's anonymous memory above the torch baseline stays under --ram plus a
    stated allowance (24 MiB), and grows with --ram as the slots fill."""
    from tests.cache_helpers import make_deepseek_pack

    pack = make_deepseek_pack(shared_model, tmp_path)
    _, figure = inspect_minimum(pack)
    low = parse_size(figure) + 16 * 28672
    high = parse_size(figure) + 320 * 28672
    grown_low, cache_low = peak_rss(pack, low, tmp_path)
    grown_high, cache_high = peak_rss(pack, high, tmp_path)
    for grown, ram in ((grown_low, low), (grown_high, high)):
        assert grown <= ram + ALLOWANCE, f"peak {grown / 2**20:.1f} MiB over --ram {ram / 2**20:.1f} MiB + allowance"
    def slots_filled(cache):  # every miss fills a slot until the tier is full, then evicts
        ram = cache["tiers"]["ram"]
        return min(ram["capacity"], ram["misses"])

    filled = (slots_filled(cache_high) - slots_filled(cache_low)) * 28672
    # measured: +3.9..9.7 MiB for 8.3 MiB more slots filled (allocator slack differs run to run)
    assert filled > 4 << 20 and grown_high - grown_low >= filled // 4, (grown_low, grown_high, filled)


# --------------------------------------------------------------------------- CUDA
def device_used(device) -> int:
    free, total = torch.cuda.mem_get_info(device)
    return total - free


@pytest.mark.gpu
def test_gpu_budget_holds_on_the_device_with_misses_computed_on_the_cpu(shared_model, tmp_path):
    """The device's real memory use (mem_get_info: CUDA context growth, cuBLAS workspaces, allocator
    fragmentation included) stays within --gpu-mem above the baseline, with a budget small enough that
    experts miss and `--miss cpu` computes some of them on the CPU; tokens equal all-resident ones."""
    from tests.cache_helpers import make_deepseek_pack

    pack = make_deepseek_pack(shared_model, tmp_path)
    device = torch.device("cuda")
    torch.cuda.init()
    torch.empty(1, device=device)  # the CUDA context exists before the baseline
    base = device_used(device)
    ids = list(range(10, 200, 3))
    ref = load_model(pack, device="cuda", dtype="bfloat16")
    want = Generator(ref).generate(ids, GenerateOptions(GREEDY, max_tokens=24, ignore_eos=True)).tokens
    del ref
    torch.cuda.empty_cache()
    base = device_used(device)
    from moe_local.runtime.inspect import summarize

    s = summarize(pack, "bfloat16")
    budget = s.memory_min_gpu + 24 * s.bytes_per_expert  # a tenth of the 384 experts
    lm = load_model(pack, device="cuda", dtype="bfloat16", provider=provider_factory(
        CacheOptions(gpu_mem=budget, ram="256MiB", miss="cpu", prefetch_depth=1)))
    peak = 0
    gen = Generator(lm, on_step=lambda _: None)
    got = []
    for event in gen.stream(ids, GenerateOptions(GREEDY, max_tokens=24, ignore_eos=True)):
        got.append(event.token)
        torch.cuda.synchronize()
        peak = max(peak, device_used(device) - base)
    report = lm.provider.report()
    lm.provider.close()
    assert got == want
    assert report["tiers"]["gpu"]["misses"] > 0 and report["cpu_computed"] > 0, report
    assert peak <= budget, f"device peak {peak / 2**20:.1f} MiB above baseline > --gpu-mem {budget / 2**20:.1f} MiB"


@pytest.mark.gpu
def test_default_gpu_budget_does_not_count_resident_weights_twice(shared_model, tmp_path):
    from moe_local.cache.budget import default_gpu_budget, module_bytes
    from tests.cache_helpers import make_deepseek_pack

    pack = make_deepseek_pack(shared_model, tmp_path)
    before = default_gpu_budget(torch.device("cuda"))
    lm = load_model(pack, device="cuda", dtype="bfloat16", provider=provider_factory(CacheOptions(prefetch_depth=0)))
    plan = lm.provider.plan
    resident = module_bytes(lm.model)
    # the budget spent on slots is what was free before loading minus the resident weights, once
    assert abs(plan.gpu_budget - before) <= 64 << 20 + resident // 10
    lm.provider.close()


@pytest.mark.gpu
def test_pinned_ram_slab_is_not_rounded_up(pack):
    lm = load_model(pack, device="cuda", dtype="bfloat16", provider=provider_factory(
        CacheOptions(gpu_mem="2GiB", ram="48MiB", prefetch_depth=0)))
    slab = lm.provider.host.slab
    stats = torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else None
    if stats is not None:
        pinned = stats.get("reserved_bytes.all.current", stats.get("allocated_bytes.all.current", 0))
        assert pinned < slab.shape[0] * slab.shape[1] * 1.1 + (4 << 20)
    lm.provider.close()
