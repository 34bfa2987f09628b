"""What a model is and what running it costs, from config.json and safetensors headers alone.

Nothing here reads tensor data: the model is built on the meta device (shapes only) to count the
non-expert parameters and size the KV cache, and the shards' JSON headers give the stored dtypes
and bytes. So `moe-local inspect` answers "will this fit?" in a second, even for a 600 GB model.

A pack folder (moe_local.formats.pack) is described from its manifest instead: the scheme of every
tensor group, the bytes of one expert per MoE layer, and memory figures in which the routed
experts stay packed (that is how the runtime holds them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moe_local.cache.budget import min_budget
from moe_local.errors import CheckpointError
from moe_local.loading.checkpoint import INDEX_NAME, Checkpoint, read_json
from moe_local.loading.hub import resolve_model_dir
from moe_local.formats.pack import Pack, is_pack, read_st_header
from moe_local.formats.schemes import get_scheme
from moe_local.models.weights import checkpoint_experts, resident_bytes
from moe_local.cache.budget import KV_CONTEXT_DEFAULT
from moe_local.runtime.loader import build_model_for, resolve_device, resolve_dtype
from moe_local.units import BY_SAFETENSORS, DTYPES, dtype_name, format_bytes, layer_ranges


CONFIG_ONLY = "no weights: sizes from config.json"  # checkpoint_dtype of a config-only summary


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """name -> {"dtype", "shape", "data_offsets"} from the header, no tensor data read; a file too
    short for the data its header describes is named as truncated."""
    start, header = read_st_header(path)
    header = {name: info for name, info in header.items() if name != "__metadata__"}
    end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    size = path.stat().st_size
    if start + end > size:
        raise CheckpointError(f"is truncated: its header needs {start + end} bytes, the file has {size}", path)
    return header


@dataclass
class ModelSummary:
    path: str
    family: str
    layers: int
    moe_layers: int
    experts_per_layer: int
    top_k: int
    shared_experts: int
    hidden_size: int
    expert_intermediate_size: int
    context_length: int
    checkpoint_dtype: str
    checkpoint_bytes: int
    total_params: int
    active_params: int
    dense_params: int  # everything that is not a routed expert (attention, norms, embeddings, routers, shared experts)
    expert_params: int  # one routed expert
    bytes_per_expert: int  # one routed expert as stored in the checkpoint
    run_dtype: str
    kv_bytes_per_token: int
    memory_all_resident: int  # dense weights as held (bf16 stays bf16) + all experts + KV cache at full context
    # the smallest --ram the tiered cache accepts on a CPU: resident (non-expert) weights as held +
    # the KV cache for kv_tokens + one layer's top-k expert slots, by cache.budget.min_budget (the rule
    # plan_budget enforces)
    memory_min_offload: int
    kv_tokens: int = 0  # the context a budget reserves KV cache for (min(4096, context))
    # the smallest --gpu-mem on a GPU: the same + the GPU workspace (cache.budget.workspace_bytes)
    memory_min_gpu: int = 0
    # fixed-size per-sequence state that does not grow with the context (hybrid families' recurrent
    # conv + delta-rule state; 0 for pure attention); counted in memory_all_resident
    state_bytes: int = 0
    # For a pack: Pack.describe() (scheme per tensor group, bytes per expert per layer, sizes), each
    # group also carrying `group_size_used` (see Scheme.group_size_for). None for a checkpoint.
    pack: dict[str, Any] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _shared_experts(config: dict) -> int:
    if config.get("n_shared_experts"):
        return int(config["n_shared_experts"])
    return 1 if config.get("shared_expert_intermediate_size") else 0


def summarize(ref: str | Path, run_dtype: str | None = None) -> ModelSummary:
    """run_dtype None: the dtype a run on this machine uses by default (bf16 with CUDA, float32 on a
    CPU), so the minimum --ram printed is the one a default run accepts."""
    run_dtype = dtype_name(resolve_dtype(run_dtype, resolve_device(None)))  # a bad --dtype is refused first
    root = resolve_model_dir(ref)
    if is_pack(root):
        return summarize_pack(root, run_dtype)
    if is_config_only(root):
        return summarize_config(read_json(root / "config.json"), root, run_dtype)
    ckpt = Checkpoint(root)
    model = build_model_for(ckpt.config, root)  # meta device: shapes, no memory
    a = model.args

    headers: dict[str, dict] = {}
    for shard in ckpt.files():
        headers.update(read_safetensors_header(shard))
    on_disk = sum(int(t["data_offsets"][1]) - int(t["data_offsets"][0]) for t in headers.values())

    experts = checkpoint_experts(model, ckpt)
    expert_tensors = [n for n in experts.tensor_names(a.moe_layers[0], 0) if n in headers] if a.moe_layers else []
    dtype = headers[expert_tensors[0]]["dtype"] if expert_tensors else next(iter(headers.values()))["dtype"]
    per_expert = _expert_params(a)
    if a.moe_layers and experts.is_mxfp4(a.moe_layers[0]):
        # gpt-oss's hub experts stay MXFP4 when run (packed weights), so stored bytes = run bytes
        stored = sum(_tensor_bytes(headers[n]) for n in expert_tensors) // a.num_experts
        return _summary(model, root, ckpt.config, run_dtype, expert_run_bytes=len(a.moe_layers) * stored,
                        checkpoint_dtype="MXFP4 experts", checkpoint_bytes=on_disk, bytes_per_expert=stored)
    return _summary(
        model, root, ckpt.config, run_dtype, source=ckpt,
        expert_run_bytes=len(a.moe_layers) * per_expert * DTYPES[run_dtype].itemsize,
        checkpoint_dtype=dtype, checkpoint_bytes=on_disk, bytes_per_expert=per_expert * (BY_SAFETENSORS[dtype].itemsize if dtype in BY_SAFETENSORS else 2),
    )


def _tensor_bytes(info: dict) -> int:
    return int(info["data_offsets"][1]) - int(info["data_offsets"][0])


def is_config_only(root: Path) -> bool:
    """A folder with config.json and no weights at all: `inspect` sizes the model from the config."""
    return ((root / "config.json").is_file() and not (root / INDEX_NAME).is_file()
            and not any(root.glob("*.safetensors")))


def summarize_config(config: dict, root: Path, run_dtype: str = "bfloat16") -> ModelSummary:
    """Every figure from config.json alone, through the model built on the meta device (shapes, no
    memory), so a 600 GB model can be sized from its 2 KB config before anything is downloaded.
    With no files there are no stored bytes: checkpoint_bytes is 0 and an expert is counted in run_dtype."""
    model = build_model_for(config, root)
    a = model.args
    per_expert = _expert_params(a) * DTYPES[run_dtype].itemsize
    return _summary(model, root, config, run_dtype, expert_run_bytes=len(a.moe_layers) * per_expert,
                    checkpoint_dtype=CONFIG_ONLY, checkpoint_bytes=0, bytes_per_expert=per_expert)


def _pack_groups(groups: list[dict]) -> list[dict]:
    """describe()'s groups plus the group size each one really uses (narrow rows shrink it)."""
    out = []
    for g in groups:
        used = get_scheme(g["scheme"], **g["params"]).group_size_for(int(g["shape"][1]))
        out.append({**g, "group_size_used": used})
    return out


