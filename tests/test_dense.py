"""Dense (non-expert) weights at the bytes they need, and -t/--threads.

- a bf16 checkpoint run in float32 keeps its matrices in bf16 (half the resident bytes, and inspect
  says so), while its logits and greedy tokens are those of the same weights upcast to float32;
- a pack's `--dense int8|int4` matrices stay packed in memory (embeddings and LM head included) and
  compute within float tolerance of the same model with those weights dequantized;
- `-t N` reaches the run (torch's pool is sized by it) without changing a token; bad values are one
  `error:` line.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from moe_local.cache.budget import module_bytes
from moe_local.cli.app import app
from moe_local.convert.quantize import quantize
from moe_local.convert.recipes import build_recipe
from moe_local.formats import kernels_cpu
from moe_local.formats.pack import Pack
from moe_local.formats.schemes import PackedWeight
from moe_local.loading.checkpoint import Checkpoint
from moe_local.models import build_model, load_weights
from moe_local.models.weights import resident_bytes
from moe_local.runtime.inspect import summarize
from moe_local.runtime.loader import load_model
from moe_local.runtime.session import Session
from tests.tiny import PROMPT_LEN, VOCAB, assert_one_line_error, our_greedy, qwen3_moe_config, save_tiny, v3_config

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


def _matrices(model: torch.nn.Module) -> dict[str, object]:
    """Every 2-D weight the model computes with (parameters and packed weights), by module name."""
    out = {}
    for name, m in model.named_modules():
        w = vars(m).get("weight", m._parameters.get("weight"))
        if isinstance(w, PackedWeight) or (isinstance(w, torch.Tensor) and w.dim() == 2):
            out[name] = w
    return out


@pytest.fixture(scope="module", params=["qwen3_moe", "deepseek_v3"])
def bf16_pair(request, tmp_path_factory):
    """The same random weights saved twice: rounded to bf16, and those bf16 values upcast to float32."""
    config = (qwen3_moe_config if request.param == "qwen3_moe" else v3_config)()
    root = tmp_path_factory.mktemp(f"bf16_{request.param}")
    ref = save_tiny(config, root / "fp32_orig")
    ref.to(torch.bfloat16).save_pretrained(root / "bf16")
    ref.float().save_pretrained(root / "upcast")  # exactly the bf16 values, stored as float32
    return root / "bf16", root / "upcast"


def _prompt(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed))


def test_bf16_checkpoint_keeps_bf16_matrices_and_runs_like_its_upcast_copy(bf16_pair):
    bf16, upcast = bf16_pair
    assert Checkpoint(bf16).dtype("model.layers.0.self_attn.o_proj.weight") == "BF16"
    lm, ref = load_model(bf16, "cpu", "float32"), load_model(upcast, "cpu", "float32")
    mats = _matrices(lm.model)
    assert {"lm_head", "model.embed_tokens", "model.layers.0.self_attn.o_proj"} <= set(mats)
    assert {w.dtype for w in mats.values()} == {torch.bfloat16}  # no float32 copy of any matrix
    assert lm.model.model.norm.weight.dtype == torch.float32  # small vectors take the run dtype
    # resident bytes: what the loaded model holds = what inspect sizes the run by, about half the copy's
    held, copy = module_bytes(lm.model), module_bytes(ref.model)
    assert held == resident_bytes(build_model(lm.config), torch.float32, Checkpoint(bf16))
    assert held < 0.6 * copy
    assert summarize(bf16, "float32").memory_min_offload < summarize(upcast, "float32").memory_min_offload
    ids = _prompt()
    lm.model.setup_cache(PROMPT_LEN)
    ref.model.setup_cache(PROMPT_LEN)
    ours, theirs = lm.model(ids, 0), ref.model(ids, 0)
    assert ours.dtype == torch.float32
    assert (ours - theirs).abs().max().item() <= 1e-3 * max(1.0, theirs.abs().max().item())
    assert our_greedy(lm, ids) == our_greedy(ref, ids)


class _Dequantized:
    """A pack whose quantized dense tensors are only offered dequantized (float32, `Pack.get`): the
    reference the packed run is checked against. Everything else is the pack's."""

    def __init__(self, pack: Pack) -> None:
        self._pack = pack

    def __getattr__(self, name: str):
        if name in ("packed", "packed_nbytes"):
            raise AttributeError(name)
        return getattr(self._pack, name)

    def __contains__(self, name: str) -> bool:
        return name in self._pack


@pytest.fixture(scope="module")
def tiny_v3(tmp_path_factory):
    """A tiny DeepSeek-V3 (MLA, a dense layer, a shared expert, untied embeddings)."""
    path = tmp_path_factory.mktemp("dense_v3") / "ckpt"
    save_tiny(v3_config(), path)
    return path


