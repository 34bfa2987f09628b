"""Record a routing trace of a DeepSeek-V3-architecture checkpoint with `transformers` (the test oracle).

Stop-gap until moe-local's own DeepSeek model writes traces natively (`generate --trace`): runs the
first N held-out tokens through the model in one teacher-forced forward pass -- which routes every
token exactly as decoding them one by one with a KV cache would -- and records, per token and MoE
layer, the top-k expert ids the router picked. With `--max-depth D` it also records router-lookahead
predictions: at MoE layer L, the routers of layers L+1..L+D applied to L's hidden state (the residual
stream entering L's MoE block, normalised by the later layer's own post-attention norm), top-k plus
`--extra` ids. The first MoE layer F has no MoE layer before it: as the runtime does (models/lookahead.py),
layers F..F+D-1 are predicted from the residual stream entering F (before its attention), stored as
predicted[d] for moe_layers[d - 1]. Those are what `moe-local simulate --prefetch-depth` replays.

    /work/venv/bin/python benchmarks/record_trace.py ../shared/models/pycode-deepseek /tmp/pycode.trace.jsonl

This script imports transformers; moe_local itself never does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from moe_local.cache.trace import TraceWriter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--prefill", type=int, default=0, help="mark the first N tokens as prefill (default: all decode)")
    ap.add_argument("--max-depth", type=int, default=3, help="record router-lookahead predictions 1..D layers ahead")
    ap.add_argument("--extra", type=int, default=0, help="predict top_k + EXTRA ids")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM  # test-only oracle

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager").eval()
    cfg = model.config
    ids = np.load(args.model / "eval_ids.npy")[: args.tokens].astype(np.int64)
    layers = model.model.layers
    moe_layers = [i for i, layer in enumerate(layers) if hasattr(layer.mlp, "gate")]
    top_k = cfg.num_experts_per_tok

    chosen: dict[int, torch.Tensor] = {}
    moe_input: dict[int, torch.Tensor] = {}  # residual stream entering the MoE block of each layer
    first = moe_layers[0]
    hooks = [layers[first].input_layernorm.register_forward_pre_hook(
        lambda mod, inp: moe_input.__setitem__("entry", inp[0].detach().clone())
    )]
    for li in moe_layers:
        hooks.append(layers[li].mlp.gate.register_forward_hook(
            lambda mod, inp, out, li=li: chosen.__setitem__(li, out[2].detach().clone())
        ))
        hooks.append(layers[li].post_attention_layernorm.register_forward_pre_hook(
            lambda mod, inp, li=li: moe_input.__setitem__(li, inp[0].detach().clone())
        ))
    with torch.no_grad():
        model(torch.from_numpy(ids)[None])
        for h in hooks:
            h.remove()
        # predictions[d][i]: ids for moe_layers[i] predicted at moe_layers[i - d] (i < d: at the entry of the first)
        n = len(moe_layers)
        predictions: dict[int, list[torch.Tensor | None]] = {}
        for d in range(1, args.max_depth + 1):
            per_layer: list[torch.Tensor | None] = [None] * n
            for i in range(d - 1, n):
                src, dst = (moe_layers[i - d] if i >= d else "entry"), layers[moe_layers[i]]
                gate = dst.mlp.gate
                saved = gate.top_k
                gate.top_k = top_k + args.extra
                try:
                    per_layer[i] = gate(dst.post_attention_layernorm(moe_input[src]))[2].clone()
                finally:
                    gate.top_k = saved
            predictions[d] = per_layer

    expert_bytes = 3 * cfg.moe_intermediate_size * cfg.hidden_size * 2  # gate, up, down in bf16 as shipped
    with TraceWriter(
        args.out, model=args.model.name, num_experts=cfg.n_routed_experts, top_k=top_k,
        moe_layers=moe_layers, expert_bytes=expert_bytes,
        extra={"source": "transformers teacher-forced forward over eval_ids.npy", "prediction_extra": args.extra},
    ) as w:
        for t in range(len(ids)):
            experts = [sorted(chosen[li][t].tolist()) for li in moe_layers]
            pred = {d: [None if p is None else sorted(p[t].tolist()) for p in per] for d, per in predictions.items()}
            w.record(t, "prefill" if t < args.prefill else "decode", experts, pred or None)

    # quick sanity figure: predictor recall at depth 1
    if 1 in predictions:
        hit = tot = 0
        for i in range(len(moe_layers)):
            p, c = predictions[1][i], chosen[moe_layers[i]]
            for t in range(len(ids)):
                hit += len(set(p[t].tolist()) & set(c[t].tolist()))
                tot += top_k
        print(json.dumps({"trace": str(args.out), "tokens": len(ids), "depth1_recall": round(hit / tot, 4)}))


if __name__ == "__main__":
    main()