def summarize_pack(root: Path, run_dtype: str = "bfloat16") -> ModelSummary:
    """A pack: parameters from config.json, bytes from the manifest. Memory figures keep the routed
    experts packed (as the runtime does) and count everything else in `run_dtype`."""
    pack = Pack(root)
    try:
        desc = pack.describe()
        desc["groups"] = _pack_groups(desc["groups"])
        schemes = sorted({g["scheme"] for g in desc["groups"]})
        return _summary(
            build_model_for(pack.config, root), root, pack.config, run_dtype, source=pack,
            expert_run_bytes=sum(desc["bytes_per_expert"].values()),
            checkpoint_dtype="pack: " + "+".join(schemes), checkpoint_bytes=int(desc["pack_bytes"]),
            bytes_per_expert=int(desc["max_expert_bytes"]), pack=desc,
        )
    finally:
        pack.close()


def _expert_params(a) -> int:
    return a.expert_params()


def _summary(model, root: Path, config: dict, run_dtype: str, expert_run_bytes: int, source=None,
             **stored: Any) -> ModelSummary:
    """The figures checkpoints and packs share, from the meta-device `model`. `expert_run_bytes`:
    one routed expert in every MoE layer as the runtime holds it; `stored`: how the files hold it;
    `source` (the checkpoint or pack): the stored dtypes, which decide what the dense weights cost."""
    a = model.args
    dense = sum(p.numel() for n, p in model.named_parameters()  # integer tables (hash routing) are no weights
                if p.is_floating_point() and not (a.tie_word_embeddings and n == "lm_head.weight"))
    per_expert = _expert_params(a)
    n_moe = len(a.moe_layers)
    run = DTYPES[run_dtype]
    resident = resident_bytes(model, run.torch, source)  # as load_weights holds them; before any KV cache exists
    # Caches for 1 and 2 tokens, sized on the meta device: the difference grows with the context, the
    # rest is fixed (a recurrent state, kept in its own dtype whatever run_dtype is).
    one = model.kv_cache_bytes(1, run.torch)
    per_token = model.kv_cache_bytes(2, run.torch) - one
    state = one - per_token
    ctx = int(a.max_position_embeddings)
    kv_total = per_token * ctx
    kv_tokens = min(KV_CONTEXT_DEFAULT, ctx)  # what a budget reserves (cache.options.kv_context)
    kv_budget = model.kv_cache_bytes(kv_tokens, run.torch)
    slot = stored["bytes_per_expert"]
    expanded = a.hidden_size * a.moe_intermediate_size * run.itemsize
    return ModelSummary(
        path=str(root), family=model.family, layers=a.num_hidden_layers, moe_layers=n_moe,
        experts_per_layer=a.num_experts, top_k=a.num_experts_per_tok, shared_experts=_shared_experts(a.raw or config),
        hidden_size=a.hidden_size, expert_intermediate_size=a.moe_intermediate_size, context_length=ctx,
        total_params=dense + n_moe * a.num_experts * per_expert,
        active_params=dense + n_moe * a.num_experts_per_tok * per_expert,
        dense_params=dense, expert_params=per_expert, run_dtype=run_dtype, kv_bytes_per_token=per_token,
        memory_all_resident=resident + a.num_experts * expert_run_bytes + kv_total + state, state_bytes=state,
        memory_min_offload=min_budget(slot_bytes=slot, top_k=a.num_experts_per_tok, resident_bytes=resident,
                                      kv_bytes=kv_budget),
        kv_tokens=kv_tokens,
        memory_min_gpu=min_budget(slot_bytes=slot, top_k=a.num_experts_per_tok, resident_bytes=resident,
                                  kv_bytes=kv_budget, expanded_bytes=expanded, cuda=True),
        **stored,
    )


