"""The moe-local pack: quantized routed experts laid out so that one expert = one aligned read.

A pack is a folder (format described in docs/pack-format.md):

- the source's `config.json`, `generation_config.json` and tokenizer files, copied as they are;
- `moe-pack.json`, the manifest: format version, source and file hashes, the scheme of every
  tensor group, and for every routed expert its file, byte offset, byte length, CRC-32 and layout;
- `model.safetensors`: the non-expert weights (attention, norms, embeddings, routers, shared
  experts, dense layers) under their checkpoint names, bf16 (or int8 codes + scales);
- `experts-0000N.safetensors`: the routed experts. All packed tensors of one expert (gate, up,
  down and their scales) sit back to back in ONE byte range starting at a multiple of 4096. The
  header is padded with spaces and gaps are filled with `__pad__.*` tensors, so each file is a
  valid safetensors file that `safe_open` opens, while the cache can move an expert with a single
  `pread` into a slot and view its tensors in place (`decode`).

This module holds the layout arithmetic and the low-level writer used by `quantize.py`, and the
reader `Pack`, which is both a tensor source for `load_weights` (same API as
`loading.checkpoint.Checkpoint`) and an `experts.ExpertBytesSource` for providers and the cache.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open

from moe_local.errors import CheckpointError, MoeLocalError
from moe_local.experts import ExpertWeights
from moe_local.formats import kernels_cpu
from moe_local.formats.schemes import PackedWeight, get_scheme
from moe_local.loading.checkpoint import check_shape, read_json
from moe_local.units import BY_SAFETENSORS, BY_TORCH, DTYPES, dtype_name

FORMAT = "moe-local-pack"
VERSION = 1
# Minor versions add optional fields a reader of the same VERSION can do without: 1 = expert
# biases (a projection's `bias` tensor in the layout, gpt-oss). Packs without them still open.
MINOR_VERSION = 1
BIAS = "bias"  # the layout tensor name of a projection's optional bias (float32 [out])
MANIFEST = "moe-pack.json"
DENSE_FILE = "model.safetensors"
EXPERT_FILE = "experts-{:05d}.safetensors"
ALIGN = 4096  # every expert range (and every file's data section) starts at a multiple of this
TENSOR_ALIGN = 16  # every packed tensor inside a range starts at a multiple of this
PROJECTIONS = ("gate", "up", "down")
PAD_PREFIX = "__pad__."
# Files copied verbatim from the source so a pack runs (and tokenizes) exactly like a checkpoint.
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

def expert_tensor_name(layer: int, expert: int, proj: str, part: str) -> str:
    """The name a packed expert tensor carries in an expert file (docs/pack-format.md)."""
    return f"model.layers.{layer}.experts.{expert}.{proj}.{part}"


def dense_part_name(name: str, part: str) -> str:
    """The stored name of one part (codes, scales) of a quantized non-expert tensor."""
    return f"{name}:{part}"


def align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def numel(shape: tuple[int, ...] | list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# --------------------------------------------------------------------------- layout of one expert
@dataclass(frozen=True)
class TensorSlot:
    """One packed tensor inside an expert's range: offset relative to the range start."""

    name: str  # e.g. "codes"; stored in files as "<proj>.<name>"
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class ProjLayout:
    scheme: str
    params: dict
    shape: tuple[int, int]  # (out, in) of the weight
    tensors: tuple[TensorSlot, ...]

    def packed_nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class PackedExpertLayout:
    """Where gate/up/down's packed tensors sit in an expert's byte range (same for all experts of a layer)."""

    projections: dict[str, ProjLayout]
    nbytes: int  # length of the range: end of the last tensor

    def packed_nbytes(self) -> int:
        return sum(p.packed_nbytes() for p in self.projections.values())

    def weights(self) -> int:
        return sum(numel(p.shape) for p in self.projections.values())

    def to_json(self) -> dict:
        return {
            "nbytes": self.nbytes,
            "projections": {
                proj: {
                    "scheme": p.scheme,
                    "params": p.params,
                    "shape": list(p.shape),
                    "tensors": {
                        t.name: {"offset": t.offset, "nbytes": t.nbytes, "dtype": dtype_name(t.dtype), "shape": list(t.shape)}
                        for t in p.tensors
                    },
                }
                for proj, p in self.projections.items()
            },
        }

    @classmethod
    def from_json(cls, data: dict, where: Path) -> "PackedExpertLayout":
        try:
            projections = {}
            for proj, p in data["projections"].items():
                slots = []
                for name, t in p["tensors"].items():
                    if t["dtype"] not in DTYPES:
                        raise CheckpointError(f"unknown dtype {t['dtype']!r} for tensor {proj}.{name}", where)
                    slot = TensorSlot(name, DTYPES[t["dtype"]].torch, tuple(t["shape"]), int(t["offset"]))
                    if slot.offset % TENSOR_ALIGN or slot.nbytes != int(t["nbytes"]):
                        raise CheckpointError(f"layout of tensor {proj}.{name} is inconsistent", where)
                    slots.append(slot)
                projections[proj] = ProjLayout(p["scheme"], dict(p["params"]), tuple(p["shape"]), tuple(slots))
            layout = cls(projections, int(data["nbytes"]))
            for proj, p in projections.items():
                if not isinstance(p.scheme, str):
                    raise CheckpointError(f"expert layout of {proj} has scheme {p.scheme!r}; expected a name", where)
                try:
                    scheme = get_scheme(p.scheme, **p.params)  # an unknown scheme or parameter fails at open
                except MoeLocalError as exc:
                    raise CheckpointError(f"expert layout of {proj}: {exc}", where) from None
                want = set(scheme.tensor_specs(p.shape))
                if {t.name for t in p.tensors} - {BIAS} != want:  # + an optional bias (minor version 1)
                    raise CheckpointError(f"expert layout of {proj} lists tensors {sorted(t.name for t in p.tensors)}; "
                                          f"scheme {p.scheme!r} stores {sorted(want)}", where)
                if len(p.shape) != 2 or not all(isinstance(n, int) and n > 0 for n in p.shape):
                    raise CheckpointError(f"expert layout of {proj} has shape {list(p.shape)}; expected [out, in]", where)
                if any(not isinstance(n, int) or n < 0 for t in p.tensors for n in t.shape):
                    raise CheckpointError(f"expert layout of {proj} has a tensor with a bad shape", where)
                bias = next((t for t in p.tensors if t.name == BIAS), None)
                if bias is not None and (bias.shape != (p.shape[0],) or bias.dtype != torch.float32):
                    raise CheckpointError(f"expert layout of {proj} has a bias of {list(bias.shape)} {bias.dtype}; "
                                          f"expected [{p.shape[0]}] float32", where)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise CheckpointError(f"malformed expert layout in the manifest ({exc!r})", where) from None
        end = max((t.offset + t.nbytes for p in projections.values() for t in p.tensors), default=0)
        if end > layout.nbytes:
            raise CheckpointError("an expert layout places tensors past its own length", where)
        return layout


