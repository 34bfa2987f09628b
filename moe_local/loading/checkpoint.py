"""A Hugging Face checkpoint on disk: config.json plus safetensors shards, read through memory maps.

`Checkpoint` maps tensor names to shard files (from `model.safetensors.index.json`, or by listing a
single `model.safetensors`), opens each shard once with `safetensors.safe_open` (an mmap, so nothing
is read until a tensor is asked for) and hands out one tensor at a time. Shapes can be read without
touching tensor data.

FP8 checkpoints (DeepSeek-V3, and the other hub releases in the same format) store a weight as e4m3
codes plus one inverse scale per 128x128 block in the companion tensor `<name>_scale_inv`. That is
how the file stores the tensor, not a tensor of its own: the companion is not listed by `names()`
and the weight is dequantized on the way out, so model code and the family's `CheckpointMap` only
ever see real numbers under the weight's own name. The same holds for compressed-tensors packed
integer weights (`<name>_packed` / `_scale` / `_shape`, Kimi-K2.5's INT4 experts: `compressed.py`).

DeepSeek-V4's hub checkpoints name the companion of `<base>.weight` `<base>.scale` (power-of-two
ue8m0 scales): FP8 e4m3 linears with one scale per 128x128 block as above, and routed experts in
FP4 (e2m1 codes, two per int8 byte, low nibble first, one scale per 32 inputs), which `shape` reports
and `get` returns at their real width.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from moe_local.errors import CheckpointError
from moe_local.loading import compressed
from moe_local.loading.hub import resolve_model_dir

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
FP8_BLOCK = 128
FP8_SCALE_SUFFIX = "_scale_inv"
V4_SCALE_SUFFIX = ".scale"  # DeepSeek-V4: "<base>.scale" scales "<base>.weight"
FP4_GROUP = 32
# e2m1 code -> value (sign bit 3, then two exponent bits and one mantissa bit)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def read_json(path: Path) -> dict:
    """Read a JSON file, turning every failure into one line naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError("missing", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"is not valid JSON ({exc})", path) from None
    if not isinstance(data, dict):
        raise CheckpointError("must hold a JSON object", path)
    return data


def check_shape(name: str, got: tuple[int, ...], want: tuple[int, ...], path: Path) -> None:
    """A stored tensor must have the shape config.json implies; say which file holds the wrong one."""
    if tuple(got) != tuple(want):
        raise CheckpointError(f"tensor {name!r} has shape {list(got)}, config.json implies {list(want)}", path)


