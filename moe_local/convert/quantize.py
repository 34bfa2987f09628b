"""`moe-local quantize`: stream a checkpoint into a pack, one tensor at a time.

The whole layout (every safetensors header, every expert's offset) is planned from tensor shapes
and the schemes' `tensor_specs` before a single weight is read. Then each tensor is read from the
source's memory map, quantized and written at its planned offset; only one expert (or one
non-expert tensor) is ever held in RAM, so peak memory does not grow with the model.

The pack is written into a hidden temporary folder next to OUT, re-opened and verified (every
expert's CRC-32, every file through safe_open) and only then renamed to OUT: an interrupted or
failed run never leaves something that looks like a pack.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import psutil
import torch

from moe_local import __version__
from moe_local.errors import CheckpointError, MoeLocalError
from moe_local.units import BY_SAFETENSORS, RUN_DTYPES, layer_ranges
from moe_local.loading.checkpoint import Checkpoint
from moe_local.loading.hf_experts import CheckpointExperts
from moe_local.loading.hub import resolve_model_dir
from moe_local.models import build_model, checkpoint_experts, weight_refs
from moe_local.models.base import CausalLM
from moe_local.formats.pack import (ALIGN, BIAS, COPIED_FILES, DENSE_FILE, EXPERT_FILE, FORMAT, MANIFEST,
                                    MINOR_VERSION, PAD_PREFIX, PROJECTIONS, VERSION, Pack, PackedExpertLayout,
                                    SafetensorsPlan, SafetensorsWriter, crc32,
                                    dense_part_name, expert_tensor_name, is_pack, numel, pack_size, plan_expert_layout,
                                    tensor_bytes)
from moe_local.formats.schemes import PackedWeight
from moe_local.convert.calibration import calibrate
from moe_local.convert.recipes import Recipe, SchemeSpec, dense_spec

SHARD_BYTES = 4 << 30  # experts per file up to this size (one expert never spans two files)
_HF_BLOB = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------- the plan
@dataclass
class DenseItem:
    name: str
    shape: tuple[int, ...]
    source_bytes: int
    out_dtype: torch.dtype | None = None  # stored as-is in this dtype; None = quantized with `scheme`
    scheme: Any = None


@dataclass
class Plan:
    src: Path
    ckpt: Checkpoint
    model: CausalLM
    experts: CheckpointExperts
    recipe: Recipe
    moe_layers: list[int]
    num_experts: int
    specs: dict[tuple[int, str], SchemeSpec]
    layouts: dict[str, PackedExpertLayout]  # key -> layout (layers with identical layouts share one)
    layout_of: dict[int, str]  # layer -> key
    expert_files: list[SafetensorsPlan]
    placement: dict[tuple[int, int], tuple[int, int]]  # (layer, e) -> (file index, offset in data section)
    dense: list[DenseItem]
    dense_plan: SafetensorsPlan
    expert_source_bytes: int  # bytes of source expert tensors read (on disk, e.g. FP8 counts 1 byte)
    dense_source_bytes: int
    schemes: dict[SchemeSpec, Any] = field(default_factory=dict)

    @property
    def source_bytes(self) -> int:
        return self.expert_source_bytes + self.dense_source_bytes

    def expert_weights(self) -> int:
        return sum(self.layouts[self.layout_of[l]].weights() for l in self.moe_layers) * self.num_experts

    def expert_packed_bytes(self) -> int:
        return sum(self.layouts[self.layout_of[l]].packed_nbytes() for l in self.moe_layers) * self.num_experts

    def file_sizes(self) -> dict[str, int]:
        sizes = {DENSE_FILE: len(self.dense_plan.header({})) + self.dense_plan.cursor}
        for i, p in enumerate(self.expert_files):
            sizes[EXPERT_FILE.format(i + 1)] = len(p.header({})) + p.cursor
        return sizes


def _st_dtype(ckpt: Checkpoint, name: str) -> str:
    return ckpt.dtype(name)


def _source_nbytes(ckpt: Checkpoint, name: str) -> int:
    st = BY_SAFETENSORS.get(_st_dtype(ckpt, name))
    return numel(ckpt.shape(name)) * (st.itemsize if st is not None else 4)


def _float_dtype(st: str) -> torch.dtype:
    """A stored float dtype a model can run in (F32, BF16, F16) kept as it is; anything else as float32."""
    d = BY_SAFETENSORS.get(st)
    return d.torch if d is not None and d.name in RUN_DTYPES else torch.float32


def _is_router(name: str, shape: tuple[int, ...], num_experts: int) -> bool:
    return len(shape) == 2 and shape[0] == num_experts and name.endswith(("gate.weight", "router.weight"))


def make_plan(src: Path, recipe: Recipe, shard_bytes: int = SHARD_BYTES) -> Plan:
    """Everything about the pack except the data: schemes, layouts, headers, offsets, sizes."""
    ckpt = Checkpoint(src)
    model = build_model(ckpt.config)
    a = model.args
    moe_layers = list(a.moe_layers)
    if not moe_layers or not a.num_experts:
        raise CheckpointError("has no routed experts (nothing to pack)", src / "config.json")
    experts = checkpoint_experts(model, ckpt)
    H, I = a.hidden_size, a.moe_intermediate_size
    shapes = {"gate": (I, H), "up": (I, H), "down": (H, I)}

    schemes: dict[SchemeSpec, Any] = {}
    specs: dict[tuple[int, str], SchemeSpec] = {}
    layouts: dict[str, PackedExpertLayout] = {}
    layout_of: dict[int, str] = {}
    by_json: dict[str, str] = {}
    for layer in moe_layers:
        per_proj = {}
        for proj in PROJECTIONS:
            spec = recipe.scheme_for(layer, proj, moe_layers)
            specs[(layer, proj)] = spec
            if spec not in schemes:
                schemes[spec] = spec.build()
            per_proj[proj] = schemes[spec]
        layout = plan_expert_layout(per_proj, shapes, biases=model.checkpoint_map.expert_biases is not None)
        key = json.dumps(layout.to_json(), sort_keys=True)
        if key not in by_json:
            by_json[key] = str(layer)
            layouts[str(layer)] = layout
        layout_of[layer] = by_json[key]

    for first, last, spec in recipe.layers:
        if not any(first <= l <= last for l in moe_layers):
            raise MoeLocalError(
                f"--layers {first}-{last}={spec.label()} matches no MoE layer (MoE layers: {layer_ranges(moe_layers, sep=',')})")

    # expert shards: one aligned range per expert, never split across files
    files: list[SafetensorsPlan] = [SafetensorsPlan()]
    placement: dict[tuple[int, int], tuple[int, int]] = {}
    for layer in moe_layers:
        layout = layouts[layout_of[layer]]
        for e in range(a.num_experts):
            cur = files[-1]
            if cur.cursor and cur.cursor + layout.nbytes > shard_bytes:
                files.append(cur := SafetensorsPlan())
            cur.pad_to(ALIGN)
            start = cur.cursor
            for proj in PROJECTIONS:
                for t in layout.projections[proj].tensors:
                    off = cur.add(expert_tensor_name(layer, e, proj, t.name), t.dtype, t.shape)
                    assert off == start + t.offset, "layout and file plan disagree"
            placement[(layer, e)] = (len(files) - 1, start)

    expert_src = 0  # bytes of source tensors read (fused tensors: all experts at once)
    for layer in moe_layers:
        total = sum(_source_nbytes(ckpt, n) for n in experts.tensor_names(layer, 0))
        expert_src += total if experts.is_fused(layer) else total * a.num_experts

    # non-expert weights: exactly what load_weights reads (the same walk), nothing else (no MTP layers)
    dense: list[DenseItem] = []
    dense_plan = SafetensorsPlan()
    spec = dense_spec(recipe.dense)
    dense_scheme = spec.build() if spec is not None else None
    for ref in weight_refs(model, ckpt):
        name, shape = ref.name, ref.shape
        item = DenseItem(name, shape, _source_nbytes(ckpt, name))
        st = _st_dtype(ckpt, name)
        if st in BY_SAFETENSORS and not BY_SAFETENSORS[st].torch.is_floating_point:
            item.out_dtype = BY_SAFETENSORS[st].torch  # integer tables (DeepSeek-V4's tid2eid) as they are
        elif ref.fp32:
            item.out_dtype = torch.float32  # keep_fp32 parameters (V4's hyper-connection maps) stay exact
        elif len(shape) != 2:
            item.out_dtype = _float_dtype(st)  # norms, biases, router bias: never rounded
        elif dense_scheme is not None and not _is_router(name, shape, a.num_experts):
            item.scheme = dense_scheme
        else:
            item.out_dtype = torch.bfloat16
        if item.scheme is not None:
            for part, (pshape, pdtype) in item.scheme.tensor_specs(shape).items():
                dense_plan.add(dense_part_name(name, part), pdtype, tuple(pshape))
        else:
            dense_plan.add(name, item.out_dtype, shape)
        dense.append(item)

    return Plan(src, ckpt, model, experts, recipe, moe_layers, a.num_experts, specs, layouts, layout_of, files,
                placement, dense, dense_plan, expert_src, sum(d.source_bytes for d in dense), schemes)


# --------------------------------------------------------------------------- size plan summary
@dataclass(frozen=True)
class PlanRow:
    """One line of the size plan: a tensor group (projection None: a whole expert's byte range)."""

    layers: list[int]
    projection: str | None
    scheme: str
    shape: tuple[int, ...]
    bits_per_weight: float  # scales included
    nbytes: int  # per expert


def plan_rows(plan: Plan) -> list[PlanRow]:
    """Per tensor group: the layers sharing a projection's scheme and size, then each expert layout."""
    groups: dict[tuple, list[int]] = {}
    for layer in plan.moe_layers:
        layout = plan.layouts[plan.layout_of[layer]]
        for proj in PROJECTIONS:
            p = layout.projections[proj]
            key = (proj, plan.specs[(layer, proj)].label(), p.shape, p.packed_nbytes())
            groups.setdefault(key, []).append(layer)
    rows = [PlanRow(layers, proj, label, shape, 8 * nbytes / numel(shape), nbytes)
            for (proj, label, shape, nbytes), layers in groups.items()]
    for key, layout in plan.layouts.items():
        layers = [l for l in plan.moe_layers if plan.layout_of[l] == key]
        rows.append(PlanRow(layers, None, "", (), 8 * layout.packed_nbytes() / layout.weights(), layout.nbytes))
    return rows


def plan_summary(plan: Plan, ref: str | None = None) -> dict:
    """The sizes a dry run predicts, measured the way `pack_size` measures a written pack:
    weight files (tensors + safetensors headers + alignment padding) and the other files (the
    manifest, estimated from the plan, and the config/tokenizer files copied as they are)."""
    sizes = plan.file_sizes()
    experts_bytes = sum(v for k, v in sizes.items() if k != DENSE_FILE)
    weight_bytes = sum(sizes.values())
    copied = sum((plan.src / f).stat().st_size for f in COPIED_FILES if (plan.src / f).is_file())
    manifest = _manifest_estimate(plan, str(plan.src) if ref is None else ref)
    return {
        "experts": len(plan.moe_layers) * plan.num_experts,
        "expert_bits_per_weight": 8 * plan.expert_packed_bytes() / plan.expert_weights(),
        "expert_files": len(plan.expert_files),
        "expert_bytes": experts_bytes,
        "dense_scheme": plan.recipe.dense,
        "dense_bytes": sizes[DENSE_FILE],
        "weight_bytes": weight_bytes,
        "other_bytes": copied + manifest,
        "pack_bytes": weight_bytes + copied + manifest,
        "source_bytes": plan.source_bytes,
    }


# --------------------------------------------------------------------------- running
class QuantizeProgress(Protocol):
    """What a quantize run reports while it goes, phase by phase ("calibrating", "quantizing",
    "verifying"); the CLI draws each phase as a progress bar. `total` is in bytes (None: unknown),
    `count` the number of `unit`s (tensors, experts) the phase works through."""

    def begin(self, phase: str, total: int | None, count: int | str, unit: str) -> None: ...

    def advance(self, phase: str, nbytes: int, done: int = 0) -> None:
        """`nbytes` more of the phase's total, `done` more of its count."""
        ...


class _Silent:
    def begin(self, phase: str, total: int | None, count: int | str, unit: str) -> None:
        pass

    def advance(self, phase: str, nbytes: int, done: int = 0) -> None:
        pass


@dataclass
class QuantizeReport:
    out: Path
    pack_bytes: int  # every file written: weight_bytes + other_bytes (pack.pack_size)
    weight_bytes: int
    other_bytes: int
    source_bytes: int
    seconds: float  # streaming read-quantize-write phase
    total_seconds: float
    peak_rss: int  # VmHWM: includes touched pages of the memory-mapped source
    rss_before: int
    peak_anon: int  # private memory, sampled during streaming
    expert_bits_per_weight: float

    @property
    def gbps(self) -> float:
        return self.source_bytes / max(self.seconds, 1e-9) / 1e9


def _sha256(path: Path) -> str:
    """Hash of a source file; free for hub-cache files, whose blob is named by its sha256."""
    real = path.resolve()
    if path.is_symlink() and _HF_BLOB.match(real.name) and real.parent.name == "blobs":
        return real.name
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def _source_info(ref: str, src: Path, plan: Plan, hash_files: bool = True) -> dict:
    files = {p.name for p in (plan.ckpt.file_of(d.name) for d in plan.dense)}
    for layer in plan.moe_layers:
        files |= {plan.ckpt.file_of(n).name for n in plan.experts.tensor_names(layer, 0)}
    files |= {f for f in COPIED_FILES if (src / f).is_file()}
    revision = src.name if src.parent.name == "snapshots" else None
    return {
        "ref": ref,
        "path": str(src.resolve()),
        "revision": revision,
        "files": {f: {"bytes": (src / f).stat().st_size, "sha256": _sha256(src / f) if hash_files else "0" * 64}
                  for f in sorted(files)},
    }


def _check_out(src: Path, out: Path, force: bool) -> None:
    if out.resolve() == src.resolve():
        raise MoeLocalError("OUT is the source folder; choose another folder for the pack", out)
    if out.exists():
        if not force:
            raise MoeLocalError("already exists; pass --force to replace it", out)
        if not out.is_dir() or (any(out.iterdir()) and not is_pack(out)):
            raise MoeLocalError("exists and is not a moe-local pack; refusing to replace it even with --force", out)


def _write_dense(plan: Plan, tmp: Path, progress: QuantizeProgress, mem: AnonPeak) -> dict[str, int]:
    """Write the non-expert tensors; returns each stored tensor's CRC-32 (the manifest's dense checksums)."""
    writer = SafetensorsWriter(tmp / DENSE_FILE, plan.dense_plan, {"format": "pt", "moe_local": "pack-dense"})
    offsets = {e.name: e.offset for e in plan.dense_plan.entries}
    checksums: dict[str, int] = {}

    def put(stored: str, tensor: torch.Tensor) -> None:
        data = tensor_bytes(tensor)
        checksums[stored] = crc32(data)
        writer.write_at(offsets[stored], data)

    try:
        for item in plan.dense:
            t = plan.ckpt.get(item.name, shape=item.shape)
            if item.scheme is None:
                put(item.name, t.to(item.out_dtype))
            else:
                packed = _quantize(item.scheme, t, None, item.name)
                for part, p in packed.items():
                    put(dense_part_name(item.name, part), p)
            mem.sample()
            progress.advance("quantizing", item.source_bytes, done=1)
    finally:
        writer.close()
    _release_source(plan)
    return checksums


def _release_source(plan: Plan) -> None:
    """Drop the source's open shards (their memory maps): pages read so far stop counting as our RSS.

    Touched pages of a mapped file stay in the process's resident set until unmapped; re-opening a
    shard costs one header parse, so releasing after each layer keeps RSS near one layer's worth.
    """
    plan.ckpt.release()


def _quantize(scheme, w, importance: torch.Tensor | None, name: str) -> dict[str, torch.Tensor]:
    """The packed tensors of `w` in `scheme`. A source weight already packed in that very scheme
    (gpt-oss's MXFP4 codes) is kept byte for byte; one packed otherwise is dequantized first."""
    if isinstance(w, PackedWeight):
        if w.scheme == scheme:
            return {k: v.contiguous() for k, v in w.packed.items()}
        w = w.dequantize()
    try:
        return scheme.quantize(w.float(), importance=importance)
    except MoeLocalError as exc:
        raise MoeLocalError(f"tensor {name!r}: {exc}") from None


def _write_experts(plan: Plan, tmp: Path, calibration, progress: QuantizeProgress, mem: AnonPeak) -> list[dict]:
    writers = [SafetensorsWriter(tmp / EXPERT_FILE.format(i + 1), p, {"format": "pt", "moe_local": "pack-experts"})
               for i, p in enumerate(plan.expert_files)]
    ranges: list[dict] = []
    try:
        for layer in plan.moe_layers:
            key = plan.layout_of[layer]
            layout = plan.layouts[key]
            src_names = plan.experts.tensor_names(layer, 0)
            fused = plan.experts.is_fused(layer)
            per_expert = sum(_source_nbytes(plan.ckpt, n) for n in src_names) // (plan.num_experts if fused else 1)
            for e in range(plan.num_experts):
                w = plan.experts.load(layer, e)
                names = plan.experts.tensor_names(layer, e)
                buf = bytearray(layout.nbytes)
                for i, proj in enumerate(PROJECTIONS):
                    p = layout.projections[proj]
                    name = f"{names[0 if i < 2 else 1]}[{e}]" if fused else names[i]
                    imp = calibration.importance(layer, e, proj) if calibration is not None else None
                    packed = _quantize(plan.schemes[plan.specs[(layer, proj)]], getattr(w, proj), imp, name)
                    bias = getattr(w, f"{proj}_bias")
                    if any(t.name == BIAS for t in p.tensors):
                        if bias is None:
                            raise MoeLocalError(f"{name}: the checkpoint has no bias for this expert's {proj}")
                        packed = {**packed, BIAS: bias.float()}
                    for t in p.tensors:
                        got = packed.get(t.name)
                        if got is None or got.dtype != t.dtype or tuple(got.shape) != t.shape:
                            raise MoeLocalError(
                                f"scheme {p.scheme!r} produced {t.name!r} unlike its tensor_specs for {name!r} (a bug)")
                        buf[t.offset : t.offset + t.nbytes] = tensor_bytes(got)
                mem.sample()
                fidx, start = plan.placement[(layer, e)]
                writers[fidx].write_at(start, buf)
                ranges.append({
                    "layer": layer, "expert": e, "file": EXPERT_FILE.format(fidx + 1),
                    "offset": writers[fidx].data_start + start, "length": layout.nbytes,
                    "crc32": crc32(buf), "layout": key,
                })
                progress.advance("quantizing", per_expert, done=3)
            _release_source(plan)
    finally:
        for w in writers:
            w.close()
    return ranges


def _verify(tmp: Path, progress: QuantizeProgress) -> None:
    pack = Pack(tmp)  # every file through safe_open, every range inside its file
    try:
        ranges = list(pack._ranges.values())
        total = sum(r.length for r in ranges)
        progress.begin("verifying", total, len(ranges), "experts")
        buf = torch.empty(pack.max_expert_nbytes(), dtype=torch.uint8)
        for r in ranges:
            pack.read_into(r.layer, r.expert, buf, verify=True)
            progress.advance("verifying", r.length, done=1)
        for name in pack.names():  # non-expert tensors decode with their recorded shapes
            pack.shape(name)
    finally:
        pack.close()


def _rss() -> int:
    return psutil.Process().memory_info().rss


class AnonPeak:
    """Peak anonymous (private) RSS, sampled after each tensor: the memory the quantizer really holds.

    Plain RSS also counts the source's memory-mapped pages that were touched; those are page cache
    the kernel drops at will, so they say nothing about how much RAM quantizing needs.
    """

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = 0
        self.sample()

    def sample(self) -> None:
        m = self.proc.memory_info()
        self.peak = max(self.peak, m.rss - getattr(m, "shared", 0))


def quantize(
    src_ref: str | Path,
    out: str | Path,
    recipe: Recipe,
    *,
    calibration_path: str | Path | None = None,
    calibration_tokens: int = 4096,
    force: bool = False,
    dry_run: bool = False,
    progress: QuantizeProgress | None = None,
    shard_bytes: int = SHARD_BYTES,
    revision: str | None = None,
    note: Callable[[str], None] | None = None,
) -> QuantizeReport | Plan:
    """Quantize `src_ref` into a pack at `out` (with dry_run: only plan it, and return the plan).

    `progress` hears each phase as it runs (see QuantizeProgress), `note` one-line remarks (stale
    partial folders removed); nothing is printed here. SIGINT, SIGTERM and SIGHUP while writing
    remove the partial folder before the exception (KeyboardInterrupt / Terminated) propagates."""
    t_start = time.perf_counter()
    rss_before = _rss()
    src = resolve_model_dir(src_ref, revision)
    if is_pack(src):
        raise MoeLocalError(
            "is already a moe-local pack; quantize from the original checkpoint (packs are not re-quantized)", src
        )
    out = Path(out)
    if not dry_run:
        _check_out(src, out, force)
    plan = make_plan(src, recipe, shard_bytes)
    if dry_run:
        return plan
    progress = progress or _Silent()

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MoeLocalError(f"cannot create the folder for the pack: {exc.strerror or exc}", out.parent) from None
    _remove_stale_partials(out, note)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    with _signals_raise():
        return _write_pack(src, src_ref, out, tmp, plan, recipe, calibration_path, calibration_tokens, progress,
                           t_start, rss_before)


def _write_pack(src: Path, src_ref, out: Path, tmp: Path, plan: Plan, recipe: Recipe, calibration_path,
                calibration_tokens: int, progress: QuantizeProgress, t_start: float, rss_before: int) -> QuantizeReport:
    """Everything that writes: into `tmp`, verified, renamed to `out`; any failure removes `tmp`."""
    calibration = None
    try:
        if calibration_path is not None:
            progress.begin("calibrating", None, "?", "tokens")
            calibration = calibrate(src, calibration_path, calibration_tokens,
                                    progress=lambda n: progress.advance("calibrating", n))
        tmp.mkdir()
        for name in COPIED_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        n_tensors = len(plan.dense) + 3 * len(plan.placement)
        progress.begin("quantizing", plan.source_bytes, n_tensors, "tensors")
        t0 = time.perf_counter()
        mem = AnonPeak()
        dense_crc = _write_dense(plan, tmp, progress, mem)
        ranges = _write_experts(plan, tmp, calibration, progress, mem)
        seconds = time.perf_counter() - t0
        manifest = _manifest(plan, str(src_ref), src, ranges, calibration, dense_crc=dense_crc)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        _verify(tmp, progress)
        _install(tmp, out)
    except OSError as exc:  # read-only folder, full disk, quota: one line about OUT, nothing left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise MoeLocalError(f"cannot write the pack: {exc.strerror or exc} ({exc.filename or tmp}); "
                            f"nothing was left behind", out) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = pack_size(out)  # the same measure `inspect` reports
    return QuantizeReport(
        out=out,
        pack_bytes=size.total,
        weight_bytes=size.weight_bytes,
        other_bytes=size.other_bytes,
        source_bytes=plan.source_bytes,
        seconds=seconds,
        total_seconds=time.perf_counter() - t_start,
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        rss_before=rss_before,
        peak_anon=mem.peak,
        expert_bits_per_weight=8 * plan.expert_packed_bytes() / plan.expert_weights(),
    )


