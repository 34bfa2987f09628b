"""A real `moe-local serve` process on 127.0.0.1 (a free port) for the server tests, and a strict parser
for the Prometheus text format its /metrics speaks.

The server runs as a subprocess, exactly as a user starts it, so signals, exit codes and the log
lines on stderr are the real ones. It binds port 0 and announces the port it got, so tests never
race for a free port.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"serving \S+ at http://127\.0\.0\.1:(\d+)/v1 ")
START_TIMEOUT_S = 90


class ServerProcess:
    """`python -m moe_local.cli.app serve MODEL --port 0 ...`, its stderr collected line by line."""

    def __init__(self, model: Path, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "COLUMNS": "400"}
        # On the CPU like the references, so the tests mean the same on a machine with a GPU.
        cmd = [sys.executable, "-m", "moe_local.cli.app", "serve", str(model), "--host", "127.0.0.1",
               "--port", "0", "--device", "cpu", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                     cwd=ROOT)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        line = self.wait_for_line(lambda l: READY.search(l) is not None, START_TIMEOUT_S)
        self.port = int(READY.search(line).group(1))
        self.url = f"http://127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for_line(self, pred, timeout: float, start: int = 0) -> str:
        """The first stderr line from index `start` on that satisfies `pred` (fails on timeout or exit)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    if pred(line):
                        return line
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError("server exited (%s):\n%s" % (self.proc.returncode, "\n".join(self.lines)))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("no such server line in %.0f s:\n%s" % (timeout, "\n".join(self.lines)))
                self._cond.wait(min(left, 0.5))

    def request_lines(self) -> list[str]:
        with self._cond:
            return [l for l in self.lines if re.match(r"\d\d:\d\d:\d\d (GET|POST|PUT|DELETE) ", l)]

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError("server did not exit within %.0f s of signal %d" % (timeout, sig))
        finally:
            self._reader.join(10)


def raw_post(port: int, path: str, body: dict, key: str | None = None, timeout: float = 30) -> socket.socket:
    """Send one HTTP/1.1 POST and return the socket unread (to hold a place in the queue, or hang up)."""
    data = json.dumps(body).encode()
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n")
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(head.encode() + data)
    return s


def read_status(s: socket.socket) -> tuple[int, bytes]:
    """Status code and whatever came back until the server closed or a first response was whole."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    status = int(buf.split(b" ", 2)[1])
    return status, buf


# ------------------------------------------------------------------ Prometheus text format (0.0.4)
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(\{{(.*)\}})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')
_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


def _float(text: str) -> float:
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("Inf", "inf").replace("NaN", "nan"))
    if not re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", text):
        raise AssertionError(f"not a sample value: {text!r}")
    return float(text)


def parse_prometheus(text: str) -> dict[str, dict[tuple, float]]:
    """Samples by name -> {sorted label pairs: value}; AssertionError on anything the format forbids."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples: dict[str, dict[tuple, float]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        assert line, f"line {n}: empty line"
        if line.startswith("#"):
            parts = line.split(" ", 3)
            assert len(parts) >= 3 and parts[1] in ("HELP", "TYPE"), f"line {n}: bad comment {line!r}"
            name = parts[2]
            assert re.fullmatch(_NAME, name), f"line {n}: bad metric name {name!r}"
            if parts[1] == "TYPE":
                assert len(parts) == 4 and parts[3] in _TYPES, f"line {n}: bad TYPE {line!r}"
                assert name not in types, f"line {n}: second TYPE for {name}"
                assert name not in samples, f"line {n}: TYPE after samples of {name}"
                types[name] = parts[3]
            else:
                assert name not in helps, f"line {n}: second HELP for {name}"
                helps.add(name)
            continue
        m = _SAMPLE.match(line)
        assert m, f"line {n}: not a sample {line!r}"
        name, _, body, value = m.groups()
        labels: list[tuple[str, str]] = []
        if body:
            pos = 0
            while pos < len(body):
                lm = _LABEL.match(body, pos)
                assert lm, f"line {n}: bad labels {body!r}"
                labels.append((lm.group(1), lm.group(2)))
                pos = lm.end()
        family = name
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and types.get(name[: -len(suffix)]) == "histogram":
                family = name[: -len(suffix)]
        assert family in types, f"line {n}: sample {name} has no TYPE line before it"
        key = tuple(sorted(labels))
        assert key not in samples.get(name, {}), f"line {n}: duplicate sample {name}{key}"
        v = _float(value)
        if types[family] in ("counter", "histogram"):
            assert v >= 0 and not math.isnan(v), f"line {n}: negative {types[family]} {name}"
        samples.setdefault(name, {})[key] = v
    for name, kind in types.items():
        if kind != "histogram":
            continue
        buckets = sorted(((_float(dict(k)["le"]), v) for k, v in samples.get(f"{name}_bucket", {}).items()))
        assert buckets and math.isinf(buckets[-1][0]), f"{name}: no le=\"+Inf\" bucket"
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), f"{name}: buckets are not cumulative"
        assert buckets[-1][1] == samples[f"{name}_count"][()], f"{name}: +Inf bucket != _count"
        assert () in samples.get(f"{name}_sum", {}), f"{name}: no _sum"
    return samples


def value(samples: dict, name: str, absent: float | None = None, **labels: str) -> float:
    """One sample's value; `absent` for a label set the server has not counted yet (Prometheus
    exports a labelled counter only once it has been incremented), otherwise a missing one fails."""
    series = samples.get(name, {})
    key = tuple(sorted(labels.items()))
    if absent is not None and key not in series:
        return absent
    return series[key] if absent is not None else samples[name][key]
