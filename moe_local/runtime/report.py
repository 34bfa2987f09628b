"""The run report (`generate --stats-json FILE`): one JSON object, format "moe-local-run-report" v1.

The runtime assembles it from what it timed (`run_report`) plus the expert provider's own counters
(the "cache" section, `TieredExperts.report()`; absent when experts are resident), writes it
atomically, and reads it back for `moe-local report` (`load_report`), checking every part a
renderer relies on so that a bad file is one clear line, not a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from moe_local.cache.trace import check_format_marker
from moe_local.errors import MoeLocalError

REPORT_FORMAT = "moe-local-run-report"
REPORT_VERSION = 1


def run_report(*, model: str, device: str, dtype: str, options: dict, prompt_tokens: int, generated_tokens: int,
               ttft_s: float, prompt_s: float, token_latencies_s: Sequence[float], cache: dict | None) -> dict:
    """The whole `--stats-json` object (format "moe-local-run-report" v1) from what the runtime timed.

    ttft_s: prompt submitted -> first token; prompt_s: the prefill alone; token_latencies_s: one
    entry per generated token after the first. `cache` is `provider.report()` (None when resident).
    """
    lat = sorted(float(t) for t in token_latencies_s)

    def pct(p: float) -> float:
        if not lat:
            return 0.0
        return lat[min(len(lat) - 1, max(0, int(round(p / 100 * (len(lat) - 1)))))]

    gen_time = sum(lat)
    report = {
        "format": REPORT_FORMAT, "version": REPORT_VERSION,
        "model": model, "device": device, "dtype": dtype, "options": options,
        "tokens": {"prompt": int(prompt_tokens), "generated": int(generated_tokens)},
        "timings": {
            "ttft_s": float(ttft_s),
            "prompt_tps": prompt_tokens / prompt_s if prompt_s > 0 else 0.0,
            "gen_tps": len(lat) / gen_time if gen_time > 0 else 0.0,
            "token_latency_s": {"mean": gen_time / len(lat) if lat else 0.0, "p50": pct(50), "p90": pct(90),
                                "p99": pct(99)},
            "token_latencies_s": [float(t) for t in token_latencies_s],
        },
    }
    if cache is not None:
        report["cache"] = cache
    return report


def write_json_atomic(path: str | Path, obj: dict) -> Path:
    """Write to a temporary name, then rename: a crash never leaves half a report."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=1))
        tmp.replace(path)
    except OSError as exc:
        raise MoeLocalError(f"cannot write the run report: {exc.strerror}", path) from None
    return path


def load_report(path: str | Path) -> dict:
    """Read and check the parts every renderer relies on; one-line MoeLocalError otherwise."""
    path = Path(path)
    if not path.exists():
        raise MoeLocalError("run report not found", path)
    if not path.is_file():
        raise MoeLocalError("not a file", path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise MoeLocalError("not a text file; expected a JSON run report", path) from None
    except json.JSONDecodeError as exc:
        raise MoeLocalError(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}", path) from None
    check_format_marker(report, REPORT_FORMAT, REPORT_VERSION, "run report", path)
    for key in ("options", "tokens", "timings", "cache"):
        if key in report and not isinstance(report[key], dict):
            raise MoeLocalError(f"field {key!r} must be an object", path)
    cache = report.get("cache", {})
    for key in ("tiers", "prefetch", "bytes"):
        if key in cache and not isinstance(cache[key], dict):
            raise MoeLocalError(f"field 'cache.{key}' must be an object", path)
    layers = cache.get("layers", [])
    if not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
        raise MoeLocalError("field 'cache.layers' must be a list of objects", path)
    lat = report.get("timings", {}).get("token_latencies_s", [])
    if not isinstance(lat, list) or not all(_is_num(x) for x in lat):
        raise MoeLocalError("field 'timings.token_latencies_s' must be a list of numbers", path)
    return report



def check_output_dir(out: str | Path) -> None:
    """Fail before a run (or a render) whose result could not be written: a typo'd directory would
    otherwise only show after the whole generation."""
    parent = Path(out).parent
    if not parent.is_dir():
        raise MoeLocalError("directory does not exist", parent)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
