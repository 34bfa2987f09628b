"""ExpertBytesSource adapters for expert stores that are not moe-local packs.

The tiered cache pages *byte ranges*. A pack (moe_local.formats.pack) already stores every expert as
one aligned range. These adapters give the same view of other stores so that the cache also runs on
a plain Hugging Face checkpoint (`CheckpointBytes`: each expert's tensors serialised back to back on
the fly) and so that tests and benchmarks can build a minimal expert file with checksums
(`write_expert_file` / `ExpertFile`). Tensors keep their stored dtype; `decode` views the buffer.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from moe_local.errors import CheckpointError
from moe_local.experts import ExpertSource, ExpertWeights

NAMES = ("gate", "up", "down")
ALIGN = 16  # between tensors (the pack writer's rule): every view is dtype-aligned
RANGE_ALIGN = 4096  # between experts (one page-aligned read per expert)

_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int32)}


def _layout(w: ExpertWeights) -> tuple[list[tuple[str, int, tuple[int, ...], torch.dtype]], int]:
    entries, off = [], 0
    for name in NAMES:
        t = getattr(w, name)
        if not isinstance(t, torch.Tensor):
            raise TypeError("adapters serialise plain tensors only; packed experts come from a pack")
        entries.append((name, off, tuple(t.shape), t.dtype))
        off += t.numel() * t.element_size()
        off = -(-off // ALIGN) * ALIGN
    return entries, off


def _write(w: ExpertWeights, layout, out: torch.Tensor) -> None:
    for name, off, shape, dtype in layout:
        t = getattr(w, name).contiguous()
        n = t.numel() * t.element_size()
        out[off : off + n].copy_(t.reshape(-1).view(torch.uint8))


def _decode(buf: torch.Tensor, layout) -> ExpertWeights:
    parts = {}
    for name, off, shape, dtype in layout:
        n = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        parts[name] = buf[off : off + n].view(dtype).view(shape)
    return ExpertWeights(parts["gate"], parts["up"], parts["down"])


class FixedSizeBytes:
    """The size-related ExpertBytesSource methods of a store whose experts all take `nbytes` bytes
    (a plain checkpoint's experts, the benchmark's synthetic store); `view` copies via `read_into`."""

    nbytes: int

    def expert_nbytes(self, layer: int, expert: int) -> int:
        return self.nbytes

    def max_expert_nbytes(self) -> int:
        return self.nbytes

    def view(self, layer: int, expert: int) -> torch.Tensor:
        out = torch.empty(self.nbytes, dtype=torch.uint8)
        self.read_into(layer, expert, out)  # type: ignore[attr-defined]
        return out


class CheckpointBytes(FixedSizeBytes):
    """Any ExpertSource of plain tensors seen as byte ranges (serialised on each read; no checksum)."""

    def __init__(self, source: ExpertSource) -> None:
        self.source = source
        self.moe_layers = list(source.moe_layers)
        self.num_experts = source.num_experts
        self.layout, self.nbytes = _layout(source.load(self.moe_layers[0], 0))

    def read_into(self, layer: int, expert: int, out: torch.Tensor, verify: bool = True) -> None:
        _write(self.source.load(layer, expert), self.layout, out[: self.nbytes])

    def decode(self, buf: torch.Tensor, layer: int, expert: int) -> ExpertWeights:
        return _decode(buf, self.layout)

    def load(self, layer: int, expert: int) -> ExpertWeights:
        return self.source.load(layer, expert)


def write_expert_file(source: ExpertSource, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
    """experts.bin (one 4096-aligned range per expert) + experts.json (offsets, crc32). Test/bench helper."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    first = source.load(source.moe_layers[0], 0)
    if dtype is not None:
        first = first.to(dtype=dtype)
    layout, nbytes = _layout(first)
    stride = -(-nbytes // RANGE_ALIGN) * RANGE_ALIGN
    index = {}
    buf = torch.zeros(stride, dtype=torch.uint8)
    tmp = directory / "experts.bin.tmp"
    with open(tmp, "wb") as f:
        for layer in source.moe_layers:
            for e in range(source.num_experts):
                w = source.load(layer, e)
                if dtype is not None:
                    w = w.to(dtype=dtype)
                buf.zero_()
                _write(w, layout, buf)
                index[f"{layer}.{e}"] = [f.tell(), nbytes, zlib.crc32(buf[:nbytes].numpy())]
                f.write(buf.numpy().tobytes())
    tmp.replace(directory / "experts.bin")
    meta = {"moe_layers": list(source.moe_layers), "num_experts": source.num_experts,
            "layout": [[n, o, list(s), str(d)] for n, o, s, d in layout], "experts": index}
    (directory / "experts.json").write_text(json.dumps(meta))
    return directory


class ExpertFile:
    """Reader of `write_expert_file` output: mmap for view(), one pread + crc32 for read_into()."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        meta = json.loads((self.dir / "experts.json").read_text())
        self.moe_layers = meta["moe_layers"]
        self.num_experts = meta["num_experts"]
        self.layout = [(n, o, tuple(s), _DTYPES[d]) for n, o, s, d in meta["layout"]]
        self.index = {tuple(map(int, k.split("."))): v for k, v in meta["experts"].items()}
        self.path = self.dir / "experts.bin"
        self.fd = os.open(self.path, os.O_RDONLY)
        size = os.fstat(self.fd).st_size
        self.map = np.memmap(self.path, dtype=np.uint8, mode="r", shape=(size,))

    def _entry(self, layer: int, expert: int):
        try:
            return self.index[(layer, expert)]
        except KeyError:
            raise CheckpointError(f"no expert {expert} in layer {layer}", self.path) from None

    def expert_nbytes(self, layer: int, expert: int) -> int:
        return self._entry(layer, expert)[1]

    def max_expert_nbytes(self) -> int:
        return max(v[1] for v in self.index.values())

    def view(self, layer: int, expert: int) -> torch.Tensor:
        off, n, _ = self._entry(layer, expert)
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.from_numpy(self.map[off : off + n])

    def read_into(self, layer: int, expert: int, out: torch.Tensor, verify: bool = True) -> None:
        off, n, crc = self._entry(layer, expert)
        dst = out[:n].numpy()
        got = os.preadv(self.fd, [memoryview(dst)], off)
        if got != n:
            raise CheckpointError(f"expert range of layer {layer} expert {expert} is truncated", self.path)
        if verify and zlib.crc32(dst) != crc:
            raise CheckpointError(
                f"expert range of layer {layer} expert {expert} fails its checksum (file corrupted; re-create it)",
                self.path)

    def decode(self, buf: torch.Tensor, layer: int, expert: int) -> ExpertWeights:
        return _decode(buf, self.layout)

    def load(self, layer: int, expert: int) -> ExpertWeights:
        out = torch.empty(self.expert_nbytes(layer, expert), dtype=torch.uint8)
        self.read_into(layer, expert, out)
        return self.decode(out, layer, expert)

    def close(self) -> None:
        os.close(self.fd)
