"""`moe-local report`: render a run report (the contract's JSON), bad files, and `--plot`."""

from __future__ import annotations

import importlib.util
import json

import pytest
from typer.testing import CliRunner

from moe_local.runtime.report import load_report
from moe_local.cli.app import app
from moe_local.errors import MoeLocalError

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
runner = CliRunner()


def sample_report(gpu: bool = True) -> dict:
    tiers = {"ram": {"capacity": 192, "hits": 300, "misses": 84, "evictions": 20}}
    if gpu:
        tiers = {"gpu": {"capacity": 96, "hits": 2250, "misses": 1350, "evictions": 1200}, **tiers}
    return {
        "format": "moe-local-run-report", "version": 1,
        "model": "pycode-deepseek", "device": "cuda:0" if gpu else "cpu", "dtype": "bfloat16",
        "options": {"gpu_mem": 6 << 30 if gpu else None, "ram": 16 << 30, "policy": "arc", "prefetch_depth": 1,
                    "prefetch_extra": 2, "miss": "auto"},
        "tokens": {"prompt": 12, "generated": 100},
        "timings": {"ttft_s": 0.0421, "prompt_tps": 285.0, "gen_tps": 31.25,
                    "token_latency_s": {"mean": 0.032, "p50": 0.030, "p90": 0.041, "p99": 0.0873},
                    "token_latencies_s": [0.03 + 0.0005 * (i % 20) for i in range(100)]},
        "cache": {
            "hit_rate": 0.625,
            "tiers": tiers,
            "layers": [{"layer": 1, "uses": 600, "hits": 450, "misses": 150, "hit_rate": 0.75},
                       {"layer": 2, "uses": 600, "hits": 300, "misses": 300, "hit_rate": 0.5}],
            "prefetch": {"issued": 900, "used": 630, "late": 45, "wasted": 270, "precision": 0.7, "recall": 0.55},
            "bytes": {"disk_to_ram": 3 << 20, "ram_to_gpu": 150 << 20, "per_token": 1.5 * (1 << 20)},
            "stall_s": 0.8, "cpu_computed": 17,
        },
    }


def write(tmp_path, obj, name="run.json"):
    path = tmp_path / name
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return path


def test_report_renders_every_section(tmp_path):
    res = runner.invoke(app, ["report", str(write(tmp_path, sample_report()))])
    assert res.exit_code == 0, res.output
    text = res.stdout
    for expected in (
        "pycode-deepseek", "cuda:0 / bfloat16", "arc", "12 prompt, 100 generated",
        "42.1 ms", "31.25", "87.3 ms",  # ttft, gen tok/s, p99
        "effective hit rate 62.5%", "gpu", "ram", "62.5%", "78.1%",  # gpu 2250/3600, ram 300/384
        "900", "630", "70.0%", "55.0%",  # prefetch
        "150.00 MiB", "1.50 MiB",  # bytes ram->gpu, per token
        "75.0%", "50.0%",  # per layer
        "stalled waiting for experts: 800.0 ms", "17",
    ):
        assert expected in text, expected


def test_report_without_gpu_tier_or_prefetch(tmp_path):
    rep = sample_report(gpu=False)
    del rep["cache"]["prefetch"]
    rep["cache"]["bytes"]["ram_to_gpu"] = 0
    res = runner.invoke(app, ["report", str(write(tmp_path, rep))])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert any(line.startswith("│ ram ") for line in lines)
    assert not any(line.startswith("│ gpu ") for line in lines)  # no GPU tier row ...
    assert "ram -> gpu" not in res.stdout  # ... and no RAM -> GPU link
    assert "prefetch" not in res.stdout.split("speed")[1]  # only the options line mentions prefetch
    assert "budgets      gpu none" in res.stdout or "gpu none" in res.stdout
    assert "78.1%" in res.stdout
    assert "computed on the CPU" not in res.stdout  # meaningless without a GPU: every expert runs on the CPU


def test_report_of_a_resident_run_shows_no_empty_cache_table(tmp_path):
    """`generate --experts resident --stats-json` has no cache section: no "-" policy row, no empty tier table."""
    rep = sample_report(gpu=False)
    del rep["cache"]
    rep["options"] = {}
    res = runner.invoke(app, ["report", str(write(tmp_path, rep))])
    assert res.exit_code == 0, res.output
    assert "all resident (no expert cache)" in res.stdout
    assert "effective hit rate" not in res.stdout and "policy" not in res.stdout and "budgets" not in res.stdout
    assert "31.25" in res.stdout  # the speed table is still there


def test_report_shows_a_chat_turns_cached_prefix(tmp_path):
    rep = sample_report()
    rep["tokens"]["cached"] = 9
    res = runner.invoke(app, ["report", str(write(tmp_path, rep))])
    assert "12 prompt (9 cached), 100 generated" in res.stdout


@pytest.mark.parametrize("content, message", [
    ("{oops", "invalid JSON at line 1 column 2"),
    (json.dumps({"format": "moe-local-trace"}), "not a moe-local run report"),
    (json.dumps({**sample_report(), "version": 7}), "unsupported run report version 7"),
    (json.dumps({**sample_report(), "cache": {"layers": "many"}}), "'cache.layers' must be a list"),
])
def test_report_bad_files(tmp_path, content, message):
    path = write(tmp_path, content)
    res = runner.invoke(app, ["report", str(path)])
    assert res.exit_code == 1
    err = res.stderr.strip()
    assert message in err and str(path) in err and "\n" not in err
    with pytest.raises(MoeLocalError, match="run report|JSON|must be"):
        load_report(path)


def test_report_missing_file(tmp_path):
    res = runner.invoke(app, ["report", str(tmp_path / "nope.json")])
    assert res.exit_code == 1
    assert "nope.json: run report not found" in res.stderr


@pytest.mark.skipif(HAVE_MPL, reason="matplotlib is installed; this checks the message shown without it")
def test_plot_without_matplotlib_is_a_clear_error(tmp_path):
    res = runner.invoke(app, ["report", str(write(tmp_path, sample_report())), "--plot", str(tmp_path / "o.png")])
    assert res.exit_code == 1
    assert "--plot needs matplotlib" in res.stderr and "pip install matplotlib" in res.stderr
    assert res.stdout == ""  # it fails before rendering anything
    assert not (tmp_path / "o.png").exists()


@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib is not installed (optional; only --plot needs it)")
def test_plot_writes_a_png(tmp_path):
    out = tmp_path / "o.png"
    res = runner.invoke(app, ["report", str(write(tmp_path, sample_report())), "--plot", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp*"))
