"""The real `moe-local` commands on a tiny Mixtral with a tiny real tokenizer (typer's CliRunner)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from moe_local.cli.app import app
from moe_local.runtime.tokenizer import load_tokenizer
from tests.tiny_tokenizer import save_chat_model

runner = CliRunner()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_model")
    ref = save_chat_model(path)
    return path, ref


def run(*args: str, input: str | None = None):
    result = runner.invoke(app, [str(a) for a in args], input=input)
    assert result.exit_code == 0, result.output
    return result


def gen_json(path, *args: str, keep_cache: bool = False) -> dict:
    """The --json object; its "cache" section (hit rates depend on transfer timing) dropped unless asked for."""
    payload = json.loads(run("generate", path, "--json", *args).stdout)
    if not keep_cache:
        payload.pop("cache", None)
    return payload


def test_generate_streams_text_and_prints_one_timing_line(model):
    r = run("generate", model[0], "--prompt", "hello experts", "-n", "12", "--seed", "1")
    assert r.stdout.strip()  # the continuation
    timing = [line for line in r.stderr.splitlines() if line.startswith("prompt ")]
    assert len(timing) == 1
    n_prompt = len(load_tokenizer(model[0]).encode("hello experts"))
    assert timing[0].startswith(f"prompt {n_prompt} tokens (") and "generated 12 tokens (" in timing[0] and "TTFT" in timing[0]


def test_generate_json_fields_and_greedy_parity_with_transformers(model):
    out = gen_json(model[0], "--prompt", "hello experts", "-n", "16", "--temperature", "0", "--ignore-eos")
    assert set(out) >= {"prompt_tokens", "tokens", "text", "stop_reason", "timings"}
    assert set(out["timings"]) >= {"prompt_tps", "gen_tps", "ttft_s", "token_latencies_s"}
    assert out["stop_reason"] == "length" and len(out["tokens"]) == 16
    x = torch.tensor([out["prompt_tokens"]])
    with torch.no_grad():
        ref = model[1].generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, min_new_tokens=16,
                                do_sample=False, pad_token_id=2, eos_token_id=None)
    assert out["tokens"] == ref[0, x.shape[1]:].tolist()


def test_generate_prompt_from_stdin(model):
    args = ("-n", "3", "--temperature", "0", "--ignore-eos")
    piped = json.loads(run("generate", model[0], "--json", "--prompt", "-", *args, input="hello experts").stdout)
    piped.pop("cache", None)
    assert piped == {**gen_json(model[0], "--prompt", "hello experts", *args), "timings": piped["timings"]}


def test_generate_seed_reproducible(model):
    args = ("--prompt", "The quick", "-n", "12", "--temperature", "1.5", "--top-k", "0", "--min-p", "0", "--ignore-eos")
    a = gen_json(model[0], *args, "--seed", "5")
    assert a == {**gen_json(model[0], *args, "--seed", "5"), "timings": a["timings"]}
    assert a["tokens"] != gen_json(model[0], *args, "--seed", "6")["tokens"]


def test_generate_stop_string(model):
    free = gen_json(model[0], "--prompt", "hello", "-n", "16", "--temperature", "0", "--ignore-eos")
    text = free["text"]
    stop = next(text[i : i + 2] for i in range(len(text) // 3, len(text) - 1)
                if "\ufffd" not in text[i : i + 2] and text[i : i + 2].strip())
    out = gen_json(model[0], "--prompt", "hello", "-n", "16", "--temperature", "0", "--ignore-eos", "--stop", stop)
    assert out["stop_reason"] == "stop" and out["text"] == text[: text.index(stop)]


def test_generate_chat_prompt_uses_the_template(model):
    from transformers import AutoTokenizer

    out = gen_json(model[0], "--prompt", "hi", "--system", "Be brief.", "-n", "2", "--temperature", "0")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    expected = AutoTokenizer.from_pretrained(model[0]).apply_chat_template(msgs, add_generation_prompt=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert out["prompt_tokens"] == list(expected)


def test_generate_prompt_ids_without_tokenizer(model, tmp_path):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model[0] / name, tmp_path / name)
    out = gen_json(tmp_path, "--prompt-ids", "5,6,7", "-n", "4", "--temperature", "0", "--ignore-eos")
    assert out["prompt_tokens"] == [5, 6, 7] and len(out["tokens"]) == 4 and out["text"] == ""
    with_tok = gen_json(model[0], "--prompt-ids", "5,6,7", "-n", "4", "--temperature", "0", "--ignore-eos")
    assert with_tok["tokens"] == out["tokens"]
    streamed = run("generate", tmp_path, "--prompt-ids", "5,6,7", "-n", "4", "--temperature", "0", "--ignore-eos")
    assert streamed.stdout.split() == [str(t) for t in out["tokens"]]


def test_chat_repl(model):
    r = run("chat", model[0], "--system", "Be brief.", "-n", "6", "--temperature", "0",
            input="hi\n/stats\n/reset\n/help\nline one \\\nline two\n/quit\n")
    assert "generated tokens" in r.stdout and "time to first token" in r.stdout  # /stats table
    assert "(conversation cleared)" in r.stdout
    assert "/reset" in r.stdout and '"""' in r.stdout  # /help documents commands and multi-line input
    assert sum(line.startswith("prompt ") for line in r.stderr.splitlines()) == 2  # one timing line per reply


