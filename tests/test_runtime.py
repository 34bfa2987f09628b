"""Generation runtime: sampling filters, stopping, streaming detokenization, chat templates, parity."""

from __future__ import annotations

import json

import pytest
import torch

from moe_local.errors import GenerationError
from moe_local.runtime.chat_template import plain_chat, render_chat
from moe_local.runtime.generate import GenerateOptions, Generator, StepInfo, TextStops
from moe_local.runtime.loader import load_model
from moe_local.runtime.sampling import (
    Sampler,
    SamplingOptions,
    apply_repetition_penalty,
    min_p_filter,
    top_k_filter,
    top_p_filter,
)
from moe_local.runtime.session import ChatSession, Session
from moe_local.runtime.tokenizer import load_tokenizer
from tests.tiny_tokenizer import save_chat_model

GREEDY = SamplingOptions(temperature=0)
NEG = float("-inf")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat_model")
    ref = save_chat_model(path)
    return path, ref


@pytest.fixture(scope="module")
def session(chat_model):
    return Session.open(chat_model[0], device="cpu", dtype="float32")


# ------------------------------------------------------------------ sampling filters
def test_top_k_keeps_exactly_k():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    out = top_k_filter(logits, 2)
    assert torch.isfinite(out).nonzero().flatten().tolist() == [1, 3]
    assert torch.equal(top_k_filter(logits, 0), logits)


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    assert torch.isfinite(top_p_filter(logits, 0.8)).tolist() == [True, True, False, False]
    assert torch.isfinite(top_p_filter(logits, 0.81)).tolist() == [True, True, True, False]
    assert torch.isfinite(top_p_filter(logits, 0.1)).tolist() == [True, False, False, False]  # never empty


def test_min_p_is_relative_to_the_top_token():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = torch.isfinite(min_p_filter(probs.log(), 0.25)).tolist()  # threshold 0.125
    assert kept == [True, True, True, False]


def test_repetition_penalty_follows_llama_cpp():
    logits = torch.tensor([2.0, -2.0, 1.0, 3.0])
    out = apply_repetition_penalty(logits, [0, 1, 1], penalty=2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, 3.0]  # positive divided, negative multiplied, once per token
    assert apply_repetition_penalty(logits, [0, 3], 2.0, last_n=1).tolist() == [2.0, -2.0, 1.0, 1.5]