def _manifest_estimate(plan: Plan, ref: str) -> int:
    """Bytes of the manifest the run would write: the real one built from the plan, with the values
    only writing gives (offsets, checksums, source hashes) at their widest. An upper bound within a
    few bytes per expert; no tensor is read and no file hashed."""
    ranges = [
        {"layer": layer, "expert": e, "file": EXPERT_FILE.format(fidx + 1),
         "offset": len(plan.expert_files[fidx].header({})) + start, "length": plan.layouts[plan.layout_of[layer]].nbytes,
         "crc32": 0xFFFFFFFF, "layout": plan.layout_of[layer]}
        for (layer, e), (fidx, start) in plan.placement.items()
    ]
    widest = {e.name: 0xFFFFFFFF for e in plan.dense_plan.entries if not e.name.startswith(PAD_PREFIX)}
    manifest = _manifest(plan, ref, plan.src, ranges, None, hash_files=False, dense_crc=widest)
    return len((json.dumps(manifest, indent=1) + "\n").encode("utf-8"))


def _manifest(plan: Plan, ref: str, src: Path, ranges: list[dict], calibration, hash_files: bool = True,
              dense_crc: dict[str, int] | None = None) -> dict:
    dense_quantized = {
        d.name: {
            "scheme": d.scheme.name, "params": d.scheme.params, "shape": list(d.shape),
            "parts": {part: dense_part_name(d.name, part) for part in d.scheme.tensor_specs(d.shape)},
        }
        for d in plan.dense if d.scheme is not None
    }
    recipe = plan.recipe.to_json()
    if calibration is not None:
        recipe["calibration"] = calibration.summary()
    return {
        "format": FORMAT,
        "version": VERSION,
        "minor_version": MINOR_VERSION,
        "created_by": f"moe-local {__version__}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": _source_info(ref, src, plan, hash_files),
        "model_type": plan.ckpt.config.get("model_type"),
        "recipe": recipe,
        "dense": {
            "file": DENSE_FILE,
            "scheme": plan.recipe.dense,
            "params": {} if not dense_quantized else next(iter(dense_quantized.values()))["params"],
            "quantized": dense_quantized,
            "checksums": dict(dense_crc or {}),  # stored tensor -> CRC-32, checked when it is read
        },
        "experts": {
            "moe_layers": plan.moe_layers,
            "num_experts": plan.num_experts,
            "hidden_size": plan.model.args.hidden_size,
            "intermediate_size": plan.model.args.moe_intermediate_size,
            "alignment": ALIGN,
            "checksum": "crc32",
            "files": [EXPERT_FILE.format(i + 1) for i in range(len(plan.expert_files))],
            "layouts": {k: v.to_json() for k, v in plan.layouts.items()},
            "ranges": ranges,
        },
    }