def test_chat_eof_exits_cleanly_and_block_input(model):
    r = run("chat", model[0], "-n", "3", "--temperature", "0", input='"""\nfirst\nsecond\n"""\n')
    assert sum(line.startswith("prompt ") for line in r.stderr.splitlines()) == 1


def test_chat_without_template_says_so_once(model, tmp_path):
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(model[0] / name, tmp_path / name)
    r = run("chat", tmp_path, "-n", "3", "--temperature", "0", input="hi\nagain\n/quit\n")
    assert r.stderr.count("no chat template") == 1
    assert sum(line.startswith("prompt ") for line in r.stderr.splitlines()) == 2


def test_inspect_table_and_json(model):
    r = run("inspect", model[0])
    for label in ("mixtral", "experts per layer", "top-k", "total params", "active params", "bytes per expert",
                  "memory, all resident"):
        assert label in r.stdout
    s = json.loads(run("inspect", model[0], "--json", "--dtype", "bfloat16").stdout)
    ref = model[1]
    assert s["total_params"] == sum(p.numel() for p in ref.parameters())
    assert (s["family"], s["layers"], s["experts_per_layer"], s["top_k"], s["shared_experts"]) == ("mixtral", 2, 4, 2, 0)
    assert s["bytes_per_expert"] == 3 * 32 * 48 * 4  # fp32 checkpoint
    per_expert = 3 * 32 * 48
    assert s["active_params"] == s["total_params"] - 2 * (4 - 2) * per_expert
    assert s["kv_bytes_per_token"] == 2 * 2 * 2 * 8 * 2  # layers x (k, v) x kv_heads x head_dim x bf16
    # without --dtype, the figures are for the dtype a run here uses (float32 on a CPU)
    default = "bfloat16" if torch.cuda.is_available() else "float32"
    assert json.loads(run("inspect", model[0], "--json").stdout)["run_dtype"] == default


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_inspect_min_offload_is_the_minimum_the_budget_check_accepts(model, tmp_path, dtype):
    """inspect's minimum is plan_budget's: --ram of exactly that loads on a CPU, one byte less is refused."""
    from moe_local.cache.options import CacheOptions, provider_factory
    from moe_local.errors import MoeLocalError
    from moe_local.runtime.inspect import summarize
    from moe_local.runtime.loader import load_model

    pack = tmp_path / "pack"
    r = runner.invoke(app, ["quantize", str(model[0]), str(pack), "--scheme", "int4"])
    assert r.exit_code == 0, r.output
    for path in (model[0], pack):
        need = summarize(path, dtype).memory_min_offload
        lm = load_model(path, device="cpu", dtype=dtype,
                        provider=provider_factory(CacheOptions(ram=need, prefetch_depth=0)))
        assert lm.provider.plan.host_slots == 2  # top-k
        lm.provider.close()
        with pytest.raises(MoeLocalError, match="is too small"):
            load_model(path, device="cpu", dtype=dtype, provider=provider_factory(CacheOptions(ram=need - 1,
                                                                                              prefetch_depth=0)))
    table = " ".join(run("inspect", pack, "--dtype", dtype).stdout.replace("│", " ").split())
    assert f"min --ram, offload ({dtype})" in table
    assert "resident weights + KV cache for 128 tokens + one layer's top-2 experts" in table


def test_inspect_a_pack_shows_schemes_per_group_and_bytes_per_expert(model, tmp_path):
    from moe_local.formats.pack import Pack

    pack = tmp_path / "pack"
    r = runner.invoke(app, ["quantize", str(model[0]), str(pack), "--scheme", "int4", "--keep", "down_proj=int8"])
    assert r.exit_code == 0, r.output
    table = run("inspect", pack).stdout
    for label in ("mixtral", "experts.gate", "experts.down", "int4 g64", "int8", "bytes per expert, layers 0-1",
                  "largest expert", "recipe", "dense weights"):
        assert label in table, label
    s = json.loads(run("inspect", pack, "--json").stdout)
    src = json.loads(run("inspect", model[0], "--json").stdout)
    assert s["total_params"] == src["total_params"] and s["active_params"] == src["active_params"]
    p = Pack(pack)
    desc = p.describe()
    assert s["checkpoint_bytes"] == desc["pack_bytes"]
    assert s["bytes_per_expert"] == p.max_expert_nbytes()
    assert {int(k): v for k, v in s["pack"]["bytes_per_expert"].items()} == {
        layer: p.expert_nbytes(layer, 0) for layer in p.moe_layers
    }
    groups = {g["group"]: g for g in s["pack"]["groups"]}
    assert (groups["experts.gate"]["scheme"], groups["experts.up"]["scheme"], groups["experts.down"]["scheme"]) == (
        "int4", "int4", "int8")
    # the tiny model's rows are 32 wide: int4's group of 64 shrinks to the row (nothing padded)
    assert groups["experts.gate"]["params"]["group_size"] == 64 and groups["experts.gate"]["group_size_used"] == 32
    assert groups["experts.gate"]["bits_per_weight"] == pytest.approx(4 + 24 / 32)
    assert s["pack"]["recipe"]["name"] == "int4" and s["pack"]["source"]["ref"] == str(model[0])


