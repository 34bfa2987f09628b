"""Build tiny random checkpoints with transformers (the test oracle) and compare against them."""

from __future__ import annotations

from pathlib import Path

import torch

from moe_local.runtime.loader import LoadedModel, load_model

PROMPT_LEN = 16
GREEDY_TOKENS = 24


def save_tiny(config, path: Path, seed: int = 0):
    """Random-weight model from `config`, fp32, eager attention, zero-initialised buffers randomised.

    Returns the transformers model (the reference) after saving it to `path` with save_pretrained.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if "e_score_correction_bias" in name:
                tensor.copy_(torch.rand_like(tensor) * 0.5)  # non-zero: selection must use it
            elif tensor.is_floating_point() and name.endswith("norm.weight"):
                tensor.copy_(1.0 + 0.1 * torch.randn_like(tensor))  # norms start at 1: make them count
    model.eval()
    model.save_pretrained(path)
    return model


def reference_logits(ref, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ref(ids[None]).logits[0].float()


def reference_greedy(ref, ids: torch.Tensor, n: int = GREEDY_TOKENS) -> list[int]:
    with torch.no_grad():
        # An explicit mask: otherwise transformers treats prompt ids equal to pad_token_id as padding.
        out = ref.generate(ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, ids.shape[0]:].tolist()


def our_greedy(lm: LoadedModel, ids: torch.Tensor, n: int = GREEDY_TOKENS) -> list[int]:
    """Prefill then one token at a time through our KV cache."""
    model = lm.model
    model.setup_cache(ids.shape[0] + n)
    logits = model(ids, 0, last_only=True)
    out = []
    pos = ids.shape[0]
    for _ in range(n):
        tok = int(logits[-1].argmax())
        out.append(tok)
        logits = model(torch.tensor([tok]), pos)
        pos += 1
    return out


def assert_matches_reference(path: Path, ref, vocab: int, atol: float = 1e-4, seed: int = 1) -> LoadedModel:
    """Logits within atol on a 16-token prompt and 24 identical greedy tokens."""
    lm = load_model(path, device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (PROMPT_LEN,), generator=g)
    lm.model.setup_cache(PROMPT_LEN)
    ours = lm.model(ids, 0)
    ref_logits = reference_logits(ref, ids)
    diff = (ours - ref_logits).abs().max().item()
    assert diff <= atol, f"max |logit diff| {diff:.3g} > {atol}"
    assert our_greedy(lm, ids) == reference_greedy(ref, ids)
    return lm