STALE_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)$")


def _remove_stale_partials(out: Path, note: Callable[[str], None] | None = None) -> list[Path]:
    """Remove the temporary folders (`.NAME.partial-PID`, `.NAME.old-PID`) that earlier runs killed
    by SIGKILL or a power loss left next to OUT, for any output name, when process PID no longer
    exists. A live PID's folder is another quantize still running: it is never touched."""
    removed = []
    for path in sorted(out.parent.glob(".*-*")):
        m = STALE_PATTERN.match(path.name)
        if m is None or not path.is_dir():
            continue
        pid = int(m["pid"])
        if pid != os.getpid() and not psutil.pid_exists(pid):
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            if note is not None:
                note(f"removed {path} ({size:,} bytes), left by an interrupted quantize (process {pid} is gone)")
    return removed


class Terminated(KeyboardInterrupt):
    """SIGTERM / SIGHUP while quantizing, raised in the main thread so the cleanup path runs.

    A KeyboardInterrupt subclass on purpose: everything that already unwinds on Ctrl-C (removing the
    partial folder, closing files) unwinds the same way; `signum` gives the exit status 128 + N."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def _signals_raise() -> Iterator[None]:
    """While writing, turn SIGTERM and SIGHUP into `Terminated` (the default action would kill the
    process before the partial output could be removed). SIGINT already raises KeyboardInterrupt.
    Only the main thread can install handlers; elsewhere (a server's worker) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _install(tmp: Path, out: Path) -> None:
    """Rename the verified pack into place; a replaced pack (--force) is removed only afterwards."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
