"""The one walk from a model to its checkpoint tensors, driven by the family's `CheckpointMap`.

`load_weights` (running), `convert.quantize` (packing) and `runtime.inspect` (sizing) all ask this
module which checkpoint tensor fills which parameter and where the routed experts are, so a family's
naming is stated once (its `checkpoint_map`) and read the same way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from moe_local.errors import CheckpointError
from moe_local.loading.checkpoint import check_shape
from moe_local.formats.schemes import PackedWeight, get_scheme
from moe_local.loading.hf_experts import CheckpointExperts
from moe_local.models.base import CausalLM
from moe_local.units import BY_SAFETENSORS, DTYPES, RUN_DTYPES


class TensorSource(Protocol):
    """What the walk reads: a `loading.Checkpoint` or a `formats.pack.Pack` (same tensor API)."""

    root: object

    def names(self) -> list[str]: ...

    def __contains__(self, name: str) -> bool: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def file_of(self, name: str): ...

    def dtype(self, name: str) -> str: ...  # the stored safetensors dtype ("BF16"), from the header


@dataclass(frozen=True)
class WeightRef:
    """One non-expert parameter and the checkpoint tensor that fills it."""

    param: str  # our parameter name
    name: str  # the checkpoint tensor
    shape: tuple[int, ...]
    fp32: bool = False  # kept in float32 whatever the run dtype (CheckpointMap.keep_fp32)


def weight_refs(model: CausalLM, ckpt: TensorSource) -> list[WeightRef]:
    """Every non-expert tensor the model reads, in parameter order, shapes checked from the headers.

    A tensor the model needs and the checkpoint lacks, or one whose shape config.json contradicts, is
    a CheckpointError naming the file. A tied LM head reads the embeddings instead (no ref)."""
    cmap = model.checkpoint_map.for_checkpoint(ckpt.__contains__)
    refs: list[WeightRef] = []
    for param, p in model.named_parameters():
        name = cmap.checkpoint_name(param)
        if name not in ckpt:
            if param == "lm_head.weight" and model.args.tie_word_embeddings:
                continue
            raise CheckpointError(f"tensor {name!r} (needed by {model.family}) is missing", ckpt.root)
        check_shape(name, tuple(ckpt.shape(name)), tuple(p.shape), ckpt.file_of(name))
        refs.append(WeightRef(param, name, tuple(p.shape), cmap.keeps_fp32(param)))
    return refs


def checkpoint_experts(model: CausalLM, ckpt) -> CheckpointExperts:
    """The routed experts of a Hugging Face checkpoint, where the family's map says they are."""
    a = model.args
    return CheckpointExperts(ckpt, model.checkpoint_map.for_checkpoint(ckpt.__contains__), a.moe_layers, a.num_experts, a.hidden_size,
                             a.moe_intermediate_size, packed=_packed_projection)


def _packed_projection(scheme: str, parts: dict[str, torch.Tensor], shape: tuple[int, int]) -> PackedWeight:
    """A checkpoint's natively packed projection (gpt-oss's MXFP4 codes + scales), kept as it is."""
    s = get_scheme(scheme)
    s.check_native(parts, shape, f"{scheme} expert tensor")
    return PackedWeight(s, parts, shape)


def unread_tensors(model: CausalLM, ckpt: TensorSource) -> list[str]:
    """Checkpoint tensors nothing reads and the map does not declare ignored: the map is incomplete
    (or the checkpoint is not of this family). Empty for every checkpoint a family supports."""
    read = {ref.name for ref in weight_refs(model, ckpt)}
    experts = checkpoint_experts(model, ckpt)
    for layer in experts.moe_layers:
        if experts.is_fused(layer):
            read.update(experts.tensor_names(layer, 0))
        else:
            for e in range(experts.num_experts):
                read.update(experts.tensor_names(layer, e))
    layers = model.args.num_hidden_layers
    return [n for n in ckpt.names() if n not in read and not model.checkpoint_map.is_ignored(n, layers)]


def held_dtype(ndim: int, stored: torch.dtype, dtype: torch.dtype, fp32: bool = False) -> torch.dtype:
    """The dtype `load_weights` keeps a non-expert tensor in, for a run in `dtype`.

    A matrix (2-D: projections, embeddings, routers, the LM head) keeps its storage dtype when that is
    narrower than the run dtype: a bf16 checkpoint run in float32 on a CPU holds 2 bytes per weight,
    not a 4-byte copy read on every token; `formats.compute.linear` takes it as it is. Everything
    else (norms, biases, conv kernels: small, used elementwise) is cast to the run dtype, and the
    family's `keep_fp32` tensors are float32."""
    if not stored.is_floating_point:
        return stored  # integer tables (DeepSeek-V4's hash routing table) are indices, never cast
    if fp32:
        return torch.float32
    narrower = torch.empty((), dtype=stored).element_size() < torch.empty((), dtype=dtype).element_size()
    return stored if ndim == 2 and stored.is_floating_point and narrower else dtype


def _stored_dtype(source: TensorSource | None, name: str | None, model: CausalLM) -> torch.dtype | None:
    """What `get` returns a tensor as: its header dtype (FP8 comes out dequantized, as float32);
    without a source, the config's `torch_dtype` (None when it names no run dtype)."""
    if source is None or name is None:
        raw = model.args.raw or {}
        st = DTYPES.get(str(raw.get("torch_dtype") or raw.get("dtype") or ""))
    else:
        st = BY_SAFETENSORS.get(source.dtype(name))
    if st is None or st.name not in RUN_DTYPES:
        return None if source is None else torch.float32
    return st.torch


def resident_bytes(model: CausalLM, dtype: torch.dtype, source: TensorSource | None = None) -> int:
    """Bytes of the non-expert weights once `load_weights` has filled the (meta-device) model from
    `source` for a run in `dtype`: what `inspect` and the budget check size a run by. Matrices count
    at the dtype they are held in (`held_dtype`: a bf16 checkpoint's 2 bytes on a float32 run), a
    pack's quantized tensors their packed bytes, `keep_fp32` parameters 4 bytes; a tied LM head
    counts once, buffers keep their own dtype. Without a source (config-only) the stored dtype is
    the config's `torch_dtype`, or `dtype` if it names none."""
    refs = {r.param: r for r in weight_refs(model, source)} if source is not None else {}
    packed_nbytes = getattr(source, "packed_nbytes", None)
    total = 0
    for name, p in model.named_parameters():
        if model.args.tie_word_embeddings and name == "lm_head.weight":
            continue
        ref = refs.get(name)
        n = packed_nbytes(ref.name) if packed_nbytes is not None and ref is not None and not ref.fp32 else None
        if n is None:
            stored = _stored_dtype(source, ref.name if ref else None, model) or dtype
            held = held_dtype(p.dim(), stored, dtype, model.checkpoint_map.keeps_fp32(name))
            n = p.numel() * torch.empty((), dtype=held).element_size()
        total += n
    return total + sum(b.numel() * b.element_size() for b in model.buffers())
