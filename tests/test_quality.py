"""Quality bars on the shared trained model (real routing, real weights): perplexity of packs vs bf16.

2048 held-out tokens (4 windows of 512) from eval_ids.npy, scored by the bf16 checkpoint and by packs
of it. Bars from the pack issue: int8 within 0.5% of bf16, int4 within 3%, and the error-minimising
ternary rule strictly better than naive absmean (in perplexity and in KL to bf16).
"""

from __future__ import annotations

import pytest

from moe_local.runtime.evaluate import evaluate, load_token_ids, window_logprobs
from moe_local.convert.quantize import quantize
from moe_local.convert.recipes import build_recipe
from moe_local.runtime.loader import load_model

TOKENS = 2048
WINDOW = 512
SCHEMES = ("int8", "int4", "ternary", "ternary-absmean")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(shared_model, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("quality")
    reference = load_model(shared_model, device="cpu", dtype="float32")
    ids = load_token_ids(shared_model / "eval_ids.npy", TOKENS, reference.config["vocab_size"])
    ref_logp = window_logprobs(reference, ids, WINDOW)  # computed once, compared with every pack
    out = {"bf16": evaluate(reference, ids, WINDOW, reference=ref_logp)}
    for scheme in SCHEMES:
        pack = root / scheme
        quantize(shared_model, pack, build_recipe(scheme))
        lm = load_model(pack, device="cpu", dtype="float32")
        out[scheme] = evaluate(lm, ids, WINDOW, reference=ref_logp)
    return out


def test_int8_perplexity_within_half_a_percent_of_bf16(results):
    assert results["bf16"].tokens == TOKENS - TOKENS // WINDOW
    assert results["int8"].ppl <= results["bf16"].ppl * 1.005
    assert results["int8"].top1 > 0.98


def test_int4_perplexity_within_three_percent_of_bf16(results):
    assert results["int4"].ppl <= results["bf16"].ppl * 1.03
    assert results["int4"].kl > results["int8"].kl  # fewer bits, more divergence: the measure sees it


def test_error_minimising_ternary_beats_naive_absmean(results):
    assert results["ternary"].ppl < results["ternary-absmean"].ppl
    assert results["ternary"].kl < results["ternary-absmean"].kl
    assert results["ternary"].top1 > results["ternary-absmean"].top1
