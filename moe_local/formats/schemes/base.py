"""What every quantization scheme shares: parameters, grouping, scale storage and the chunked matmul.

A scheme turns ONE 2-D weight `w [out, in]` into a few named, plain, contiguous CPU tensors (its
`tensor_specs`: all the pack format needs to know, see docs/pack-format.md). Rows of `w` are output
channels; groups run along the input dimension, so every packed tensor has the output channel as its first axis and a row range of
the weight is a row range of every packed tensor (that is what lets `linear` work in chunks and
what a future split across devices would use).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from moe_local.errors import MoeLocalError
from moe_local.units import DTYPES
from moe_local.formats.schemes.bits import unpack_nibbles

TensorSpecs = dict[str, tuple[tuple[int, ...], torch.dtype]]

SCALE_DTYPES = ("bfloat16", "float16", "float32")  # what a scheme may store its scales in

# Elements of one float32 expanded chunk inside `linear` (4 MiB): bounds the kernel's scratch
# memory whatever the weight's size and keeps the expand passes in cache (see the benchmark).
CHUNK_ELEMENTS = 1 << 20
# On CUDA the passes are memory-bound either way and each chunk costs kernel launches: fewer,
# bigger chunks (64 MiB of float32 scratch).
CUDA_CHUNK_ELEMENTS = 1 << 24

# Weights quantized at once (16 MiB as float32): bounds quantize's scratch memory (sorts, int64
# indices) for the largest experts.
QUANT_CHUNK_ELEMENTS = 1 << 22

F32_MAX = torch.finfo(torch.float32).max


class Scheme:
    """Base class of the schemes; subclasses set `name`, `defaults` and the four core methods.

    `params` is what the manifest stores: `get_scheme(name, **params)` must rebuild an identical
    scheme from it, so it holds only JSON values.
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    qmax: ClassVar[float] = 1.0  # largest |code value| a scale is multiplied by (for overflow clamps)
    group_multiple: ClassVar[int] = 1  # a group must hold a multiple of this many codes (2: nibbles)

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            valid = ", ".join(sorted(self.defaults)) or "none"
            raise MoeLocalError(f"scheme {self.name!r} has no parameter {', '.join(unknown)} (valid: {valid})")
        self.params: dict[str, Any] = {**self.defaults, **params}
        self._validate()

    # -- hooks for subclasses -------------------------------------------------------------------
    def _validate(self) -> None:
        """Check `self.params`; raise MoeLocalError with one line on a bad value."""

    def tensor_specs(self, shape: tuple[int, int]) -> TensorSpecs:
        raise NotImplementedError

    def quantize(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Check `w`, then quantize a block of rows at a time (bounded scratch memory; a
        memory-mapped `w` is read block by block). The arithmetic runs on w's device (a GPU sorts
        the ternary groups far faster); the packed tensors are always returned on the CPU."""
        check_weight(w)
        out_f, in_f = w.shape
        imp = check_importance(importance, in_f)
        if imp is not None:
            imp = imp.to(w.device)
        rows = max(1, QUANT_CHUNK_ELEMENTS // in_f)
        parts = [
            {k: v.cpu() for k, v in self._quantize_rows(w[r0 : r0 + rows].detach(), imp).items()}
            for r0 in range(0, out_f, rows)
        ]
        if len(parts) == 1:
            return {k: v.contiguous() for k, v in parts[0].items()}
        return {k: torch.cat([p[k] for p in parts]).contiguous() for k in parts[0]}

    def _quantize_rows(self, w: torch.Tensor, imp: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The packed tensors of a finite block of rows (on w's device); `imp` is checked, [in]
        float32 on the same device, or None."""
        raise NotImplementedError

    def dequantize(self, packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    # -- shared behaviour -----------------------------------------------------------------------
    def group_size_for(self, in_f: int) -> int | None:
        """The group size actually used for a weight with `in_f` input channels (None: no groups).

        `group_size` is an upper bound: a row narrower than a group is one group of its own width
        (rounded up to `group_multiple`), never padded to the full `group_size`. Padding would
        store codes for weights that do not exist (a ternary 256x64 down projection at g128 would
        cost 2.33 bits/weight instead of 1.875) while giving the same one scale per row. Derived
        from the shape and the params alone, so the manifest's params rebuild the exact layout.
        `group_size=None` (int8 per channel) is one group per row.
        """
        if "group_size" not in self.params:
            return None
        g = self.params["group_size"]
        if g is None:
            return int(in_f)
        return min(int(g), -(-int(in_f) // self.group_multiple) * self.group_multiple)

    def nbytes(self, shape: tuple[int, int]) -> int:
        total = 0
        for dims, dtype in self.tensor_specs(tuple(shape)).values():
            n = 1
            for d in dims:
                n *= d
            total += n * dtype.itemsize
        return total

    def bits_per_weight(self, shape: tuple[int, int]) -> float:
        """Storage bits per weight, scales and zero points included."""
        return 8.0 * self.nbytes(shape) / (shape[0] * shape[1])

    def linear(self, x: torch.Tensor, packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        """`x @ W.T` from the packed tensors: dequantize a block of output rows, matmul, repeat.

        Each output column depends only on its own weight row, so chunking by rows gives exactly
        the values of `F.linear(x, dequantize(...).to(x.dtype))` while the float copy of the weight
        never exceeds CHUNK_ELEMENTS (CUDA_CHUNK_ELEMENTS on a GPU).
        """
        out_f, in_f = shape
        chunk = CHUNK_ELEMENTS if x.device.type == "cpu" else CUDA_CHUNK_ELEMENTS
        rows = max(1, chunk // max(1, in_f))
        if rows >= out_f:
            return F.linear(x, self._expand(packed, shape).to(x.dtype))
        parts = []
        for r0 in range(0, out_f, rows):
            r1 = min(out_f, r0 + rows)
            block = {k: v[r0:r1] for k, v in packed.items()}
            parts.append(F.linear(x, self._expand(block, (r1 - r0, in_f)).to(x.dtype)))
        return torch.cat(parts, dim=-1)

    def _expand(self, packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        """float32 [out, in] for the kernel path: bit-identical to `dequantize`, possibly faster
        (schemes override it with moe_local.formats.kernels_torch)."""
        return self.dequantize(packed, shape)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Scheme) and (self.name, self.params) == (other.name, other.params)

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.params.items()))))


class GroupedScheme(Scheme):
    """Codes packed along the input dimension, several per byte, and one scale per group of
    `group_size` input channels (int4, nf4, the ternary schemes); subclasses say how many bytes
    n codes take, how to unpack them and what a code is worth."""

    defaults: ClassVar[dict[str, Any]] = {"group_size": 64, "scale_dtype": "bfloat16"}

    def code_bytes(self, n: int) -> int:
        """Bytes that hold n codes."""
        raise NotImplementedError

    def unpack_codes(self, packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        """[out, n_groups * g] integer codes (padding included): the reference unpack."""
        raise NotImplementedError

    def code_values(self, q: torch.Tensor, packed: dict[str, torch.Tensor]) -> torch.Tensor:
        """float32 [out, n_groups, g]: what the codes `q` (grouped unpack_codes) are worth before
        their group's scale multiplies them."""
        raise NotImplementedError

    def dequantize(self, packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        out_f, in_f = shape
        q = self.unpack_codes(packed, shape).reshape(out_f, -1, self.group_size_for(in_f))
        s = packed["scales"].reshape(out_f, -1, 1).float()
        return (self.code_values(q, packed) * s).reshape(out_f, -1)[:, :in_f]

    def _validate(self) -> None:
        check_group_size(self.name, self.params["group_size"], multiple_of=self.group_multiple)
        self.scale_dtype = check_scale_dtype(self.name, self.params["scale_dtype"])

    def tensor_specs(self, shape: tuple[int, int]) -> TensorSpecs:
        out_f, in_f = int(shape[0]), int(shape[1])
        g = self.group_size_for(in_f)
        ng = n_groups(in_f, g)
        return {"codes": ((out_f, self.code_bytes(ng * g)), torch.uint8), "scales": ((out_f, ng), self.scale_dtype)}

    def _codes(self, packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        """uint8 [out, bytes] codes, trimmed to this layout's row width.

        Packs written before `group_size_for` padded a row narrower than `group_size` to a full
        group; their one scale per row is the same and the real codes are a prefix of the row,
        so trimming decodes them exactly (a no-op view for current layouts)."""
        out_f, in_f = int(shape[0]), int(shape[1])
        g = self.group_size_for(in_f)
        codes = packed["codes"].reshape(out_f, -1)
        nb = self.code_bytes(n_groups(in_f, g) * g)
        return codes if codes.shape[1] == nb else codes[:, :nb]


class NibbleScheme(GroupedScheme):
    """4-bit codes, two per byte (int4, nf4)."""

    group_multiple: ClassVar[int] = 2  # a group never splits a byte

    def code_bytes(self, n: int) -> int:
        return n // 2

    def unpack_codes(self, packed: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
        """uint8 [out, n_groups * g] codes in 0..15 (padding included): the reference unpack."""
        return unpack_nibbles(self._codes(packed, shape))


# ---------------------------------------------------------------------------------------------
# helpers used by the schemes


def check_weight(w: torch.Tensor) -> None:
    """A weight must be a finite 2-D float tensor; the caller prefixes the tensor's name."""
    if w.ndim != 2 or w.numel() == 0:
        raise MoeLocalError(f"expected a non-empty 2-D weight [out, in], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise MoeLocalError(f"expected a floating-point weight, got {w.dtype}")
    if not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise MoeLocalError(f"weight contains {bad} NaN or inf value(s); refusing to quantize it")


def check_importance(importance: torch.Tensor | None, in_f: int) -> torch.Tensor | None:
    """Importance is one non-negative finite number per input channel."""
    if importance is None:
        return None
    imp = importance.detach().reshape(-1).float()
    if imp.numel() != in_f:
        raise MoeLocalError(f"importance has {imp.numel()} entries but the weight has {in_f} input channels")
    if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
        raise MoeLocalError("importance must be finite and non-negative")
    return imp


def check_group_size(name: str, g: Any, allow_none: bool = False, multiple_of: int = 1) -> None:
    if g is None and allow_none:
        return
    if not isinstance(g, int) or isinstance(g, bool) or g < 1 or g % multiple_of:
        need = f"a positive integer{f' multiple of {multiple_of}' if multiple_of > 1 else ''}"
        raise MoeLocalError(f"scheme {name!r}: group_size must be {need}{' or None' if allow_none else ''}, got {g!r}")


def check_scale_dtype(name: str, value: Any) -> torch.dtype:
    if value not in SCALE_DTYPES:
        raise MoeLocalError(f"scheme {name!r}: scale_dtype must be one of {', '.join(SCALE_DTYPES)}, got {value!r}")
    return DTYPES[value].torch


def n_groups(in_f: int, g: int) -> int:
    return -(-in_f // g)


def grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    """float32 [out, n_groups, g], the last group zero-padded when g does not divide `in`."""
    out_f, in_f = w.shape
    ng = n_groups(in_f, g)
    w = w.float()
    if ng * g != in_f:
        w = F.pad(w, (0, ng * g - in_f))
    return w.reshape(out_f, ng, g)


def group_counts(in_f: int, g: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Number of real (unpadded) weights in each group: g, ..., g, remainder."""
    ng = n_groups(in_f, g)
    counts = torch.full((ng,), g, dtype=torch.float32, device=device)
    counts[-1] = in_f - (ng - 1) * g
    return counts


def store_scales(s: torch.Tensor, dtype: torch.dtype, scheme: str, qmax: float) -> torch.Tensor:
    """Round float scales to their storage dtype so that dequantization stays finite.

    Scales are clamped so that `scale * qmax` cannot overflow float32 after rounding (values within
    1% of float32's max lose at most that 1%). float16 cannot hold the scales of weights beyond
    ~65504*qmax: rather than silently clipping them we name the fix.
    """
    s = s.float().clamp(min=0.0, max=F32_MAX / (qmax * 1.01))
    if dtype == torch.float16 and bool((s > torch.finfo(torch.float16).max).any()):
        raise MoeLocalError(
            f"scheme {scheme!r}: weights up to {float(s.max()) * qmax:.3g} overflow float16 scales; "
            "use scale_dtype=bfloat16 or float32"
        )
    return s.to(dtype).contiguous()


def safe_div(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """w / s with 0 where s == 0 (all-zero groups, or scales that underflowed their dtype)."""
    return torch.where(s > 0, w / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(w))
