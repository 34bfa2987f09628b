"""The routing trace: which experts every token used in every MoE layer, as JSON Lines.

Why a file: cache policies, sizes and prefetch depths are cheap to compare offline on *real* routing
(`moe-local simulate`), while a real run costs minutes per configuration. The format is one header
line followed by one line per token in execution order:

    {"format": "moe-local-trace", "version": 1, "model": ..., "num_experts": E, "top_k": k,
     "moe_layers": [...], "expert_bytes": n}
    {"t": 0, "phase": "prefill", "experts": [[...], ...], "predicted": {"1": [null, [...], ...]}}

`predicted["d"][i]` holds the ids predicted for `moe_layers[i]` d MoE layers earlier (null where no
prediction was made); for i < d the prediction was made before the first MoE layer ran (from a dense
layer's MLP input or the first MoE layer's attention input, see models/lookahead.py). An optional
integer "pass" per token names the model call that ran it (the tokens of one prefill call share it). Extra header keys are kept (in `Trace.extra`).

`TraceWriter` writes to a temporary name and renames on close, so a crashed run never leaves a
truncated trace under the requested name. `TraceRecorder` feeds it from the tiered cache, which sees
one layer of a forward pass at a time (the only writer of the format: benchmarks, tests and the
runtime all go through `TraceWriter`). `read_trace` checks every line and raises a one-line
`MoeLocalError` naming the file, the line number and what is wrong.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Mapping, Sequence

from moe_local.errors import MoeLocalError

TRACE_FORMAT = "moe-local-trace"
TRACE_VERSION = 1
PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class TraceToken:
    t: int
    phase: str
    experts: list[list[int]]  # experts[i] = ids used by moe_layers[i]
    predicted: dict[int, list[list[int] | None]] = field(default_factory=dict)  # depth -> per layer
    pass_id: int | None = None  # which model call ran this token (optional "pass": a chunked prefill)


@dataclass
class Trace:
    model: str
    num_experts: int
    top_k: int
    moe_layers: list[int]
    expert_bytes: int
    tokens: list[TraceToken]
    extra: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def prediction_depths(self) -> list[int]:
        """Depths with at least one prediction in the trace."""
        return sorted({d for tok in self.tokens for d, v in tok.predicted.items() if any(x is not None for x in v)})


class TraceWriter:
    """Append-only trace writer: header on open, one `record` per token, atomic rename on `close`."""

    def __init__(
        self,
        path: str | Path,
        *,
        model: str,
        num_experts: int,
        top_k: int,
        moe_layers: Sequence[int],
        expert_bytes: int,
        extra: Mapping[str, object] | None = None,
    ) -> None:
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.num_experts = int(num_experts)
        self.moe_layers = [int(x) for x in moe_layers]
        header = {
            "format": TRACE_FORMAT,
            "version": TRACE_VERSION,
            "model": str(model),
            "num_experts": self.num_experts,
            "top_k": int(top_k),
            "moe_layers": self.moe_layers,
            "expert_bytes": int(expert_bytes),
        }
        for key, value in (extra or {}).items():
            header.setdefault(key, value)
        try:
            self._fh: IO[str] | None = open(self._tmp, "w", encoding="utf-8")
        except OSError as exc:
            raise MoeLocalError(f"cannot write the routing trace: {exc.strerror}", self.path) from None
        self._write(header)

    def _write(self, obj: dict) -> None:
        assert self._fh is not None, "TraceWriter is closed"
        self._fh.write(json.dumps(obj, separators=(",", ":")) + "\n")

    def record(
        self,
        t: int,
        phase: str,
        experts_per_layer: Sequence[Sequence[int]],
        predicted: Mapping[int | str, Sequence[Sequence[int] | None]] | None = None,
        pass_id: int | None = None,
    ) -> None:
        """One token: `experts_per_layer[i]` are the ids it used in `moe_layers[i]`; `pass_id` names
        the model call that ran it (written as "pass")."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        if len(experts_per_layer) != len(self.moe_layers):
            raise ValueError(f"expected experts for {len(self.moe_layers)} MoE layers, got {len(experts_per_layer)}")
        obj: dict = {"t": int(t), "phase": phase}
        if pass_id is not None:
            obj["pass"] = int(pass_id)
        obj["experts"] = [[int(e) for e in ids] for ids in experts_per_layer]
        if predicted:
            obj["predicted"] = {
                str(int(d)): [None if ids is None else [int(e) for e in ids] for ids in per_layer]
                for d, per_layer in predicted.items()
            }
        self._write(obj)

    @property
    def closed(self) -> bool:
        return self._fh is None

    def close(self) -> None:
        if self._fh is None:
            return
        self._fh.close()
        self._fh = None
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop the partial trace (the requested path is left untouched)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class TraceRecorder:
    """The tiered cache's side of `--trace FILE`: per-layer calls in, per-token lines out.

    The provider sees one layer of a forward pass at a time; a token's line needs all its layers, so
    the pass's tokens are buffered and handed to the `TraceWriter` when the next pass begins (or on
    close). Every token carries "pass" (a chunked prefill is several passes) for `future_from_trace`.
    """

    def __init__(self, path: str | Path, model: str, num_experts: int, top_k: int,
                 moe_layers: Sequence[int], expert_bytes: int, budget: Mapping[str, object] | None = None) -> None:
        """budget: how the run's budget was spent besides expert slots ({"slot_bytes", "fixed_bytes",
        "device"}), written into the header so `simulate --budget` turns a byte figure into the
        same slot count `--ram` / `--gpu-mem` did."""
        self.writer = TraceWriter(path, model=model, num_experts=num_experts, top_k=top_k,
                                  moe_layers=moe_layers, expert_bytes=expert_bytes,
                                  extra={"budget": dict(budget)} if budget else None)
        self.moe_layers = self.writer.moe_layers
        self.index = {l: i for i, l in enumerate(self.moe_layers)}
        self.t = 0
        self.passes = 0
        self.phase = "decode"
        self.experts: list[list[list[int]]] = []  # [token][moe layer index] -> ids
        self.predicted: dict[int, list[list[int] | None]] = {}  # depth -> per layer, for the pass's last token

    @property
    def path(self) -> Path:
        return self.writer.path

    def begin_pass(self, T: int) -> None:
        self.flush()
        self.phase = "prefill" if T > 1 else "decode"
        self.experts = [[[] for _ in self.moe_layers] for _ in range(T)]

    def layer(self, layer: int, ids: list[list[int]]) -> None:
        i = self.index[layer]
        for row, token_ids in zip(self.experts, ids):
            row[i] = token_ids

    def predicted_ids(self, depth: int, layer: int, ids: list[int]) -> None:
        """Prediction made `depth` MoE layers ahead for `layer`, attached to the pass's last token."""
        if self.experts:
            self.predicted.setdefault(depth, [None] * len(self.moe_layers))[self.index[layer]] = ids

    def flush(self) -> None:
        last = len(self.experts) - 1
        for i, row in enumerate(self.experts):
            self.writer.record(self.t, self.phase, row, self.predicted if i == last else None, pass_id=self.passes)
            self.t += 1
        if self.experts:
            self.passes += 1
        self.experts, self.predicted = [], {}

    def close(self) -> None:
        if self.writer.closed:
            return
        self.flush()
        self.writer.close()