def test_cache_budget_changes_speed_not_tokens_and_reports_it(model, tmp_path):
    """Tiered experts under a budget of a few slots give the tokens of all-resident experts, and the
    run report / routing trace written along the way load in `report` and `simulate`."""
    args = ("--prompt", "hello experts", "-n", "10", "--temperature", "0", "--ignore-eos")
    resident = gen_json(model[0], *args, "--experts", "resident")
    assert "cache" not in resident
    stats, trace = tmp_path / "run.json", tmp_path / "trace.jsonl"
    tight = gen_json(model[0], *args, "--experts", "tiered", "--policy", "lru", "--prefetch-depth", "1",
                     "--ram", "200KiB", "--stats-json", str(stats), "--trace", str(trace), keep_cache=True)
    assert tight["tokens"] == resident["tokens"]
    assert 0.0 <= tight["cache"]["hit_rate"] <= 1.0
    report = json.loads(stats.read_text())
    assert report["cache"]["hit_rate"] == tight["cache"]["hit_rate"]
    assert report["tokens"] == {"prompt": len(tight["prompt_tokens"]), "generated": 10, "cached": 0}
    assert report["cache"]["tiers"]["ram"]["misses"] > 0  # the budget really was tight
    rendered = run("report", str(stats))
    assert rendered.exit_code == 0 and "hit rate" in rendered.stdout
    simulated = run("simulate", str(trace), "--sizes", "4,8", "--json")
    assert simulated.exit_code == 0, simulated.stdout


def _events(*texts: str):
    """A real GenerationStream over fixed text deltas (what the generator yields), to test rendering alone."""
    from moe_local.runtime.generate import GenerationResult, GenerationStream, TokenEvent
    from moe_local.runtime.timing import Timings

    def run_(stream):
        try:
            for i, t in enumerate(texts):
                yield TokenEvent(i, t)
        finally:
            stream._finish(GenerationResult([0], list(range(len(texts))), "".join(texts), "length", Timings()))

    return GenerationStream(run_)


def test_streamed_text_ends_its_line_exactly_once(capsys):
    """The timing line on stderr must start on a fresh line, with no blank line when the text ended one."""
    from moe_local.cli.run_cmds import stream_to_stdout

    stream_to_stdout(_events("def f():", "\n    return 1"), ids_only=False)
    assert capsys.readouterr().out == "def f():\n    return 1\n"
    stream_to_stdout(_events("x = 1", "\n"), ids_only=False)
    assert capsys.readouterr().out == "x = 1\n"
    stream_to_stdout(_events(), ids_only=False)
    assert capsys.readouterr().out == ""


def test_chat_stats_show_the_reused_prefix(model):
    r = run("chat", model[0], "-n", "3", "--temperature", "0", "--ignore-eos", input="hi\nagain\n/stats\n/quit\n")
    timing = [line for line in r.stderr.splitlines() if line.startswith("prompt ")]
    assert "cached" not in timing[0] and " cached, " in timing[1]
    assert "cached)" in r.stdout  # /stats: "prompt tokens  N (M cached)"


def _typed(*keys):
    """`ask` for read_message: returns each line in turn; KeyboardInterrupt / EOFError entries are raised (Ctrl-C / Ctrl-D)."""
    it = iter(keys)

    def ask(prompt: str) -> str:
        k = next(it)
        if isinstance(k, type) and issubclass(k, BaseException):
            raise k
        return k

    return ask


def test_ctrl_c_while_typing_a_multi_line_message_drops_it_but_keeps_the_chat():
    from moe_local.cli.run_cmds import read_message

    assert read_message(_typed('"""', "half a paste", KeyboardInterrupt)) == ""  # dropped, chat goes on
    assert read_message(_typed("first \\", KeyboardInterrupt)) == ""
    assert read_message(_typed('"""', "a", "b", '"""')) == "a\nb"
    assert read_message(_typed("one \\", "two")) == "one \ntwo"
    assert read_message(_typed(EOFError)) is None  # Ctrl-D at the prompt ends the chat
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C at the prompt ends it too (repl turns it into a clean exit)
        read_message(_typed(KeyboardInterrupt))
