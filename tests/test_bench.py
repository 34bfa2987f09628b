"""`moe-local bench` through the real CLI: the JSON's fields and figures, the table, one-line errors.

The bytes read per decode token are checked against a figure computed here from the safetensors
headers alone (no moe-local code): every non-expert tensor, of the embedding table one row, plus
top-k routed experts per MoE layer at their stored size. No timing is asserted beyond "> 0".
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moe_local.cli.app import app
from moe_local.runtime.bench import measure_read_bandwidth
from tests.tiny import assert_one_line_error
from tests.tiny_tokenizer import save_chat_model

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
WIDTH = {"F32": 4, "BF16": 2, "F16": 2}
FAST = ("-p", "12", "-n", "4", "-r", "2", "-t", "1", "--bandwidth", "10")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A float32 Mixtral checkpoint (2 MoE layers x 4 experts, top-2): stored and run at 4 bytes a weight."""
    path = tmp_path_factory.mktemp("bench_tiny")
    save_chat_model(path, tokenizer=False)
    return path


def headers(root: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for shard in sorted(root.glob("*.safetensors")):
        with open(shard, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            out.update({k: v for k, v in json.loads(f.read(n)).items() if k != "__metadata__"})
    return out


def expected_bytes_per_token(root: Path, held_fp32: tuple[str, ...] = ()) -> tuple[int, int]:
    """(dense, routed experts) bytes one decode token reads, from the checkpoint's headers and config.

    `held_fp32`: name suffixes the runtime documents as kept in float32 whatever they are stored in."""
    config = json.loads((root / "config.json").read_text())
    top_k = config["num_experts_per_tok"]
    experts = config.get("num_local_experts") or config.get("n_routed_experts") or config["num_experts"]
    dense, per_layer = 0, {}
    for name, h in headers(root).items():
        numel = 1
        for d in h["shape"]:
            numel *= d
        width = 4 if name.endswith(held_fp32) else WIDTH[h["dtype"]]
        if ".experts." in name and ".shared_experts." not in name:
            layer = int(name.split(".layers.")[1].split(".")[0])
            per_layer[layer] = per_layer.get(layer, 0) + numel * width
        elif name == "model.embed_tokens.weight":
            dense += h["shape"][1] * width  # one row is looked up
        else:
            dense += numel * width
    return dense, sum(top_k * total // experts for total in per_layer.values())


def bench_json(model: Path, *args: str) -> dict:
    result = runner.invoke(app, ["bench", str(model), "--json", *FAST, *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def check_figures(out: dict, reps: int = 2) -> None:
    assert out["format"] == "moe-local-bench" and out["prompt_tokens"] == 12 and out["gen_tokens"] == 4
    assert out["threads"] == 1 and out["backend"] == "CPU"
    assert out["pp"]["mean"] > 0 and out["tg"]["mean"] > 0
    assert out["pp"]["min"] <= out["pp"]["mean"] <= out["pp"]["max"]
    assert len(out["repetitions"]) == reps and out["warmup"] is not None
    assert all(r["pp_tps"] > 0 and r["tg_tps"] > 0 for r in out["repetitions"])
    assert out["bandwidth_gbps"] == 10 and out["bandwidth_measured"] is False
    assert out["roofline_tps"] == pytest.approx(10e9 / out["bytes_per_token"])
    assert out["roofline_pct"] == pytest.approx(100 * out["tg"]["mean"] / out["roofline_tps"])


@pytest.mark.parametrize("experts", ["tiered", "resident"])
def test_tiny_checkpoint_json_and_bytes_per_token(tiny, experts):
    out = bench_json(tiny, "--experts", experts)
    check_figures(out)
    dense, routed = expected_bytes_per_token(tiny)
    assert out["dense_bytes_per_token"] == dense
    assert out["expert_bytes_per_token"] == routed
    assert out["bytes_per_token"] == dense + routed
    assert out["weights"] == "F32" and out["experts"] == experts
    assert ("cache" in out) == (experts == "tiered")


def test_shared_model_bf16_bytes_per_token(shared_model):
    out = bench_json(shared_model, "--dtype", "bfloat16")
    check_figures(out)
    # DeepSeek-V3's e_score_correction_bias is stored in bf16 and kept in float32 (selection precision)
    dense, routed = expected_bytes_per_token(shared_model, held_fp32=("e_score_correction_bias",))
    assert (out["dense_bytes_per_token"], out["expert_bytes_per_token"]) == (dense, routed)


def test_table_renders_and_output_file_is_written(tiny, tmp_path):
    target = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", str(tiny), *FAST, "-o", str(target)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = next(line for line in lines if "model" in line)
    for column in ("size", "params", "backend", "threads", "test", "t/s", "bytes/token", "% of bw"):
        assert column in header
    pp = next(line for line in lines if " pp12 " in line)
    tg = next(line for line in lines if " tg4 " in line)
    assert "±" in pp and "±" in tg and "CPU" in tg and "%" in tg
    saved = json.loads(target.read_text())
    assert saved["tg"]["mean"] > 0 and len(saved["repetitions"]) == 2
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("args, needle", [
    (("-p", "0"), "-p/--n-prompt"), (("-n", "0"), "-n/--n-gen"), (("-r", "0"), "-r/--repetitions"),
    (("-t", "0"), "-t/--threads"), (("--bandwidth", "0"), "--bandwidth"), (("-p", "100", "-n", "100"), "context"),
    (("--experts", "some"), "--experts"),
])
def test_bad_values_are_one_line_errors(tiny, args, needle):
    result = runner.invoke(app, ["bench", str(tiny), *args])
    assert_one_line_error(result.output, result.exit_code, needle)
    assert result.exit_code == 1


def test_missing_model_and_bad_output_dir(tiny, tmp_path):
    result = runner.invoke(app, ["bench", str(tmp_path / "nothing-here"), *FAST])
    assert_one_line_error(result.output, result.exit_code, "nothing-here")
    assert result.exit_code == 1
    result = runner.invoke(app, ["bench", str(tiny), *FAST, "-o", str(tmp_path / "no" / "such.json")])
    assert_one_line_error(result.output, result.exit_code, "directory does not exist")
    assert result.exit_code == 1


def test_bandwidth_measurement_is_positive():
    assert measure_read_bandwidth(1, nbytes=64 << 20, passes=2) > 0.1


def test_dense_int4_pack_counts_packed_dense_bytes(tiny, tmp_path):
    """A `--dense int4` pack holds its matrices (embedding and LM head included) packed: bench counts
    them at their packed bytes (one row of the embedding table), about an eighth of float32's."""
    pack = tmp_path / "dense-int4"
    result = runner.invoke(app, ["quantize", str(tiny), str(pack), "--scheme", "int4", "--dense", "int4"])
    assert result.exit_code == 0, result.output
    out = bench_json(pack, "--experts", "resident")
    check_figures(out)
    float_dense, _ = expected_bytes_per_token(tiny)
    assert 0 < out["dense_bytes_per_token"] < float_dense / 4
    assert out["bytes_per_token"] == out["dense_bytes_per_token"] + out["expert_bytes_per_token"]