def test_temperature_zero_is_greedy_and_seed_is_deterministic():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert Sampler(GREEDY)(logits, []) == int(logits.argmax())
    opts = SamplingOptions(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    s1, s2 = Sampler(opts), Sampler(opts)
    draws1 = [s1(logits, []) for _ in range(20)]
    draws2 = [s2(logits, []) for _ in range(20)]
    assert draws1 == draws2 and len(set(draws1)) > 1


def test_sampling_only_draws_surviving_tokens():
    logits = torch.tensor([0.0, 0.1, 0.2, 5.0, 4.9, 4.8])
    s = Sampler(SamplingOptions(temperature=5.0, top_k=2, top_p=1.0, min_p=0.0, seed=0))
    assert {s(logits, []) for _ in range(200)} == {3, 4}


def test_bad_sampling_options_are_user_errors():
    with pytest.raises(GenerationError, match="top-p"):
        Sampler(SamplingOptions(top_p=0.0))


# ------------------------------------------------------------------ stop strings
def test_stop_strings_hold_back_and_cut():
    stops = TextStops(["STOP"])
    assert stops.feed("abc S") == "abc "  # "S" may start STOP: held back
    assert stops.feed("T") == ""
    assert stops.feed("xy") == "STxy"  # not a stop after all
    assert stops.feed("zzSTO") == "zz"
    assert stops.feed("P and more") == "" and stops.stopped
    assert stops.text == "abc STxyzz"


# ------------------------------------------------------------------ tokenizer + streaming
def test_stream_decoder_never_splits_a_character(chat_model):
    tok = load_tokenizer(chat_model[0])
    text = "Grüße 𝄞 café 日本語 🙂!"
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "test needs a character split across tokens"
    dec = tok.stream_decoder()
    deltas = [dec.push(i) for i in ids] + [dec.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids) == text


def test_chat_template_matches_transformers(chat_model):
    from transformers import AutoTokenizer

    path = chat_model[0]
    ref = AutoTokenizer.from_pretrained(path)
    ours = load_tokenizer(path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Grüße, 🙂?"},
                {"role": "assistant", "content": "Hallo."}, {"role": "user", "content": "again"}]
    for add in (True, False):
        expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
        assert render_chat(ours.chat_template, messages, ours.special_tokens, add) == expected
    session = Session(None, ours, None)  # rendering needs no model
    expected_ids = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    expected_ids = expected_ids["input_ids"] if isinstance(expected_ids, dict) or hasattr(expected_ids, "keys") else expected_ids
    assert session.chat_ids(messages) == list(expected_ids)


def test_chat_template_features_like_transformers():
    template = ("{% for m in messages %}{{ m | tojson }}{% if loop.index == 1 %}{% continue %}{% endif %}|{% endfor %}"
                "{{ strftime_now('%Y') | length }}{% if messages | length > 2 %}{{ raise_exception('too many') }}{% endif %}")
    msgs = [{"role": "user", "content": "<é>"}, {"role": "assistant", "content": "b"}]
    assert render_chat(template, msgs) == '{"role": "user", "content": "<é>"}{"role": "assistant", "content": "b"}|4'
    with pytest.raises(GenerationError, match="too many"):
        render_chat(template, msgs * 2)


def test_plain_chat_fallback():
    assert plain_chat([{"role": "user", "content": "hi"}]) == "user: hi\n\nassistant: "


# ------------------------------------------------------------------ generation
def reference_greedy(ref, ids: list[int], n: int) -> list[int]:
    """transformers' greedy generate with an explicit all-ones mask (our BOS id 0 must not be taken for padding)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=2, eos_token_id=None)
    return out[0, len(ids):].tolist()


def test_greedy_generation_matches_transformers(chat_model, session):
    ids = session.prompt_ids("hello experts")
    result = session.generator.generate(ids, GenerateOptions(GREEDY, max_tokens=20, ignore_eos=True))
    assert result.tokens == reference_greedy(chat_model[1], ids, 20)
    assert result.stop_reason == "length" and result.prompt_ids == ids
    assert result.text == session.tokenizer.decode(result.tokens)
    t = result.timings
    assert t.generated_tokens == 20 and len(t.token_latencies_s) == 20 and t.ttft_s > 0


def test_second_request_reuses_the_cached_prefix(session):
    steps: list[StepInfo] = []
    gen = Generator(session.lm, session.tokenizer, on_step=steps.append)
    opts = GenerateOptions(GREEDY, max_tokens=6, ignore_eos=True)
    gen.reserve(64)
    first = gen.generate(session.prompt_ids("hello world"), opts)
    longer = first.prompt_ids + first.tokens + session.tokenizer.encode(" again", add_special_tokens=False)
    steps.clear()
    second = gen.generate(longer, opts)
    assert steps[0].phase == "prefill" and steps[0].start == len(first.prompt_ids) + len(first.tokens) - 1
    fresh = Generator(session.lm, session.tokenizer, reuse_prefix=False).generate(longer, opts)
    assert second.tokens == fresh.tokens


def test_seed_reproducible_and_seeds_differ(session):
    ids = session.prompt_ids("The quick")

    def run(seed):
        opts = GenerateOptions(SamplingOptions(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=seed),
                               max_tokens=16, ignore_eos=True)
        return session.generator.generate(ids, opts).tokens

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_eos_from_generation_config_stops(tmp_path):
    save_chat_model(tmp_path)
    s = Session.open(tmp_path, device="cpu", dtype="float32")
    ids = s.prompt_ids("hello")
    free = s.generator.generate(ids, GenerateOptions(GREEDY, max_tokens=12, ignore_eos=True)).tokens
    eos = free[4]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [9999, eos]}))
    s = Session.open(tmp_path, device="cpu", dtype="float32")
    r = s.generator.generate(ids, GenerateOptions(GREEDY, max_tokens=12))
    assert r.stop_reason == "eos" and r.tokens == free[: free.index(eos) + 1]
    ignored = s.generator.generate(ids, GenerateOptions(GREEDY, max_tokens=12, ignore_eos=True))
    assert ignored.tokens == free and ignored.stop_reason == "length"


def test_stop_string_cuts_text(session):
    ids = session.prompt_ids("hello")
    free = session.generator.generate(ids, GenerateOptions(GREEDY, max_tokens=16, ignore_eos=True))
    windows = [free.text[i : i + 2] for i in range(len(free.text) // 3, len(free.text) - 1)]
    stop = next(w for w in windows if "\ufffd" not in w and w.strip())
    r = session.generator.generate(ids, GenerateOptions(GREEDY, max_tokens=16, ignore_eos=True, stop=[stop]))
    assert r.stop_reason == "stop"
    assert r.text == free.text[: free.text.index(stop)]
    streamed = "".join(e.text for e in session.generator.stream(ids, GenerateOptions(
        GREEDY, max_tokens=16, ignore_eos=True, stop=[stop])))
    assert streamed == r.text


def test_cache_sized_to_prompt_plus_max_tokens_capped_by_context(chat_model):
    lm = load_model(chat_model[0], device="cpu", dtype="float32")
    gen = Generator(lm, None)
    r = gen.generate([5, 6, 7], GenerateOptions(GREEDY, max_tokens=4, ignore_eos=True))
    assert lm.model.max_len == 7 and len(r.tokens) == 4
    r = gen.generate(list(range(10, 130)), GenerateOptions(GREEDY, max_tokens=50, ignore_eos=True))
    assert lm.model.max_len == 128 and len(r.tokens) == 8 and r.stop_reason == "context"


def test_prompt_longer_than_context_is_a_clear_error(session):
    with pytest.raises(GenerationError, match=r"prompt has 128 tokens but the model's context is 128"):
        session.generator.stream([5] * 128, GenerateOptions(GREEDY))
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        session.generator.stream([5, 100000], GenerateOptions(GREEDY))


def test_interrupted_stream_still_gives_a_result_and_chat_continues(session):
    chat = ChatSession(session, system="Be brief.")
    stream = chat.reply("hello", GenerateOptions(GREEDY, max_tokens=10, ignore_eos=True))
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    assert stream.result.stop_reason == "interrupted" and len(stream.result.tokens) == 3
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant"]
    second = chat.reply("again", GenerateOptions(GREEDY, max_tokens=4, ignore_eos=True)).collect()
    assert len(second.tokens) == 4 and len(chat.messages) == 5
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "Be brief."}]


def test_two_generators_on_one_model_do_not_share_stale_keys(session):
    opts = GenerateOptions(GREEDY, max_tokens=5, ignore_eos=True)
    a = Generator(session.lm, session.tokenizer)
    b = Generator(session.lm, session.tokenizer)
    a.reserve(64)
    first = a.generate(session.prompt_ids("hello world"), opts)
    b.generate(session.prompt_ids("Grüße aus"), opts)  # overwrites the cache a had filled
    follow = first.prompt_ids + first.tokens
    fresh = Generator(session.lm, session.tokenizer, reuse_prefix=False).generate(follow, opts)
    assert a.generate(follow, opts).tokens == fresh.tokens


def two_chat_turns(path):
    """Two greedy 4-token chat turns; `steps` holds the forward steps of the second turn only."""
    steps: list[StepInfo] = []
    session = Session.open(path, device="cpu", dtype="float32", on_step=steps.append)
    chat = ChatSession(session)
    opts = GenerateOptions(GREEDY, max_tokens=4, ignore_eos=True)
    first = chat.reply("hello", opts).collect()
    steps.clear()
    second = chat.reply("again", opts).collect()
    return session, steps, first, second


def test_chat_turns_prefill_only_the_new_tokens(chat_model):
    _, steps, first, second = two_chat_turns(chat_model[0])
    prefill = steps[0]
    assert prefill.phase == "prefill" and prefill.start > len(first.prompt_ids) // 2
    assert prefill.start + prefill.tokens == len(second.prompt_ids)
    assert [s.phase for s in steps[1:]] == ["decode"] * 3


def test_chat_turn_timings_count_only_the_prefilled_tokens(chat_model):
    """A reused prefix is not prefilled: prompt tok/s must divide the new tokens only, or turn 2 reads 50x faster."""
    session, steps, first, second = two_chat_turns(chat_model[0])
    assert first.timings.cached_tokens == 0
    t = second.timings
    assert t.cached_tokens == steps[0].start > 0 and t.prompt_tokens == len(second.prompt_ids)
    assert t.prompt_tps == pytest.approx(steps[0].tokens / t.prefill_s)
    assert t.to_dict()["cached_tokens"] == t.cached_tokens
    assert f"prompt {t.prompt_tokens} tokens ({t.cached_tokens} cached, " in t.summary_line()
    report = session.run_report(second)
    assert report["tokens"]["cached"] == t.cached_tokens
    assert report["timings"]["prompt_tps"] == pytest.approx(t.prompt_tps)
