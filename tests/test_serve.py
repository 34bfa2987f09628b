"""`moe-local serve`, started for real on 127.0.0.1 and driven with the `openai` client and raw HTTP.

A tiny Mixtral with a real tokenizer and chat template (4096-position context, so a reply can be
made long enough to still be running while a test fills the queue or hangs up) serves most tests;
the shared trained model checks text and the expert cache on real routing. Every reference answer
comes from `moe-local generate` (or the runtime it calls) with the same prompt and options.
"""

from __future__ import annotations

import json
import signal
import threading

import httpx
import pytest
from typer.testing import CliRunner

openai = pytest.importorskip("openai")

from moe_local.cli.app import app  # noqa: E402
from tests.serve_helpers import ServerProcess, parse_prometheus, raw_post, read_status, value  # noqa: E402
from tests.tiny_tokenizer import save_chat_model  # noqa: E402

KEY = "sk-test-serve"
ALIAS = "tiny-moe"
CTX = 4096
LONG = {"max_tokens": 3000, "ignore_eos": True, "temperature": 0}  # far longer than any test waits
T = 30.0  # seconds: the bound on every single request

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve_model")
    save_chat_model(path, max_position_embeddings=CTX)
    return path


@pytest.fixture(scope="module")
def reference(tiny_model):
    """The runtime `moe-local generate` calls, loaded once: greedy text for a prompt, from a fresh KV cache."""
    from moe_local.runtime.generate import GenerateOptions, Generator
    from moe_local.runtime.sampling import SamplingOptions
    from moe_local.runtime.session import Session

    session = Session.open(tiny_model, "cpu", "float32")

    def greedy(ids: list[int], n: int) -> str:
        gen = Generator(session.lm, session.tokenizer, reuse_prefix=False)
        return gen.generate(ids, GenerateOptions(SamplingOptions(temperature=0), max_tokens=n, ignore_eos=True)).text

    return session, greedy


@pytest.fixture(scope="module")
def server(tiny_model):
    srv = ServerProcess(tiny_model, "--api-key", KEY, "--alias", ALIAS, "--max-queue", "8")
    yield srv
    assert srv.terminate() == 0


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=T, max_retries=0)


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=T) as c:
        yield c


