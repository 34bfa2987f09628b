"""Shared builders of the cache tests: tiny real packs (quantized with moe_local.convert from tiny
transformers checkpoints, or from the shared trained model), provider factories with exact slot
counts and a run helper. The fixtures built from them (`pack`, `one_thread`) are in conftest.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moe_local.cache.tiered import TieredExperts
from moe_local.runtime.loader import LoadedModel, load_model
from tests.tiny import our_greedy

PROMPT = 16
NEW = 16


def make_deepseek_pack(shared_model: Path, root: Path) -> Path:
    """The shared trained DeepSeek-V3-architecture model as an INT4 pack (layer 0 dense, 6 MoE layers)."""
    from moe_local.convert.quantize import quantize
    from moe_local.convert.recipes import build_recipe

    quantize(shared_model, root / "pack", build_recipe("int4"))
    return root / "pack"


def eval_ids(shared_model: Path, n: int) -> torch.Tensor:
    """The first n held-out token ids of the shared model."""
    return torch.from_numpy(np.load(shared_model / "eval_ids.npy")[:n].astype(np.int64))


def make_mixtral_pack(root: Path, scheme: str = "int4") -> Path:
    from moe_local.convert.quantize import quantize
    from moe_local.convert.recipes import build_recipe
    from tests.tiny import mixtral_config, save_tiny

    save_tiny(mixtral_config(), root / "ckpt")
    quantize(root / "ckpt", root / "pack", build_recipe(scheme, group_size=16 if scheme == "int4" else None))
    return root / "pack"


def lookahead(model, depth: int, extra: int):
    return model.lookahead(depth, extra)


def tiered_factory(slots: int, policy: str = "lru", depth: int = 0, extra: int = 0, future=None,
                   miss: str = "transfer", trace=None, record: bool = False, io_threads: int = 2,
                   gpu_slots: int | None = None, predictor_cls=None):
    """gpu_slots: also a device tier of that many slots -- on a CPU the simulated one (two_tier=True).
    predictor_cls(model, depth, extra): instead of the model's own look-ahead (model.lookahead)."""
    # A ProviderFactory with an exact slot count (budgets in bytes are tested separately).

    def factory(source, model, device, dtype):
        from moe_local.cache.trace import TraceRecorder

        rec = None
        if trace is not None:
            rec = TraceRecorder(trace, model.args.model_type, source.num_experts, model.args.num_experts_per_tok,
                                source.moe_layers, source.max_expert_nbytes())
        return TieredExperts(source, top_k=model.args.num_experts_per_tok, host_slots=slots,
                             act=model.args.expert_act, device=device, dtype=dtype, policy=policy, future=future,
                             predictor=(predictor_cls or lookahead)(model, depth, extra) if depth else None, miss=miss,
                             io_threads=io_threads, trace=rec, record_accesses=record,
                             gpu_slots=gpu_slots or 0, two_tier=gpu_slots is not None or None)

    return factory


def run(path: Path, ids: torch.Tensor, provider=None, device: str = "cpu", dtype: str = "float32",
        new: int = NEW) -> tuple[torch.Tensor, list[int], LoadedModel]:
    """Prompt logits (all positions) and `new` greedy tokens."""
    kw = {} if provider is None else {"provider": provider}
    lm = load_model(path, device=device, dtype=dtype, **kw)
    lm.model.setup_cache(ids.shape[0] + new)
    logits = lm.model(ids.to(lm.device), 0)
    tokens = our_greedy(lm, ids.to(lm.device), new)
    if hasattr(lm.provider, "close"):
        lm.provider.close()
    return logits.cpu(), tokens, lm


def tier(provider, name: str = "ram"):
    """What one tier of a TieredExperts holds now (its public TierState)."""
    return next(s for s in provider.tier_states() if s.name == name)
