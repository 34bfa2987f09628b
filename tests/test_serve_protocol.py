"""Request fields -> our options, without a server: what is honoured, what is inert, what is refused."""

from __future__ import annotations

import pytest

from moe_local.runtime.sampling import SamplingOptions
from moe_local.serve.protocol import (COMPLETIONS_DEFAULT_MAX_TOKENS, ApiError, Reply, finish_reason, parse_chat,
                                      parse_completion, parse_json)

USER = [{"role": "user", "content": "hi"}]


def chat(**kw):
    return parse_chat({"model": "m", "messages": USER, **kw})


def refused(fn, body) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(body)
    return info.value


def test_omitted_sampling_fields_take_generate_defaults():
    req = chat()
    assert req.options.sampling == SamplingOptions()  # llama.cpp's defaults, as `moe-local generate` uses
    assert req.max_tokens is None and not req.stream and req.options.stop == [] and not req.options.ignore_eos


def test_sampling_fields_map_onto_ours():
    req = chat(temperature=0, top_p=0.5, top_k=7, min_p=0.2, repeat_penalty=1.3, repeat_last_n=-1, seed=3,
               max_tokens=9, stop="END", ignore_eos=True, stream=True, stream_options={"include_usage": True})
    s = req.options.sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.repeat_penalty, s.repeat_last_n, s.seed) == (0, 0.5, 7, 0.2, 1.3, -1, 3)
    assert req.options.max_tokens == 9 and req.options.stop == ["END"] and req.options.ignore_eos
    assert req.stream and req.include_usage


def test_max_completion_tokens_is_the_newer_name_of_max_tokens():
    assert chat(max_completion_tokens=5).max_tokens == 5
    assert chat(max_completion_tokens=5, max_tokens=5).max_tokens == 5
    assert refused(parse_chat, {"model": "m", "messages": USER, "max_completion_tokens": 5,
                                "max_tokens": 6}).param == "max_completion_tokens"
    assert parse_completion({"model": "m", "prompt": "x"}).max_tokens == COMPLETIONS_DEFAULT_MAX_TOKENS


def test_fields_that_ask_for_nothing_we_lack_are_accepted():
    req = chat(n=1, logprobs=False, tools=[], tool_choice="none", frequency_penalty=0, presence_penalty=0,
               response_format={"type": "text"}, user="u1", metadata={"a": "b"}, store=False, logit_bias={})
    assert req.options.sampling == SamplingOptions()


def test_messages_roles_and_text_parts():
    req = parse_chat({"model": "m", "messages": [
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "refusal": None, "tool_calls": None},  # a replayed reply
    ]})
    assert req.messages == [{"role": "system", "content": "rules"}, {"role": "user", "content": "a\nb"},
                            {"role": "assistant", "content": ""}]


@pytest.mark.parametrize("message,param", [
    ({"role": "tool", "content": "42", "tool_call_id": "x"}, "messages[0].role"),
    ({"role": "user"}, "messages[0].content"),
    ({"content": "x"}, "messages[0].role"),
    ({"role": "user", "content": "x", "name": "bob"}, "messages[0].name"),
    ({"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}, "messages[0].tool_calls"),
    ({"role": "user", "content": 5}, "messages[0].content"),
    ({"role": "user", "content": "x", "extra": 1}, "messages[0].extra"),
])
def test_bad_messages_name_the_offending_field(message, param):
    assert refused(parse_chat, {"model": "m", "messages": [message]}).param == param


def test_prompt_forms():
    assert parse_completion({"model": "m", "prompt": "abc"}).prompt_text == "abc"
    assert parse_completion({"model": "m", "prompt": ["abc"]}).prompt_text == "abc"
    assert parse_completion({"model": "m", "prompt": [1, 2]}).prompt_ids == [1, 2]
    assert parse_completion({"model": "m", "prompt": [[1, 2]]}).prompt_ids == [1, 2]
    for bad in ("", [], [[]], [True], 7, {"a": 1}):
        assert refused(parse_completion, {"model": "m", "prompt": bad}).param in ("prompt", "prompt[0]")


@pytest.mark.parametrize("body", [
    {"temperature": True}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -1}, {"min_p": 2}, {"repeat_penalty": 0},
    {"seed": "1"}, {"max_tokens": 0}, {"stop": ["a", 1]}, {"stop": [""]}, {"stream_options": {"include_usage": True}},
    {"stream": True, "stream_options": {"include_usage": "yes"}}, {"stream": True, "stream_options": {"other": 1}},
])
def test_bad_values_are_400_naming_the_param(body):
    err = refused(parse_chat, {"model": "m", "messages": USER, **body})
    assert err.status == 400 and err.param.split(".")[0] == next(k for k in body if k != "stream")


def test_bodies_that_are_not_json_objects():
    for raw in (b"", b"  ", b"{", b"\xff", b"3", b'"x"', b"null"):
        with pytest.raises(ApiError) as info:
            parse_json(raw)
        assert info.value.status == 400 and info.value.body()["error"]["type"] == "invalid_request_error"


def test_stop_reasons_map_to_openai_finish_reasons():
    assert [finish_reason(r) for r in ("eos", "stop", "length", "context", "interrupted")] == \
        ["stop", "stop", "length", "length", "length"]


def test_stream_chunks_have_openais_shape():
    reply = Reply("chat", "m")
    first, delta, last = reply.chunk(None, first=True), reply.chunk("ab"), reply.chunk(None, "stop")
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert delta["choices"][0]["delta"] == {"content": "ab"} and delta["choices"][0]["finish_reason"] is None
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    assert len({first["id"], delta["id"], last["id"]}) == 1 and first["object"] == "chat.completion.chunk"
    use = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    assert reply.usage_chunk(use)["choices"] == [] and reply.usage_chunk(use)["usage"] == use
    assert "usage" not in delta and reply.chunk("x", include_usage=True)["usage"] is None