def plan_expert_layout(schemes: dict[str, Any], shapes: dict[str, tuple[int, int]],
                       biases: bool = False) -> PackedExpertLayout:
    """Lay out gate, up, down back to back, each packed tensor 16-byte aligned (so `.view(dtype)` works).
    With `biases`, each projection's float32 bias [out] follows its packed tensors (named BIAS)."""
    cursor = 0
    projections: dict[str, ProjLayout] = {}
    for proj in PROJECTIONS:
        scheme, shape = schemes[proj], tuple(shapes[proj])
        slots = []
        specs = dict(scheme.tensor_specs(shape))
        if biases:
            specs[BIAS] = ((shape[0],), torch.float32)
        for name, (tshape, dtype) in specs.items():
            cursor = align_up(cursor, TENSOR_ALIGN)
            slot = TensorSlot(name, dtype, tuple(int(s) for s in tshape), cursor)
            slots.append(slot)
            cursor += slot.nbytes
        projections[proj] = ProjLayout(scheme.name, dict(scheme.params), shape, tuple(slots))
    return PackedExpertLayout(projections, cursor)


# --------------------------------------------------------------------------- writing safetensors
@dataclass
class StEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # relative to the data section

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class SafetensorsPlan:
    """The full header of a safetensors file, decided before any data is written (that is what lets
    the quantizer stream: each tensor is written at its planned offset the moment it is ready)."""

    entries: list[StEntry] = field(default_factory=list)
    cursor: int = 0
    _pads: int = 0

    def pad_to(self, align: int) -> None:
        gap = align_up(self.cursor, align) - self.cursor
        if gap:
            self.entries.append(StEntry(f"{PAD_PREFIX}{self._pads}", torch.uint8, (gap,), self.cursor))
            self._pads += 1
            self.cursor += gap

    def add(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], align: int = TENSOR_ALIGN) -> int:
        self.pad_to(align)
        entry = StEntry(name, dtype, tuple(shape), self.cursor)
        self.entries.append(entry)
        self.cursor += entry.nbytes
        return entry.offset

    def header(self, metadata: dict[str, str]) -> bytes:
        """8-byte length + JSON padded with spaces so that the data section starts at a multiple of ALIGN."""
        obj: dict[str, Any] = {"__metadata__": metadata}
        for e in self.entries:
            obj[e.name] = {"dtype": BY_TORCH[e.dtype].safetensors, "shape": list(e.shape), "data_offsets": [e.offset, e.offset + e.nbytes]}
        text = json.dumps(obj, separators=(",", ":")).encode()
        total = align_up(8 + len(text), ALIGN)
        text += b" " * (total - 8 - len(text))
        return struct.pack("<Q", len(text)) + text


