"""Bad input: one line naming the file and the problem, a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moe_local.cli.app import app
from tests.tiny import assert_one_line_error
from tests.tiny_tokenizer import save_chat_model

runner = CliRunner()


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good_model")
    save_chat_model(path)
    return path


@pytest.fixture
def model(good, tmp_path) -> Path:
    """A fresh copy of the good checkpoint to break."""
    dst = tmp_path / "model"
    shutil.copytree(good, dst)
    return dst


def cli_error(*args, **kw) -> str:
    r = runner.invoke(app, [str(a) for a in args], **kw)
    return assert_one_line_error(r.output, r.exit_code)


def test_missing_config(model):
    (model / "config.json").unlink()
    line = cli_error("generate", model, "--prompt", "hi")
    assert str(model / "config.json") in line and "missing config.json" in line


def test_unsupported_model_type_lists_supported(model):
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = "llama"
    (model / "config.json").write_text(json.dumps(cfg))
    for cmd in (["generate", model, "--prompt", "hi"], ["inspect", model]):
        line = cli_error(*cmd)
        assert str(model / "config.json") in line and "'llama'" in line
        assert "supported:" in line and "mixtral" in line and "deepseek_v3" in line


def test_shard_named_in_index_but_missing(model):
    index = {"metadata": {}, "weight_map": {n: "model-00001-of-00002.safetensors"
                                            for n in load_file(model / "model.safetensors")}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    line = cli_error("generate", model, "--prompt", "hi")
    assert "model-00001-of-00002.safetensors" in line and "missing" in line


@pytest.mark.parametrize("keep", [0.5, 0.999])  # cut inside the data; and just short of the end
def test_truncated_safetensors(model, keep):
    path = model / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    line = cli_error("generate", model, "--prompt", "hi")
    assert str(path) in line and "truncated" in line
    line = cli_error("inspect", model)
    assert str(path) in line and "truncated" in line


def test_truncated_header(model):
    path = model / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    line = cli_error("generate", model, "--prompt", "hi")
    assert str(path) in line


@pytest.mark.parametrize("name, shape, expected, prompt", [
    ("model.layers.1.self_attn.q_proj.weight", (16, 32), "[32, 32]", ("--prompt", "hi")),  # dense, at load
    ("model.layers.0.block_sparse_moe.experts.3.w2.weight", (32, 40), "[32, 48]", ("--prompt-ids", "1,2")),  # an expert
])
def test_tensor_with_wrong_shape(model, name, shape, expected, prompt):
    path = model / "model.safetensors"
    tensors = load_file(path)
    tensors[name] = torch.zeros(*shape)
    save_file(tensors, path, metadata={"format": "pt"})
    line = cli_error("generate", model, *prompt)
    assert str(path) in line and name in line and str(list(shape)) in line and expected in line


def test_no_tokenizer_with_text_prompt(model):
    (model / "tokenizer.json").unlink()
    for cmd in (["generate", model, "--prompt", "hi"], ["chat", model]):
        line = cli_error(*cmd, input="hi\n")
        assert str(model) in line and "tokenizer.json" in line and "--prompt-ids" in line


def test_prompt_longer_than_context(good):
    ids = ",".join(["5"] * 200)
    line = cli_error("generate", good, "--prompt-ids", ids)
    assert "prompt has 200 tokens" in line and "context is 128" in line and str(good / "config.json") in line


def test_bad_options(good):
    assert "--prompt-ids" in cli_error("generate", good, "--prompt-ids", "1,x")
    assert "--dtype" in cli_error("generate", good, "--prompt", "hi", "--dtype", "int3")
    assert "--top-p" in cli_error("generate", good, "--prompt", "hi", "--top-p", "0")
    assert "--prompt" in cli_error("generate", good)
    assert "--prompt-ids" in cli_error("generate", good, "--prompt-ids", "1,2", "--chat")


def test_nonexistent_path(tmp_path):
    line = cli_error("generate", tmp_path / "nope", "--prompt", "hi")
    assert str(tmp_path / "nope") in line and "no such folder" in line


def test_hub_id_offline_with_empty_cache(tmp_path):
    """A real subprocess: huggingface_hub reads HF_HUB_OFFLINE / HF_HOME when it is first imported."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "-m", "moe_local.cli.app", "generate", "some-org/some-model", "--prompt", "hi"],
                       capture_output=True, text=True, env=env, timeout=120)
    line = assert_one_line_error(r.stdout + r.stderr, r.returncode)
    assert "some-org/some-model" in line and "offline" in line


def test_malformed_device_is_one_line_not_a_torch_traceback(good, tmp_path):
    """torch.device("cuda:x") raises RuntimeError; every command that takes --device must turn it into one line."""
    assert "--device" in cli_error("generate", good, "--prompt", "hi", "--device", "cuda:x")
    assert "--device" in cli_error("chat", good, "--device", "cuda:x", input="hi\n")
    np = pytest.importorskip("numpy")
    tokens = tmp_path / "ids.npy"
    np.save(tokens, np.arange(20, dtype=np.int32))
    assert "--device" in cli_error("eval", good, "--tokens", tokens, "--device", "cuda:x")


def test_stats_json_into_a_missing_directory_fails_before_loading(good, tmp_path):
    r = runner.invoke(app, ["generate", str(good), "--prompt", "hi", "-n", "2",
                            "--stats-json", str(tmp_path / "nope" / "run.json")])
    line = assert_one_line_error(r.output, r.exit_code)
    assert str(tmp_path / "nope") in line and "does not exist" in line
    assert "loaded" not in r.output and "prompt " not in r.output  # refused before any work