def _ids(value: object, num_experts: int, where: str, path: Path) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in value):
        raise MoeLocalError(f"{where}: expected a list of expert ids", path)
    bad = [e for e in value if not 0 <= e < num_experts]
    if bad:
        raise MoeLocalError(f"{where}: expert id {bad[0]} out of range 0..{num_experts - 1}", path)
    return value


def check_format_marker(obj: object, fmt: str, version: int, kind: str, path: Path, where: str = "") -> None:
    """The `"format"` / `"version"` pair every moe-local JSON file opens with (traces, run reports)."""
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise MoeLocalError(f'{where}not a moe-local {kind} (expected "format": "{fmt}")', path)
    if obj.get("version") != version:
        raise MoeLocalError(
            f"{where}unsupported {kind} version {obj.get('version')!r} (this moe-local reads {version})", path
        )


def _parse_header(line: str, path: Path) -> dict:
    try:
        header = json.loads(line)
    except json.JSONDecodeError as exc:
        raise MoeLocalError(f"line 1: not a moe-local trace header (invalid JSON: {exc.msg})", path) from None
    check_format_marker(header, TRACE_FORMAT, TRACE_VERSION, "trace", path, where="line 1: ")
    for key in ("num_experts", "top_k", "expert_bytes"):
        value = header.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "expert_bytes" else 1):
            raise MoeLocalError(f"line 1: header field {key!r} must be a positive integer, got {value!r}", path)
    layers = header.get("moe_layers")
    if not isinstance(layers, list) or not layers or not all(isinstance(x, int) for x in layers):
        raise MoeLocalError("line 1: header field 'moe_layers' must be a non-empty list of layer indices", path)
    return header


