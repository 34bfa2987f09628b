"""moe-local vs llama.cpp on the same model, the same formats and the same threads (never run in CI).

What it does, in order:

1. the model: the issue-7 benchmark model -- a random-weight, Qwen3-30B-A3B-shaped Qwen3MoE (hidden
   2048, 6 layers, 128 experts, top-8, expert size 768, 32000 ids; 7.3 GiB in bf16) saved with
   transformers' `save_pretrained` into /tmp/bench/q3moe (built into q3moe.building, then renamed;
   reused when it exists; other benchmarks share it) -- or any Hugging Face folder (`--model DIR`);
2. llama.cpp: the llama-cpp-python sdist (which vendors llama.cpp) fetched with `pip download`,
   llama-bench and llama-quantize built with cmake in --work (CPU only, -DGGML_NATIVE=ON), never a
   dependency of moe-local; the checkpoint converted with the vendored convert_hf_to_gguf.py (a local
   copy that maps our byte-level test tokenizer's pre-tokenizer to gpt-2) and quantized to Q8_0, Q4_0,
   TQ1_0 and TQ2_0;
3. ours: `moe-local quantize` to the matching schemes: int8 <-> Q8_0, int4 group 32 <-> Q4_0 (both
   32-weight blocks; see FORMATS), ternary <-> TQ1_0 / TQ2_0;
4. runs `llama-bench -p P -n N -r R -t T` and `moe-local bench` with the same figures ALTERNATELY for
   --rounds rounds, and prints per format the median prompt (pp) and decode (tg) tok/s, min/max over
   rounds, the ratio ours/theirs and the % of the bandwidth roofline (tg x bytes read per token /
   measured bandwidth);
5. `--limit 1GiB` (root only): the bigger-than-RAM mode. Each run goes into a memory cgroup with that
   limit (cgroup v1 /sys/fs/cgroup/memory or v2), the page cache dropped first; llama.cpp runs with
   `--repack 0` (pure mmap: weights paged in from the file) and default, moe-local with
   `--experts tiered --ram` inside the limit; 1 thread and T threads.

Results: a table on stdout and one JSON object (`--json FILE`, written atomically).

    python benchmarks/peer.py --json peer.json                      # Q8_0, Q4_0, TQ1_0, TQ2_0
    python benchmarks/peer.py --formats q4_0 --rounds 3 --threads 2
    python benchmarks/peer.py --limit 1GiB --formats q4_0           # bigger-than-RAM (root)
    python benchmarks/peer.py --model ~/models/Qwen3-30B-A3B --formats q4_0
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_MODEL = Path("/tmp/bench/q3moe")
BENCH_CONFIG = dict(hidden_size=2048, num_hidden_layers=6, num_experts=128, num_experts_per_tok=8,
                    moe_intermediate_size=768, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                    vocab_size=32000, intermediate_size=6144, max_position_embeddings=4096,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
TOKENIZER_TEXT = [
    "def main(argv=None):\n    parser = argparse.ArgumentParser()\n    return 0\n",
    "The quick brown fox jumps over the lazy dog. Mixture of experts route tokens.",
    "for i in range(10):\n    print(i, i * i)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ the model
def save_tokenizer(path: Path) -> None:
    """A small byte-level BPE tokenizer (llama.cpp's converter needs one; the ids it covers do not matter)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TOKENIZER_TEXT * 4, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "model_max_length": 4096, "clean_up_tokenization_spaces": False}, indent=2))


def build_bench_model(target: Path = BENCH_MODEL, seed: int = 0) -> Path:
    """The issue-7 model in bf16 at `target` (built beside it, then renamed: a half-built folder never shows).

    If another benchmark is building it right now (`<target>.building` exists and grows), wait for it."""
    if (target / "config.json").is_file():
        return target
    building = target.with_name(target.name + ".building")
    if building.exists():
        log(f"{building} exists: waiting for the other build to finish (delete it if that build died)")
        while building.exists() and not (target / "config.json").is_file():
            time.sleep(10)
        if (target / "config.json").is_file():
            return target
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    log(f"building the benchmark model into {building} (bf16, ~7.3 GiB) ...")
    building.mkdir(parents=True)
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(**BENCH_CONFIG)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(building)
    save_tokenizer(building)
    del model
    building.rename(target)
    log(f"built {target}")
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--build-only", action="store_true", help="only build the benchmark model")
    args = p.parse_args(argv)
    if args.build_only:
        build_bench_model()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