class Checkpoint:
    """Read-only view of a model folder; tensors come out one by one from memory-mapped shards."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        config_path = self.root / "config.json"
        if not config_path.is_file():
            raise CheckpointError("missing config.json (is this a Hugging Face model folder?)", config_path)
        self.config: dict = read_json(config_path)
        self._handles: dict[Path, object] = {}
        self._file_of: dict[str, Path] = self._map_tensors()
        # tensor -> its FP8 block-scale companion; companions are part of their tensor, not names
        self._scales: dict[str, str] = {n[: -len(FP8_SCALE_SUFFIX)]: n for n in self._file_of
                                        if n.endswith(FP8_SCALE_SUFFIX) and n[: -len(FP8_SCALE_SUFFIX)] in self._file_of}
        for n in self._file_of:
            weight = n[: -len(V4_SCALE_SUFFIX)] + ".weight"
            if n.endswith(V4_SCALE_SUFFIX) and weight in self._file_of:
                self._scales[weight] = n
        # compressed-tensors packed integer weights (Kimi-K2.5's INT4 experts): <p>.weight -> <p>.
        self._packed = compressed.packed_weights(self._file_of)
        hidden = set(self._scales.values()) | {c for p in self._packed.values() for c in compressed.companions(p)}
        self._names = sorted((set(self._file_of) | set(self._packed)) - hidden)
        self._name_set = set(self._names)

    # ----------------------------------------------------------------- layout
    def _map_tensors(self) -> dict[str, Path]:
        index = self.root / INDEX_NAME
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError("has no weight_map", index)
            bad = next((k for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
            if bad is not None:
                raise CheckpointError(f"weight_map entry {bad!r} must name a shard file, got "
                                      f"{weight_map[bad]!r}", index)
            files = {name: self.root / fname for name, fname in weight_map.items()}
            for path in sorted(set(files.values())):
                if not path.is_file():
                    raise CheckpointError(f"shard named in {INDEX_NAME} is missing", path)
            return files
        shards = sorted(self.root.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"no *.safetensors files (and no {INDEX_NAME})", self.root)
        files: dict[str, Path] = {}
        for path in shards:
            for name in self._open(path).keys():
                files[name] = path
        return files

    def _open(self, path: Path):
        handle = self._handles.get(path)
        if handle is None:
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error type for bad headers
                raise CheckpointError(f"not a readable safetensors file ({exc}); is it truncated?", path) from None
            self._handles[path] = handle
        return handle

    # ----------------------------------------------------------------- queries
    def names(self) -> list[str]:
        """Every tensor of the checkpoint (FP8 scale companions are part of their tensor)."""
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._name_set

    def files(self) -> list[Path]:
        """The shard files, each once."""
        return sorted(set(self._file_of.values()))

    def file_of(self, name: str) -> Path:
        if name not in self._name_set:
            raise CheckpointError(f"tensor {name!r} not found in the checkpoint", self.root)
        if name in self._packed:
            return self._file_of[self._packed[name] + compressed.PACKED]
        return self._file_of[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape without reading the data (of a packed weight: its 2-element weight_shape; of an FP4
        tensor: its real width, two codes per byte)."""
        if name in self._packed:
            return tuple(int(v) for v in self._read(self._packed[name] + compressed.SHAPE).tolist())
        sl = self._open(self.file_of(name)).get_slice(name)
        shape = tuple(sl.get_shape())
        if name in self._scales and sl.get_dtype() in ("I8", "U8"):
            shape = shape[:-1] + (2 * shape[-1],)
        return shape

    def dtype(self, name: str) -> str:
        """The stored safetensors dtype string ("BF16", "F8_E4M3", ...), read from the header only."""
        if name in self._packed:
            return self._open(self.file_of(name)).get_slice(self._packed[name] + compressed.PACKED).get_dtype()
        return self._open(self.file_of(name)).get_slice(name).get_dtype()

    def release(self) -> None:
        """Close every open shard (drop its memory map) so pages read so far leave our RSS.

        The checkpoint stays usable: the next access re-opens a shard for the cost of one header
        parse. Streaming readers (quantize) call this between layers to keep memory flat."""
        self._handles.clear()

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Return one tensor (dequantized if stored as FP8 with block scales).

        With `shape`, a mismatch is a CheckpointError naming the shard and the tensor.
        """
        path = self.file_of(name)
        if name in self._packed:
            tensor = self._dequantize_packed(name)
            if shape is not None:
                check_shape(name, tuple(tensor.shape), shape, path)
            return tensor
        tensor = self._read(name)
        scale_name = self._scales.get(name)
        if scale_name is not None and tensor.dtype == getattr(torch, "float8_e4m3fn", None):
            tensor = dequantize_fp8_blocks(tensor, self._read(scale_name))
        elif scale_name is not None and tensor.dtype in (torch.int8, torch.uint8):
            tensor = dequantize_fp4(tensor, self._read(scale_name))
        if shape is not None:
            check_shape(name, tuple(tensor.shape), shape, path)
        return tensor

    def _read(self, name: str) -> torch.Tensor:
        path = self._file_of[name]
        try:
            return self._open(path).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor {name!r} ({exc})", path) from None

    def _dequantize_packed(self, name: str) -> torch.Tensor:
        prefix = self._packed[name]
        if prefix + compressed.ZERO_POINT in self._file_of:
            raise CheckpointError(f"tensor {name!r} is packed with a zero point (asymmetric), which is not "
                                  "supported; only symmetric pack-quantized weights are", self.file_of(name))
        try:
            return compressed.dequantize_packed(self._read(prefix + compressed.PACKED),
                                                self._read(prefix + compressed.SCALE), self.shape(name))
        except ValueError as exc:
            raise CheckpointError(f"tensor {name!r}: {exc}", self.file_of(name)) from None

    def get_expert_slice(self, name: str, index: int) -> torch.Tensor:
        """Row `index` of a fused 3-D expert tensor, read without loading the other experts."""
        path = self.file_of(name)
        sl = self._open(path).get_slice(name)
        return sl[index : index + 1][0]


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """DeepSeek-V3 FP8 layout: weight[i, j] * scale_inv[i // block, j // block], returned as float32."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
    return weight.float() * scale


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, group: int = FP4_GROUP) -> torch.Tensor:
    """DeepSeek-V4 FP4 experts: byte b of row i holds codes for columns 2b (low nibble) and 2b+1;
    value = FP4_VALUES[code] * scale[i, column // group], returned as float32 [rows, 2 * bytes]."""
    u8 = packed.view(torch.uint8)
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    values = torch.stack([lut[(u8 & 0xF).long()], lut[(u8 >> 4).long()]], dim=-1).flatten(-2)
    return values * scale.float().repeat_interleave(group, dim=-1)[..., : values.shape[-1]]


def open_checkpoint(ref: str | Path, revision: str | None = None) -> Checkpoint:
    """Resolve a folder or hub id and open it."""
    return Checkpoint(resolve_model_dir(ref, revision))