class SafetensorsWriter:
    """Writes a planned safetensors file: header first, tensors at their offsets, zeros in the gaps."""

    def __init__(self, path: Path, plan: SafetensorsPlan, metadata: dict[str, str]) -> None:
        self.path = path
        self.plan = plan
        header = plan.header(metadata)
        self.data_start = len(header)
        self.f = open(path, "wb")
        self.f.write(header)
        self.f.truncate(self.data_start + plan.cursor)  # pads read back as zeros

    def write_at(self, rel_offset: int, data: bytes | memoryview) -> None:
        self.f.seek(self.data_start + rel_offset)
        self.f.write(data)

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a CPU tensor (any dtype, bf16 included) without a copy if contiguous."""
    t = t.detach().contiguous().cpu()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else memoryview(b"")


def read_st_header(path: Path) -> tuple[int, dict]:
    """(data section start, header dict) of a safetensors file, read without touching the data."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError("shorter than a safetensors header; is it truncated?", path)
            (n,) = struct.unpack("<Q", raw)
            if n > 100 << 20:
                raise CheckpointError("safetensors header length is implausible; the file is corrupt", path)
            text = f.read(n)
    except FileNotFoundError:
        raise CheckpointError("missing (named in the pack manifest)", path) from None
    if len(text) < n:
        raise CheckpointError("safetensors header is cut short; is the file truncated?", path)
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"safetensors header is not valid JSON ({exc})", path) from None
    if not isinstance(header, dict):
        raise CheckpointError("safetensors header is not a JSON object; the file is corrupt", path)
    return 8 + n, header


# --------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class PackSize:
    """A pack's bytes on disk, split the way every report states them (dry run, quantize, inspect).

    weight_bytes: the .safetensors files -- tensors plus their headers and alignment padding;
    other_bytes: the manifest and the config/tokenizer files copied from the source.
    """

    weight_bytes: int
    other_bytes: int

    @property
    def total(self) -> int:
        return self.weight_bytes + self.other_bytes