def pack_rows(pack: dict[str, Any]) -> list[tuple[str, str]]:
    """Table rows for a pack: what it was made from, the scheme of every tensor group, bytes per expert."""
    src = pack.get("source") or {}
    recipe = pack.get("recipe") or {}
    dense = pack["dense"]
    rows = [
        ("pack", pack_size_text(pack["weight_bytes"], pack["other_bytes"])),
        ("routed experts", f"{pack['expert_bits_per_weight']:.3f} bits/weight (scales included)"),
        ("source", str(src.get("ref") or src.get("path") or "?")),
        ("recipe", str(recipe.get("name", "?"))),
        ("dense weights", f"{dense['scheme']} in {dense['file']} ({format_bytes(dense['bytes'])})"),
    ]
    for g in pack["groups"]:
        params = dict(g["params"])
        gs, used = params.pop("group_size", None), g.get("group_size_used")
        desc = g["scheme"]
        if gs is not None:
            desc += f" g{gs}" + (f" (rows of {g['shape'][1]}: g{used})" if used != gs else "")
        desc += "".join(f", {k}={v}" for k, v in params.items())
        rows.append((f"{g['group']}, layers {layer_ranges(g['layers'])}",
                     f"{desc}, [{g['shape'][0]}x{g['shape'][1]}], {g['bits_per_weight']:.3f} bits/weight"))
    by_size: dict[int, list[int]] = {}
    for layer, n in pack["bytes_per_expert"].items():
        by_size.setdefault(int(n), []).append(int(layer))
    for n, layers in sorted(by_size.items(), key=lambda kv: min(kv[1])):
        rows.append((f"bytes per expert, layers {layer_ranges(layers)}", f"{format_bytes(n)} ({n} bytes, one aligned read)"))
    return rows


def pack_size_text(weight_bytes: int, other_bytes: int, approx: bool = False) -> str:
    """One wording for a pack's size in `quantize --dry-run`, the quantize summary and `inspect`
    (measured by pack.pack_size; the dry run's manifest is an estimate, hence approx)."""
    total = format_bytes(weight_bytes + other_bytes)
    return (f"{'~' if approx else ''}{total} on disk = weight files {format_bytes(weight_bytes)} (tensors, headers, "
            f"alignment padding) + manifest, config and tokenizer {format_bytes(other_bytes)}")


__all__ = ["ModelSummary", "is_config_only", "pack_rows", "pack_size_text", "read_safetensors_header", "summarize",
           "summarize_config", "summarize_pack"]