def read_trace(path: str | Path) -> Trace:
    """Load and validate a whole trace (they are small: 6 ints per layer per token)."""
    path = Path(path)
    if not path.is_file():
        raise MoeLocalError("trace file not found" if not path.exists() else "not a file", path)
    try:
        return _read_trace(path)
    except UnicodeDecodeError:
        raise MoeLocalError("not a text file; expected a moe-local trace (JSON lines)", path) from None
    except OSError as exc:
        raise MoeLocalError(f"cannot read the trace: {exc.strerror}", path) from None


def _read_trace(path: Path) -> Trace:
    with open(path, encoding="utf-8") as fh:
        first = fh.readline()
        if not first.strip():
            raise MoeLocalError("empty file, expected a moe-local trace", path)
        header = _parse_header(first, path)
        num_experts, n_layers = header["num_experts"], len(header["moe_layers"])
        tokens: list[TraceToken] = []
        for lineno, line in enumerate(fh, start=2):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MoeLocalError(f"line {lineno}: invalid JSON ({exc.msg}); is the trace truncated?", path) from None
            if not isinstance(rec, dict):
                raise MoeLocalError(f"line {lineno}: expected a JSON object per token", path)
            t, phase, experts = rec.get("t"), rec.get("phase"), rec.get("experts")
            if not isinstance(t, int):
                raise MoeLocalError(f"line {lineno}: missing integer 't'", path)
            if phase not in PHASES:
                raise MoeLocalError(f"line {lineno}: 'phase' must be 'prefill' or 'decode', got {phase!r}", path)
            if not isinstance(experts, list) or len(experts) != n_layers:
                raise MoeLocalError(
                    f"line {lineno}: 'experts' must list the ids of all {n_layers} MoE layers", path
                )
            experts = [_ids(ids, num_experts, f"line {lineno}", path) for ids in experts]
            predicted: dict[int, list[list[int] | None]] = {}
            raw_pred = rec.get("predicted")
            if raw_pred is not None:
                if not isinstance(raw_pred, dict):
                    raise MoeLocalError(f"line {lineno}: 'predicted' must be an object keyed by depth", path)
                for d, per_layer in raw_pred.items():
                    if not (isinstance(d, str) and d.isdigit() and int(d) >= 1):
                        raise MoeLocalError(f"line {lineno}: prediction depth {d!r} must be an integer >= 1", path)
                    if not isinstance(per_layer, list) or len(per_layer) != n_layers:
                        raise MoeLocalError(
                            f"line {lineno}: predicted[{d!r}] must have one entry (or null) per MoE layer", path
                        )
                    predicted[int(d)] = [
                        None if ids is None else _ids(ids, num_experts, f"line {lineno}", path) for ids in per_layer
                    ]
            pass_id = rec.get("pass")
            if pass_id is not None and not isinstance(pass_id, int):
                raise MoeLocalError(f"line {lineno}: 'pass' must be an integer", path)
            tokens.append(TraceToken(t=t, phase=phase, experts=experts, predicted=predicted, pass_id=pass_id))
    known = {"format", "version", "model", "num_experts", "top_k", "moe_layers", "expert_bytes"}
    return Trace(
        model=str(header.get("model", "")),
        num_experts=num_experts,
        top_k=header["top_k"],
        moe_layers=list(header["moe_layers"]),
        expert_bytes=header["expert_bytes"],
        tokens=tokens,
        extra={k: v for k, v in header.items() if k not in known},
        path=path,
    )