def pack_size(root: str | Path) -> PackSize:
    """Measure a written pack folder: every regular file in it, nothing else."""
    weights = other = 0
    for f in Path(root).iterdir():
        if f.is_file():
            if f.suffix == ".safetensors":
                weights += f.stat().st_size
            else:
                other += f.stat().st_size
    return PackSize(weights, other)


def is_pack(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def crc32(buf: memoryview | bytes) -> int:
    return zlib.crc32(buf) & 0xFFFFFFFF


def _frombuffer(mm: mmap.mmap) -> torch.Tensor:
    # The map is read-only on purpose (a private writable map of a 100 GB file is charged against
    # commit limits); views of it are read-only by contract, so torch's "not writable" warning is noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mm, dtype=torch.uint8)


@dataclass(frozen=True)
class ExpertRange:
    layer: int
    expert: int
    file: int  # index into the pack's expert files
    offset: int  # absolute byte offset in that file (multiple of ALIGN)
    length: int
    crc32: int
    layout: str  # key into the manifest's layouts


class Pack:
    """A moe-local pack opened read-only. Nothing is read at open beyond headers and the manifest.

    Tensor API (like `Checkpoint`): config, names(), __contains__, get(name, shape=), shape, file_of.
    Expert API (`ExpertBytesSource`): moe_layers, num_experts, expert_nbytes, max_expert_nbytes,
    view, read_into, decode, load.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.manifest_path = self.root / MANIFEST
        m = read_json(self.manifest_path)
        if m.get("format") != FORMAT:
            raise CheckpointError(f"not a moe-local pack manifest (format is {m.get('format')!r})", self.manifest_path)
        if m.get("version") != VERSION:
            raise CheckpointError(
                f"pack format version {m.get('version')!r}; this moe-local reads version {VERSION} (re-quantize)",
                self.manifest_path,
            )
        self.manifest = m
        config_path = self.root / "config.json"
        if not config_path.is_file():
            raise CheckpointError("missing config.json in the pack", config_path)
        self.config: dict = read_json(config_path)
        try:
            self._open_dense(m["dense"])
            self._open_experts(m["experts"])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise CheckpointError(f"malformed manifest ({exc!r})", self.manifest_path) from None

    # ----------------------------------------------------------------- opening
    def _open_dense(self, dense: dict) -> None:
        self.dense_path = self.root / dense["file"]
        self.dense_scheme = {"scheme": dense["scheme"], "params": dict(dense.get("params", {}))}
        self._quantized: dict[str, dict] = dict(dense.get("quantized", {}))
        # stored tensor -> CRC-32 of its bytes; packs written before checksums covered dense weights have none
        self._dense_crc: dict[str, int] = {str(k): int(v) for k, v in dict(dense.get("checksums", {})).items()}
        _, header = read_st_header(self.dense_path)
        self._dense = self._safe_open(self.dense_path)
        stored = [k for k in header if k != "__metadata__" and not k.startswith(PAD_PREFIX)]
        parts = {part for q in self._quantized.values() for part in q["parts"].values()}
        self._names = sorted([n for n in stored if n not in parts] + list(self._quantized))
        self._name_set = set(self._names)
        missing = sorted(parts - set(stored))
        if missing:
            raise CheckpointError(f"manifest names tensor {missing[0]!r} that the file lacks", self.dense_path)

    def _safe_open(self, path: Path):
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:
            raise CheckpointError(f"not a readable safetensors file ({exc}); is it truncated?", path) from None

    def _open_experts(self, ex: dict) -> None:
        self.moe_layers: list[int] = [int(x) for x in ex["moe_layers"]]
        self.num_experts: int = int(ex["num_experts"])
        if ex.get("checksum", "crc32") != "crc32":
            raise CheckpointError(f"unknown checksum {ex.get('checksum')!r}", self.manifest_path)
        self.files = [self.root / f for f in ex["files"]]
        self.layouts = {k: PackedExpertLayout.from_json(v, self.manifest_path) for k, v in ex["layouts"].items()}
        self._fds: list[int] = []
        self._maps: list[mmap.mmap | None] = []
        self._bufs: list[torch.Tensor | None] = []
        sizes = []
        for path in self.files:
            read_st_header(path)  # clear error for missing / cut files before safetensors' own
            self._safe_open(path)  # validates header against the file size: catches truncation
            fd = os.open(path, os.O_RDONLY)
            self._fds.append(fd)
            size = os.fstat(fd).st_size
            sizes.append(size)
            mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else None
            self._maps.append(mm)
            self._bufs.append(_frombuffer(mm) if mm is not None else None)
        self._ranges: dict[tuple[int, int], ExpertRange] = {}
        file_index = {name: i for i, name in enumerate(ex["files"])}
        for r in ex["ranges"]:
            if r.get("file") not in file_index:
                raise CheckpointError(f"range of layer {r.get('layer')} expert {r.get('expert')} names "
                                      f"unlisted file {r.get('file')!r}", self.manifest_path)
            rng = ExpertRange(int(r["layer"]), int(r["expert"]), file_index[r["file"]],
                              int(r["offset"]), int(r["length"]), int(r["crc32"]), str(r["layout"]))
            path = self.files[rng.file]
            where = f"layer {rng.layer} expert {rng.expert}"
            if rng.layout not in self.layouts or self.layouts[rng.layout].nbytes != rng.length:
                raise CheckpointError(f"manifest entry for {where} has a length that disagrees with its layout", path)
            if rng.offset % ALIGN:
                raise CheckpointError(f"manifest entry for {where} is not {ALIGN}-byte aligned", path)
            if rng.offset + rng.length > sizes[rng.file]:
                raise CheckpointError(
                    f"manifest puts {where} at bytes {rng.offset}..{rng.offset + rng.length}, past the end of the "
                    f"file ({sizes[rng.file]} bytes); the pack is truncated or the manifest is wrong",
                    path,
                )
            self._ranges[(rng.layer, rng.expert)] = rng
        for layer in self.moe_layers:
            for e in range(self.num_experts):
                if (layer, e) not in self._ranges:
                    raise CheckpointError(f"manifest has no entry for layer {layer} expert {e}", self.manifest_path)
        self._schemes: dict[str, Any] = {}

    def close(self) -> None:
        """Release file descriptors (maps stay alive while tensors view them)."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    # ----------------------------------------------------------------- tensor API (non-expert weights)
    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._name_set

    def file_of(self, name: str) -> Path:
        if name not in self._name_set:
            raise CheckpointError(f"tensor {name!r} not found in the pack", self.root)
        return self.dense_path

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._quantized:
            return tuple(self._quantized[name]["shape"])
        self.file_of(name)
        return tuple(self._dense.get_slice(name).get_shape())

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """One non-expert tensor; int8-stored ones are dequantized (float32) on the way out."""
        self.file_of(name)
        if name in self._quantized:
            q = self._quantized[name]
            scheme = self._scheme(q["scheme"], q.get("params", {}))
            packed = {part: self._dense_tensor(stored) for part, stored in q["parts"].items()}
            tensor = scheme.dequantize(packed, tuple(q["shape"]))
        else:
            tensor = self._dense_tensor(name)
        if shape is not None:
            check_shape(name, tuple(tensor.shape), shape, self.dense_path)
        return tensor

    def _dense_tensor(self, stored: str) -> torch.Tensor:
        """A stored non-expert tensor, its bytes checked against the manifest's CRC-32 (when it has one)."""
        tensor = self._dense.get_tensor(stored)
        want = self._dense_crc.get(stored)
        if want is not None:
            got = crc32(tensor_bytes(tensor))
            if got != want:
                raise CheckpointError(
                    f"tensor {stored!r}: checksum mismatch (crc32 {got:08x}, manifest {want:08x}); the pack is "
                    f"corrupt, quantize it again", self.dense_path)
        return tensor

    def dtype(self, name: str) -> str:
        """The stored safetensors dtype ("BF16") of a float tensor; a quantized one's is its codes'."""
        self.file_of(name)
        q = self._quantized.get(name)
        return self._dense.get_slice(q["parts"]["codes"] if q else name).get_dtype()

    def packed_nbytes(self, name: str) -> int | None:
        """Bytes of a quantized tensor's parts, from the header (None for a tensor stored as floats)."""
        q = self._quantized.get(name)
        if q is None:
            return None
        return sum(numel(self._dense.get_slice(stored).get_shape()) * BY_SAFETENSORS[
            self._dense.get_slice(stored).get_dtype()].itemsize for stored in q["parts"].values())

    def packed(self, name: str) -> PackedWeight | None:
        """A quantized non-expert tensor as it is stored (`--dense int8|int4`): a PackedWeight over
        its parts, to be computed from without expanding it; None for a tensor stored as floats."""
        q = self._quantized.get(name)
        if q is None:
            return None
        scheme = self._scheme(q["scheme"], q.get("params", {}))
        parts = {part: self._dense_tensor(stored) for part, stored in q["parts"].items()}
        return PackedWeight(scheme, parts, tuple(q["shape"]))

    # ----------------------------------------------------------------- expert API
    def expert_range(self, layer: int, expert: int) -> ExpertRange:
        try:
            return self._ranges[(layer, expert)]
        except KeyError:
            raise CheckpointError(f"the pack has no routed expert {expert} in layer {layer}", self.root) from None

    def expert_nbytes(self, layer: int, expert: int) -> int:
        return self.expert_range(layer, expert).length

    def max_expert_nbytes(self) -> int:
        return max((r.length for r in self._ranges.values()), default=0)

    def view(self, layer: int, expert: int) -> torch.Tensor:
        r = self.expert_range(layer, expert)
        buf = self._bufs[r.file]
        assert buf is not None
        return buf[r.offset : r.offset + r.length]

    def read_into(self, layer: int, expert: int, out: torch.Tensor, verify: bool = True) -> None:
        """One `pread` of the expert's range into `out[:length]` (uint8, CPU), then its CRC-32 check."""
        r = self.expert_range(layer, expert)
        if out.device.type != "cpu" or out.dtype != torch.uint8 or not out.is_contiguous() or out.numel() < r.length:
            raise ValueError(f"read_into needs a contiguous CPU uint8 tensor of at least {r.length} bytes")
        mv = memoryview(out.numpy()).cast("B")[: r.length]
        done = 0
        while done < r.length:
            n = os.preadv(self._fds[r.file], [mv[done:]], r.offset + done)
            if n <= 0:
                raise CheckpointError(
                    f"layer {layer} expert {expert}: file ended after {done} of {r.length} bytes", self.files[r.file]
                )
            done += n
        if verify:
            self._check(r, mv)

    def _check(self, r: ExpertRange, data: memoryview | bytes) -> None:
        got = crc32(data)
        if got != r.crc32:
            raise CheckpointError(
                f"layer {r.layer} expert {r.expert}: checksum mismatch (crc32 {got:08x}, manifest {r.crc32:08x}) at "
                f"bytes {r.offset}..{r.offset + r.length}; the pack is corrupt, quantize it again",
                self.files[r.file],
            )

    def verify_expert(self, layer: int, expert: int) -> None:
        """Check one expert's CRC-32 by reading its range (raises CheckpointError naming layer and expert)."""
        r = self.expert_range(layer, expert)
        out = torch.empty(r.length, dtype=torch.uint8)
        self.read_into(layer, expert, out, verify=True)

    def _scheme(self, name: str, params: dict):
        key = json.dumps([name, params], sort_keys=True, default=repr)
        scheme = self._schemes.get(key)
        if scheme is None:
            try:
                scheme = self._schemes[key] = get_scheme(name, **params)
            except (TypeError, ValueError) as exc:
                raise CheckpointError(f"scheme {name!r} with params {params!r} cannot be built ({exc})",
                                      self.manifest_path) from None
            except MoeLocalError as exc:
                raise CheckpointError(str(exc), self.manifest_path) from None
        return scheme

    def decode(self, buf: torch.Tensor, layer: int, expert: int) -> ExpertWeights:
        """Compute-ready packed weights that view `buf` (uint8, any device) in place: no copy."""
        r = self.expert_range(layer, expert)
        layout = self.layouts[r.layout]
        if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() < r.length:
            raise ValueError(f"decode needs a 1-D uint8 buffer of at least {r.length} bytes")
        projs, biases = {}, {}
        for proj, p in layout.projections.items():
            packed = {
                t.name: buf[t.offset : t.offset + t.nbytes].view(t.dtype).view(t.shape) for t in p.tensors
            }
            biases[proj] = packed.pop(BIAS, None)
            projs[proj] = PackedWeight(scheme=self._scheme(p.scheme, p.params), packed=packed, shape=p.shape)
        return ExpertWeights(projs["gate"], projs["up"], projs["down"], biases["gate"], biases["up"], biases["down"])

    def load(self, layer: int, expert: int) -> ExpertWeights:
        """The expert's weights viewing the memory map in place (nothing read yet: pages come in on
        first use, which is when `ResidentExperts` calls `verify_expert`)."""
        return self.decode(self.view(layer, expert), layer, expert)

    def grouped_kernel(self, experts: Sequence[ExpertWeights], act: str) -> kernels_cpu.LayerKernel | None:
        """One kernel call per MoE layer over these (decoded) experts on the CPU, or None where the
        kernels do not cover them: what `ResidentExperts` uses for a pack by default."""
        return kernels_cpu.layer_kernel(experts, act)

    # ----------------------------------------------------------------- description (for `inspect`)
    def describe(self) -> dict:
        """What `moe-local inspect` shows: scheme per tensor group, bytes per expert, sizes, bits/weight."""
        groups: list[dict] = []
        for key, layout in self.layouts.items():
            layers = sorted({r.layer for r in self._ranges.values() if r.layout == key})
            for proj, p in layout.projections.items():
                groups.append({
                    "group": f"experts.{proj}",
                    "layers": layers,
                    "scheme": p.scheme,
                    "params": p.params,
                    "shape": list(p.shape),
                    "bits_per_weight": 8 * p.packed_nbytes() / numel(p.shape),
                })
        per_layer = {layer: self.expert_nbytes(layer, 0) for layer in self.moe_layers}
        weights = sum(self.layouts[self.expert_range(l, 0).layout].weights() for l in self.moe_layers) * self.num_experts
        packed = sum(self.layouts[r.layout].packed_nbytes() for r in self._ranges.values())
        size = pack_size(self.root)
        return {
            "format": FORMAT,
            "version": VERSION,
            "source": self.manifest.get("source", {}),
            "recipe": self.manifest.get("recipe", {}),
            "dense": {**self.dense_scheme, "file": self.dense_path.name, "bytes": self.dense_path.stat().st_size,
                      "quantized_tensors": len(self._quantized)},
            "groups": groups,
            "bytes_per_expert": per_layer,
            "max_expert_bytes": self.max_expert_nbytes(),
            "experts": len(self._ranges),
            "expert_files": [p.name for p in self.files],
            "expert_bits_per_weight": 8 * packed / max(weights, 1),
            "pack_bytes": size.total,  # every file in the folder, as the quantize summary reports it
            "weight_bytes": size.weight_bytes,
            "other_bytes": size.other_bytes,
        }