def generate_json(model, *args: str) -> dict:
    """The reference: `moe-local generate --json` in this process."""
    result = runner.invoke(app, ["generate", str(model), "--json", "--device", "cpu", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def sse_events(response: httpx.Response) -> list:
    """The `data:` payloads of a server-sent-event stream, "[DONE]" kept as the string."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return out


def metrics(http) -> dict:
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return parse_prometheus(r.text)


def wait_until(http, pred, what: str, polls: int = 300) -> dict:
    """Poll /health (bounded) until pred(health) holds."""
    for _ in range(polls):
        h = http.get("/health").json()
        if pred(h):
            return h
        threading.Event().wait(0.05)
    raise AssertionError(f"server never reached: {what} (last /health: {h})")


# ------------------------------------------------------------------ models, generation parity
def test_models_lists_the_alias_and_health_needs_no_key(server, client):
    assert [m.id for m in client.models.list().data] == [ALIAS]
    assert client.models.retrieve(ALIAS).id == ALIAS
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    r = httpx.get(server.url + "/health", timeout=T)
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_chat_matches_generate(tiny_model, client):
    ref = generate_json(tiny_model, "--system", "Be brief.", "--prompt", "hello experts", "-n", "20",
                        "--temperature", "0")
    r = client.chat.completions.create(model=ALIAS, max_tokens=20, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello experts"}])
    assert r.object == "chat.completion" and r.model == ALIAS and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ref["text"]
    assert choice.finish_reason == ("length" if ref["stop_reason"] == "length" else "stop")
    assert r.usage.prompt_tokens == len(ref["prompt_tokens"]) and r.usage.completion_tokens == len(ref["tokens"])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_matches_generate_and_ends_with_usage_and_done(tiny_model, client, http):
    ref = generate_json(tiny_model, "--chat", "--prompt", "Grüße aus München", "-n", "24", "--temperature", "0",
                        "--ignore-eos")
    body = {"model": ALIAS, "messages": [{"role": "user", "content": "Grüße aus München"}], "max_tokens": 24,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    chunks = list(client.chat.completions.create(**{k: v for k, v in body.items() if k != "ignore_eos"},
                                                 extra_body={"ignore_eos": True}))
    assert all(c.object == "chat.completion.chunk" and c.model == ALIAS for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == ref["text"]
    reasons = [c.choices[0].finish_reason for c in with_choices]
    assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == len(ref["prompt_tokens"])
    assert all(c.usage is None for c in chunks[:-1])
    # The wire format: every event a `data:` line, text deltas never empty, `[DONE]` last.
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[1:-1] if e["choices"]]
    assert all(d.get("content") for d in deltas[:-1]) and deltas[-1] == {}
    assert "".join(d.get("content", "") for d in deltas) == ref["text"]


def test_completions_text_ids_and_stream_match_generate(tiny_model, client):
    ref = generate_json(tiny_model, "--prompt", "The quick brown", "-n", "16", "--temperature", "0", "--ignore-eos")
    args = dict(model=ALIAS, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    r = client.completions.create(prompt="The quick brown", **args)
    assert r.object == "text_completion" and r.choices[0].text == ref["text"]
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 16
    by_ids = client.completions.create(prompt=ref["prompt_tokens"], **args)
    assert by_ids.choices[0].text == ref["text"] and by_ids.usage.prompt_tokens == len(ref["prompt_tokens"])
    streamed = list(client.completions.create(prompt="The quick brown", stream=True, **args))
    assert "".join(c.choices[0].text for c in streamed) == ref["text"]
    assert [c.choices[0].finish_reason for c in streamed][-1] == "length"


def test_completions_default_to_16_tokens_like_openai(client):
    r = client.completions.create(model=ALIAS, prompt="hello", temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_seeded_sampling_and_extensions_match_generate(tiny_model, client):
    ref = generate_json(tiny_model, "--prompt", "hello world", "-n", "20", "--temperature", "1.3", "--seed", "11",
                        "--top-k", "20", "--min-p", "0.01", "--repeat-penalty", "1.1", "--ignore-eos")
    r = client.completions.create(model=ALIAS, prompt="hello world", max_tokens=20, temperature=1.3, seed=11,
                                  extra_body={"top_k": 20, "min_p": 0.01, "repeat_penalty": 1.1, "ignore_eos": True})
    assert r.choices[0].text == ref["text"]


def test_stop_string_ends_with_stop(tiny_model, client):
    free = generate_json(tiny_model, "--prompt", "hello", "-n", "24", "--temperature", "0", "--ignore-eos")["text"]
    stop = next(free[i:i + 2] for i in range(len(free) // 3, len(free) - 1)
                if "\ufffd" not in free[i:i + 2] and free[i:i + 2].strip())
    r = client.completions.create(model=ALIAS, prompt="hello", max_tokens=24, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == free[: free.index(stop)] and r.choices[0].finish_reason == "stop"


def test_multi_turn_chat_prefills_only_the_new_turn(client, reference):
    session, greedy = reference
    turn1 = [{"role": "user", "content": "def add(a, b):"}]
    a = client.chat.completions.create(model=ALIAS, messages=turn1, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    turn2 = turn1 + [{"role": "assistant", "content": a.choices[0].message.content},
                     {"role": "user", "content": "hello again"}]
    b = client.chat.completions.create(model=ALIAS, messages=turn2, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert b.usage.prompt_tokens_details.cached_tokens >= a.usage.prompt_tokens  # turn 1 was not prefilled again
    assert b.choices[0].message.content == greedy(session.chat_ids(turn2), 12)


# ------------------------------------------------------------------ queueing, cancellation
def test_eight_concurrent_clients_each_get_their_own_answer(server, client):
    """Asked together, each client gets what it gets when asked alone (whose parity with generate the tests
    above check): complete, in order, nothing of another request's text."""
    prompts = ["The quick brown fox", "hello world", "Mixture of experts", "Un café crème", "def add(a, b):",
               "Grüße aus", "hello tokens", "lazy dog"]
    refs = [client.completions.create(model=ALIAS, prompt=p, max_tokens=24, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
    assert len(set(refs)) == len(refs)  # distinct answers, so a mix-up would show
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=60, max_retries=0)
            stream = c.completions.create(model=ALIAS, prompt=prompts[i], max_tokens=24, temperature=0, stream=True,
                                          extra_body={"ignore_eos": True})
            results[i] = "".join(chunk.choices[0].text for chunk in stream)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    assert all(not t.is_alive() for t in threads), "a client never got its answer"
    assert [results[i] for i in range(len(prompts))] == refs


def test_full_queue_answers_503_with_retry_after(server, http):
    start = len(server.lines)
    with http.stream("POST", "/v1/completions", json={"model": ALIAS, "prompt": "hello", "stream": True, **LONG}) as r:
        assert r.status_code == 200, r.read()
        lines = r.iter_lines()  # kept: a dropped iterator closes the response, which would cancel the reply
        next(lines)  # the long reply is running
        waiting = [raw_post(server.port, "/v1/completions", {"model": ALIAS, "prompt": f"q{i}", "max_tokens": 2}, KEY)
                   for i in range(8)]
        try:
            wait_until(http, lambda h: h["queue_depth"] == 8, "8 requests waiting")
            full = http.post("/v1/chat/completions", json={"model": ALIAS, "messages": [{"role": "user", "content": "hi"}]})
            assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
            err = full.json()["error"]
            assert err["code"] == "queue_full" and "--max-queue 8" in err["message"] and err["type"] == "server_error"
        finally:
            for s in waiting:  # hanging up takes a request out of the queue
                s.close()
        wait_until(http, lambda h: h["queue_depth"] == 0, "the queue emptied by the hang-ups")
        hung_up = [l for l in server.lines[start:] if "POST /v1/completions 499 prompt" in l and l.endswith("cancelled")]
        assert len(hung_up) == 8  # they left the queue without running: the long reply still holds the model
    wait_until(http, lambda h: not h["running"], "the long reply cancelled")


def test_disconnect_cancels_the_generation(server, http):
    before = metrics(http)
    start = len(server.lines)
    with http.stream("POST", "/v1/completions", json={"model": ALIAS, "prompt": "hello", "stream": True, **LONG}) as r:
        lines = r.iter_lines()
        for _ in range(6):  # a few tokens arrive, then the client hangs up
            next(lines)
    r = http.post("/v1/completions", json={"model": ALIAS, "prompt": "hi", "max_tokens": 3, "ignore_eos": True,
                                           "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    after = metrics(http)
    cancelled = (value(after, "moe_local_generations_total", finish_reason="cancelled")
                 - value(before, "moe_local_generations_total", finish_reason="cancelled"))
    generated = value(after, "moe_local_completion_tokens_total") - value(before, "moe_local_completion_tokens_total")
    assert cancelled == 1
    assert generated - 3 < LONG["max_tokens"]  # it stopped: the next request did not wait for 3000 tokens
    line = server.wait_for_line(lambda l: "POST /v1/completions 200" in l and l.endswith("cancelled"), T, start)
    assert "prompt " in line and "completion " in line


# ------------------------------------------------------------------ errors
CHAT = {"model": ALIAS, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", {"model": ALIAS}, 400, "messages"),
    ("/v1/chat/completions", {"messages": CHAT["messages"]}, 400, "model"),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages[0].content[0]"),
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {**CHAT, "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 1.5}, 400, "max_tokens"),
    ("/v1/chat/completions", {**CHAT, "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {**CHAT, "stop": 3}, 400, "stop"),
    ("/v1/chat/completions", {**CHAT, "model": "gpt-4o"}, 404, "model"),
    ("/v1/chat/completions", {**CHAT, "n": 2}, 400, "n"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True}, 400, "logprobs"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("/v1/chat/completions", {**CHAT, "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ("/v1/chat/completions", {**CHAT, "mirostat": 2}, 400, "mirostat"),
    ("/v1/completions", {"model": ALIAS}, 400, "prompt"),
    ("/v1/completions", {"model": ALIAS, "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"model": ALIAS, "prompt": [1, "x"]}, 400, "prompt"),
    ("/v1/completions", {"model": ALIAS, "prompt": [999999]}, 400, "prompt"),
    ("/v1/completions", {"model": ALIAS, "prompt": "a", "echo": True}, 400, "echo"),
    ("/v1/completions", {"model": ALIAS, "prompt": "a", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
])
def test_bad_requests_get_openai_error_objects(http, path, body, status, param):
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"] and err["param"] == param


def test_over_long_prompt_names_the_context_size(http):
    r = http.post("/v1/completions", json={"model": ALIAS, "prompt": [5] * CTX})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and f"context size is {CTX} tokens" in err["message"]


def test_the_openai_client_raises_on_unsupported_fields(client):
    with pytest.raises(openai.BadRequestError, match="one choice per request"):
        client.chat.completions.create(model=ALIAS, messages=CHAT["messages"], n=2)


def test_unknown_paths_and_methods_are_error_objects(http):
    assert http.get("/v1/nothing").json()["error"]["code"] == "not_found"
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_api_key_is_required(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(server.url + "/v1/chat/completions", json=CHAT, headers=headers, timeout=T)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(server.url + "/metrics", headers=headers, timeout=T).status_code == 401
    bad_client = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", timeout=T, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_client.models.list()


# ------------------------------------------------------------------ metrics and logs
def test_metrics_parse_and_move_after_a_request(http, client, server):
    before = metrics(http)
    start = len(server.lines)
    r = client.chat.completions.create(model=ALIAS, messages=CHAT["messages"], max_tokens=5, temperature=0,
                                       extra_body={"ignore_eos": True})
    after = metrics(http)
    assert value(after, "moe_local_expert_uses_total") > value(before, "moe_local_expert_uses_total")
    assert value(after, "moe_local_expert_hits_total") > value(before, "moe_local_expert_hits_total")
    assert value(after, "moe_local_cache_tier_hits_total", tier="ram") > value(before, "moe_local_cache_tier_hits_total", tier="ram")
    assert 0 <= value(after, "moe_local_expert_hit_ratio") <= 1
    for name in ("moe_local_cache_bytes_moved_total", "moe_local_prefetch_precision", "moe_local_prefetch_recall",
                 "moe_local_cache_stall_seconds_total", "moe_local_queue_depth", "moe_local_requests_running"):
        assert name in after
    assert value(after, "moe_local_completion_tokens_total") - value(before, "moe_local_completion_tokens_total") == 5
    assert value(after, "moe_local_ttft_seconds_count") == value(before, "moe_local_ttft_seconds_count") + 1
    assert value(after, "moe_local_token_latency_seconds_count") == value(before, "moe_local_token_latency_seconds_count") + 4
    key = dict(method="POST", path="/v1/chat/completions", status="200")
    assert value(after, "moe_local_requests_total", **key) == value(before, "moe_local_requests_total", absent=0, **key) + 1
    # ...and one log line for it, with its tokens and timings.
    line = server.wait_for_line(lambda l: "POST /v1/chat/completions 200" in l, T, start)
    assert f"prompt {r.usage.prompt_tokens} tokens" in line and "completion 5 tokens" in line
    assert "TTFT " in line and " tok/s" in line and line.endswith("length")


# ------------------------------------------------------------------ shutdown
def test_sigterm_mid_stream_sends_a_final_chunk_and_exits_0(tiny_model):
    srv = ServerProcess(tiny_model, "--max-queue", "2", "--alias", ALIAS)
    try:
        with httpx.Client(base_url=srv.url, timeout=T) as http:
            with http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True,
                                                                   **LONG}) as r:
                assert r.status_code == 200, r.read()
                lines = r.iter_lines()
                next(lines)
                queued = raw_post(srv.port, "/v1/completions", {"model": ALIAS, "prompt": "x"})
                wait_until(http, lambda h: h["queue_depth"] == 1, "one request waiting")
                srv.proc.send_signal(signal.SIGTERM)
                events = [json.loads(l[6:]) if l != "data: [DONE]" else "[DONE]" for l in lines if l]
            status, _ = read_status(queued)
            queued.close()
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
        assert status == 503  # the waiting request is refused, not left hanging
    finally:
        code = srv.terminate()
    assert code == 0
    assert any("server stopped" in l for l in srv.lines)


# ------------------------------------------------------------------ the trained model
@pytest.fixture(scope="module")
def shared_server(shared_model):
    srv = ServerProcess(shared_model, "--ram", "17MiB")  # weights + KV cache (14 MiB) + ~30 expert slots
    yield srv
    assert srv.terminate() == 0


def test_shared_model_streams_generate_text_and_shows_the_cache(shared_model, shared_server):
    # The reference keeps every expert resident, the server pages them through 17 MiB: the same tokens.
    ref = generate_json(shared_model, "--prompt", "def fibonacci(n):", "-n", "24", "--temperature", "0",
                        "--experts", "resident")
    client = openai.OpenAI(base_url=shared_server.url + "/v1", api_key="unused", timeout=60, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["pycode-deepseek"]  # the folder name
    with httpx.Client(base_url=shared_server.url, timeout=T) as http:
        before = metrics(http)
        stream = client.completions.create(model="pycode-deepseek", prompt="def fibonacci(n):", max_tokens=24,
                                           temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in stream) == ref["text"]
        after = metrics(http)
    moved = lambda s: value(s, "moe_local_cache_bytes_moved_total", link="disk_to_ram")  # noqa: E731
    assert value(after, "moe_local_expert_hits_total") > value(before, "moe_local_expert_hits_total")
    assert moved(after) > moved(before)  # 17 MiB holds under a tenth of the experts: some are paged in
    assert value(after, "moe_local_prefetch_issued_total") > value(before, "moe_local_prefetch_issued_total")
    assert value(after, "moe_local_cache_tier_slots", tier="ram") > 0


def test_shared_model_chat_uses_the_plain_fallback_like_generate(shared_model, shared_server):
    ref = generate_json(shared_model, "--chat", "--prompt", "def is_even(n):", "-n", "16", "--temperature", "0",
                        "--experts", "resident")
    client = openai.OpenAI(base_url=shared_server.url + "/v1", api_key="unused", timeout=60, max_retries=0)
    r = client.chat.completions.create(model="pycode-deepseek", max_tokens=16, temperature=0,
                                       messages=[{"role": "user", "content": "def is_even(n):"}])
    assert r.choices[0].message.content == ref["text"]


# ------------------------------------------------------------------ the command's own errors
def test_port_in_use_is_one_error_line_before_loading(tiny_model):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["serve", str(tiny_model), "--port", str(port)])
    assert result.exit_code == 1
    assert result.output.startswith(f"error: --host 127.0.0.1 --port {port}: cannot listen there")
    assert "loaded" not in result.output and len(result.output.strip().splitlines()) == 1


def test_without_the_server_packages_serve_says_how_to_install(tiny_model, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if it were not installed
    result = runner.invoke(app, ["serve", str(tiny_model)])
    assert result.exit_code == 1
    assert result.output.strip() == ("error: `moe-local serve` needs starlette and uvicorn (uvicorn is not installed): "
                                     "pip install 'moe-local[serve]'")