@pytest.mark.parametrize("dense", ["int8", "int4"])
def test_dense_quantized_pack_stays_packed_and_matches_its_dequantized_weights(tiny_v3, tmp_path, dense):
    out = tmp_path / f"dense_{dense}"
    quantize(tiny_v3, out, build_recipe("int8", dense=dense))
    lm = load_model(out, "cpu", "float32")
    mats = _matrices(lm.model)
    packed = {n for n, w in mats.items() if isinstance(w, PackedWeight)}
    assert {"lm_head", "model.embed_tokens", "model.layers.0.self_attn.q_a_proj", "model.layers.0.mlp.down_proj",
            "model.layers.1.mlp.shared_experts.up_proj"} <= packed
    assert {mats[n].scheme.name for n in packed} == {dense}
    assert not isinstance(mats["model.layers.1.mlp.gate"], PackedWeight)  # routers stay precise
    pack = Pack(out)
    assert module_bytes(lm.model) == resident_bytes(build_model(lm.config), torch.float32, pack)

    ref = build_model(lm.config)
    load_weights(ref, _Dequantized(pack), torch.device("cpu"), torch.float32)
    ref.experts.provider = lm.provider
    assert not any(isinstance(w, PackedWeight) for w in _matrices(ref).values())
    assert module_bytes(lm.model) < 0.75 * module_bytes(ref)
    ids = _prompt()
    lm.model.setup_cache(PROMPT_LEN)
    ref.setup_cache(PROMPT_LEN)
    ours, theirs = lm.model(ids, 0), ref(ids, 0)
    assert (ours - theirs).abs().max().item() <= 1e-3 * max(1.0, theirs.abs().max().item())
    assert our_greedy(lm, ids) == our_greedy(SimpleNamespace(model=ref), ids)


def test_inspect_counts_a_dense_int4_pack_at_its_packed_bytes(tiny_v3, tmp_path):
    int8, int4 = tmp_path / "d8", tmp_path / "d4"
    quantize(tiny_v3, int8, build_recipe("int8", dense="int8"))
    quantize(tiny_v3, int4, build_recipe("int8", dense="int4"))
    assert summarize(int4, "float32").memory_min_offload < summarize(int8, "float32").memory_min_offload


def test_bad_dense_values_are_refused():
    from moe_local.errors import MoeLocalError

    for bad in ("int2", "nf4", "int8:64", "int4:3"):
        with pytest.raises(MoeLocalError):
            build_recipe("int8", dense=bad)


# --------------------------------------------------------------------------- threads
@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_threads_reach_the_run_and_do_not_change_tokens(tiny_v3, restore_threads):
    tokens = {}
    for n in (1, 2):
        r = runner.invoke(app, ["generate", str(tiny_v3), "--prompt-ids", "1,2,3,4,5", "-n", "12", "--temperature",
                                "0", "--json", "-t", str(n)])
        assert r.exit_code == 0, r.output
        assert f"with {n} thread" in r.stderr
        assert kernels_cpu.threads() == n  # the kernel pool computes the matmuls on all n
        assert torch.get_num_threads() == 1  # torch's own ops of the last (decode) step: one thread
        tokens[n] = json.loads(r.stdout)["tokens"]
    assert tokens[1] == tokens[2] and len(tokens[1]) == 12
    session = Session.open(tiny_v3, "cpu", threads=2)
    assert session.lm.threads == 2 and torch.get_num_threads() == 2


def test_a_prompt_gets_torch_threads_a_decode_step_does_not(restore_threads):
    from moe_local.runtime.threads import SMALL_BATCH, threads_for_batch

    threads_for_batch(SMALL_BATCH, 2, torch.device("cpu"))
    assert torch.get_num_threads() == 2
    threads_for_batch(1, 2, torch.device("cpu"))
    assert torch.get_num_threads() == 1
    threads_for_batch(512, 2, torch.device("cpu"))
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("command", ["generate", "chat", "eval", "serve"])
@pytest.mark.parametrize("bad", ["0", "-1", "abc"])
def test_bad_threads_are_one_error_line(tiny_v3, tmp_path, command, bad):
    extra = {"generate": ["--prompt-ids", "1,2"], "eval": ["--tokens", str(tmp_path / "none.npy")]}.get(command, [])
    r = runner.invoke(app, [command, str(tiny_v3), *extra, "--threads", bad])
    assert_one_line_error(r.output, r.exit_code, "--threads", bad)


@pytest.mark.parametrize("given, expect", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_cli_makes_openmp_wait_passively_unless_told_otherwise(given, expect):
    """Set before torch loads (libgomp reads it once): spinning OpenMP threads made 2 threads 15x slower."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    code = "import moe_local.cli.app, os, sys; assert 'torch' in sys.modules; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expect
