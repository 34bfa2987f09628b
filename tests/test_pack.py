"""The pack: layout (aligned, contiguous, valid safetensors), round trips, checksums, clear errors, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moe_local.errors import CheckpointError, MoeLocalError
from moe_local.formats.pack import ALIGN, MANIFEST, Pack, read_st_header
from moe_local.formats.schemes import PackedWeight
from moe_local.convert.quantize import quantize
from moe_local.convert.recipes import build_recipe
from moe_local.runtime.loader import load_model
from tests.tiny import fuse_experts, mixtral_config, our_greedy, reference_logits, save_tiny

LAYERS, EXPERTS = 3, 8
EXPERT_NAMES = {"gate": "w1", "up": "w3", "down": "w2"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, object]:
    path = tmp_path_factory.mktemp("tiny")
    ref = save_tiny(mixtral_config(num_hidden_layers=LAYERS, num_local_experts=EXPERTS), path)
    return path, ref


@pytest.fixture(scope="module")
def int8_pack(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packs") / "int8"
    quantize(tiny[0], out, build_recipe("int8"), shard_bytes=64 << 10)  # small shards: several files
    return out


def copy_pack(pack: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(pack, dst)
    return dst


# ----------------------------------------------------------------------------------- layout
def test_every_expert_is_one_aligned_contiguous_range_of_a_valid_safetensors_file(int8_pack):
    manifest = json.loads((int8_pack / MANIFEST).read_text())
    ex = manifest["experts"]
    assert len(ex["files"]) > 1, "the small shard size should spread experts over several files"
    assert len(ex["ranges"]) == LAYERS * EXPERTS
    for fname in ex["files"] + ["model.safetensors"]:
        with safe_open(str(int8_pack / fname), framework="pt") as f:  # every file opens
            assert len(list(f.keys())) > 0
    headers = {f: read_st_header(int8_pack / f) for f in ex["files"]}
    by_file: dict[str, list[tuple[int, int]]] = {}
    for r in ex["ranges"]:
        assert r["offset"] % ALIGN == 0
        start, end = r["offset"], r["offset"] + r["length"]
        data_start, header = headers[r["file"]]
        prefix = f"model.layers.{r['layer']}.experts.{r['expert']}."
        spans = sorted((data_start + v["data_offsets"][0], data_start + v["data_offsets"][1])
                       for k, v in header.items() if k.startswith(prefix))
        assert len(spans) == 6  # gate/up/down x codes/scales
        assert spans[0][0] == start and spans[-1][1] == end  # the expert's tensors fill its range
        covered = sum(b - a for a, b in spans)
        assert end - start - covered < 16 * len(spans)  # only alignment padding inside
        by_file.setdefault(r["file"], []).append((start, end))
    for spans in by_file.values():
        spans.sort()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "expert ranges overlap"


def test_decoded_experts_view_the_mmap_and_match_safe_open(int8_pack):
    pack = Pack(int8_pack)
    for layer, e in [(0, 0), (1, 5), (2, 7)]:
        w = pack.load(layer, e)
        view = pack.view(layer, e)
        assert w.gate.packed["codes"].data_ptr() == view.data_ptr()  # zero copy: tensors view the map
        r = pack.expert_range(layer, e)
        with safe_open(str(pack.files[r.file]), framework="pt") as f:
            for proj in ("gate", "up", "down"):
                for part, t in getattr(w, proj).packed.items():
                    torch.testing.assert_close(t, f.get_tensor(f"model.layers.{layer}.experts.{e}.{proj}.{part}"),
                                               rtol=0, atol=0)
        buf = torch.zeros(pack.max_expert_nbytes() + 100, dtype=torch.uint8)
        pack.read_into(layer, e, buf)
        assert torch.equal(buf[: r.length], view)
        y = torch.randn(3, 64)
        torch.testing.assert_close(pack.decode(buf, layer, e)(y, torch.nn.functional.silu), w(y, torch.nn.functional.silu))


def test_int8_pack_gives_the_greedy_tokens_of_its_dequantized_weights(tiny, int8_pack, tmp_path):
    """Build an ordinary checkpoint holding exactly what the pack encodes; both must generate alike."""
    src, _ = tiny
    pack = Pack(int8_pack)
    tensors = {name: pack.get(name).float().contiguous() for name in pack.names()}
    for layer in range(LAYERS):
        w = pack.load(layer, 0)
        assert w.gate.scheme.name == "int8"
        for e in range(EXPERTS):
            w = pack.load(layer, e)
            for proj, hf in EXPERT_NAMES.items():
                tensors[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{hf}.weight"] = getattr(w, proj).dequantize()
    deq = tmp_path / "dequantized"
    deq.mkdir()
    shutil.copy(src / "config.json", deq / "config.json")
    save_file(tensors, deq / "model.safetensors", metadata={"format": "pt"})

    ids = torch.randint(0, 256, (16,), generator=torch.Generator().manual_seed(3))
    lm_pack = load_model(int8_pack, device="cpu", dtype="float32")
    lm_deq = load_model(deq, device="cpu", dtype="float32")
    lm_pack.model.setup_cache(16)
    lm_deq.model.setup_cache(16)
    torch.testing.assert_close(lm_pack.model(ids, 0), lm_deq.model(ids, 0), rtol=1e-4, atol=1e-4)
    assert our_greedy(lm_pack, ids) == our_greedy(lm_deq, ids)


def test_pack_of_fused_layout_equals_pack_of_per_expert_layout(tiny, int8_pack, tmp_path):
    fused = tmp_path / "fused"
    shutil.copytree(tiny[0], fused)
    fuse_experts(fused, "model.layers.{}.block_sparse_moe.experts", ("w1", "w3", "w2"), LAYERS, EXPERTS)
    out = tmp_path / "pack"
    quantize(fused, out, build_recipe("int8"), shard_bytes=64 << 10)
    a, b = Pack(int8_pack), Pack(out)
    for layer in range(LAYERS):
        for e in range(EXPERTS):
            assert torch.equal(a.view(layer, e), b.view(layer, e))
            assert a.expert_range(layer, e).crc32 == b.expert_range(layer, e).crc32


# ----------------------------------------------------------------------------------- corruption
def test_flipped_byte_is_caught_by_the_checksum_naming_layer_and_expert(int8_pack, tmp_path):
    pack_dir = copy_pack(int8_pack, tmp_path)
    r = Pack(pack_dir).expert_range(1, 5)
    path = pack_dir / Pack(pack_dir).files[r.file].name
    data = bytearray(path.read_bytes())
    data[r.offset + r.length // 2] ^= 0x40
    path.write_bytes(bytes(data))
    pack = Pack(pack_dir)  # opening reads no expert data, so it succeeds
    buf = torch.empty(pack.max_expert_nbytes(), dtype=torch.uint8)
    pack.read_into(1, 4, buf)  # neighbours are intact
    with pytest.raises(CheckpointError, match=r"layer 1 expert 5: checksum mismatch"):
        pack.read_into(1, 5, buf)
    with pytest.raises(CheckpointError, match=r"layer 1 expert 5"):
        pack.verify_expert(1, 5)


def test_truncated_expert_file_is_a_clear_error_at_open(int8_pack, tmp_path):
    pack_dir = copy_pack(int8_pack, tmp_path)
    last = sorted(pack_dir.glob("experts-*.safetensors"))[-1]
    with open(last, "r+b") as f:
        f.truncate(last.stat().st_size - 5000)
    with pytest.raises(CheckpointError, match=rf"{last.name}.*truncated"):
        Pack(pack_dir)
    with pytest.raises(MoeLocalError, match="truncated"):
        load_model(pack_dir, device="cpu", dtype="float32")


def test_missing_expert_file_is_a_clear_error(int8_pack, tmp_path):
    pack_dir = copy_pack(int8_pack, tmp_path)
    (pack_dir / "experts-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"experts-00002.safetensors: missing"):
        Pack(pack_dir)


def test_manifest_pointing_past_the_end_of_a_file_is_a_clear_error(int8_pack, tmp_path):
    pack_dir = copy_pack(int8_pack, tmp_path)
    manifest = json.loads((pack_dir / MANIFEST).read_text())
    entry = manifest["experts"]["ranges"][-1]
    entry["offset"] += 64 * ALIGN
    (pack_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=rf"layer {entry['layer']} expert {entry['expert']}.*past the end"):
        Pack(pack_dir)


def test_manifest_of_another_version_is_refused(int8_pack, tmp_path):
    pack_dir = copy_pack(int8_pack, tmp_path)
    manifest = json.loads((pack_dir / MANIFEST).read_text())
    manifest["version"] = 99
    (pack_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="version 99"):
        Pack(pack_dir)


# ----------------------------------------------------------------------------------- quantize errors
def test_quantizing_a_pack_again_is_a_clear_error(int8_pack, tmp_path):
    with pytest.raises(MoeLocalError, match="already a moe-local pack"):
        quantize(int8_pack, tmp_path / "again", build_recipe("int4"))
    assert not (tmp_path / "again").exists()


def test_existing_out_needs_force_and_force_replaces_only_packs(tiny, int8_pack, tmp_path):
    out = copy_pack(int8_pack, tmp_path)
    with pytest.raises(MoeLocalError, match="already exists; pass --force"):
        quantize(tiny[0], out, build_recipe("int4"))
    quantize(tiny[0], out, build_recipe("int4"), force=True)
    assert Pack(out).load(0, 0).gate.scheme.name == "int4"
    other = tmp_path / "not-a-pack"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(MoeLocalError, match="not a moe-local pack"):
        quantize(tiny[0], other, build_recipe("int4"), force=True)
    assert (other / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "not-a-pack"]  # no temp folders left


def test_failed_quantize_leaves_no_out_and_names_the_tensor(tiny, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny[0], src)
    tensors = load_file(src / "model.safetensors")
    bad = "model.layers.2.block_sparse_moe.experts.3.w2.weight"
    tensors[bad][1, 2] = float("nan")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(MoeLocalError, match=bad.replace(".", r"\.")):
        quantize(src, out, build_recipe("int8"))
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # the temporary folder is gone too


# ----------------------------------------------------------------------------------- recipes
def test_mixed_recipe_overrides_per_projection_and_layer(tiny, tmp_path):
    recipe = build_recipe("int4", group_size=32, keep=["down_proj=int8"], layers=["0=bf16", "2-2=ternary:64"])
    out = tmp_path / "mixed"
    quantize(tiny[0], out, recipe)
    pack = Pack(out)
    schemes = {(l, p): getattr(pack.load(l, 0), p).scheme for l in range(LAYERS) for p in ("gate", "up", "down")}
    assert schemes[(0, "gate")].name == schemes[(0, "down")].name == "bf16"
    assert schemes[(1, "gate")].name == "int4" and schemes[(1, "gate")].params["group_size"] == 32
    assert schemes[(1, "down")].name == "int8"
    assert schemes[(2, "up")].name == "ternary" and schemes[(2, "up")].params["group_size"] == 64
    groups = {(g["scheme"], tuple(g["layers"]), g["group"]) for g in pack.describe()["groups"]}
    assert ("int8", (1,), "experts.down") in groups
    sizes = pack.describe()["bytes_per_expert"]
    assert sizes[0] > sizes[1] > sizes[2]


def test_builtin_low_bit_recipe_keeps_first_and_last_moe_layers_higher(tiny, tmp_path):
    out = tmp_path / "ds"
    quantize(tiny[0], out, build_recipe("ds-dynamic-1.58"))
    pack = Pack(out)
    assert [pack.load(l, 0).down.scheme.name for l in range(LAYERS)] == ["int4", "ternary", "int4"]
    assert pack.describe()["dense"]["scheme"] == "bf16"
    lm = load_model(out, device="cpu", dtype="float32")
    lm.model.setup_cache(8)
    assert torch.isfinite(lm.model(torch.arange(8), 0)).all()


def test_layers_override_that_matches_no_moe_layer_is_an_error(tiny, tmp_path):
    with pytest.raises(MoeLocalError, match=r"--layers 5-9=int8 matches no MoE layer \(MoE layers: 0-2\)"):
        quantize(tiny[0], tmp_path / "x", build_recipe("int4", layers=["5-9=int8"]))


def test_partial_folder_of_a_killed_run_is_removed_by_the_next_run(tiny, tmp_path):
    stale = tmp_path / ".out.partial-999999999"  # no such process
    stale.mkdir()
    (stale / "experts-00001.safetensors").write_bytes(b"half")
    quantize(tiny[0], tmp_path / "out", build_recipe("int8"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bad_recipe_options_are_clear_errors():
    with pytest.raises(MoeLocalError, match="unknown quantization scheme 'int3'"):
        build_recipe("int3")
    with pytest.raises(MoeLocalError, match="bad --keep"):
        build_recipe("int4", keep=["mlp=int8"])
    with pytest.raises(MoeLocalError, match="bad --layers"):
        build_recipe("int4", layers=["x-2=int8"])
    with pytest.raises(MoeLocalError, match="takes no group size"):
        build_recipe("bf16:64")


def test_int8_dense_weights_read_dequantized_and_load_packed(tiny, tmp_path):
    out = tmp_path / "dense8"
    quantize(tiny[0], out, build_recipe("int8", dense="int8"))
    pack = Pack(out)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert f"{name}:codes" not in pack and name in pack
    orig = load_file(tiny[0] / "model.safetensors")[name]
    assert (pack.get(name) - orig).abs().max() <= orig.abs().amax(1, keepdim=True).max() / 127
    router = "model.layers.0.block_sparse_moe.gate.weight"
    assert router not in pack.manifest["dense"]["quantized"]  # routers stay precise
    lm = load_model(out, device="cpu", dtype="float32")
    w = lm.model.model.layers[0].self_attn.q_proj.weight  # kept packed, computed from its codes
    assert isinstance(w, PackedWeight) and w.scheme.name == "int8"
    assert torch.equal(w.dequantize(), pack.get(name))


def test_calibration_records_importance_and_changes_ternary(tiny, tmp_path):
    tokens = tmp_path / "calib.npy"
    np.save(tokens, np.random.default_rng(0).integers(0, 256, 300).astype(np.uint16))
    plain, calib = tmp_path / "plain", tmp_path / "calib"
    quantize(tiny[0], plain, build_recipe("ternary"))
    quantize(tiny[0], calib, build_recipe("ternary"), calibration_path=tokens, calibration_tokens=200)
    manifest = json.loads((calib / MANIFEST).read_text())
    assert manifest["recipe"]["calibration"]["tokens"] == 200
    a, b = Pack(plain), Pack(calib)
    differ = sum(not torch.equal(a.view(l, e), b.view(l, e)) for l in range(LAYERS) for e in range(EXPERTS))
    assert differ > 0


# ----------------------------------------------------------------------------------- CLI
def test_cli_quantize_dry_run_quantize_and_eval(tiny, tmp_path):
    from moe_local.cli.app import app

    runner = CliRunner()
    src, ref = tiny
    out = tmp_path / "cli-pack"
    res = runner.invoke(app, ["quantize", str(src), str(out), "--scheme", "int4", "--keep", "down_proj=int8", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "bits/weight" in res.output and "pack total" in res.output and not out.exists()
    res = runner.invoke(app, ["quantize", str(src), str(out), "--scheme", "int4", "--keep", "down_proj=int8"])
    assert res.exit_code == 0, res.output
    assert (out / MANIFEST).is_file()
    res = runner.invoke(app, ["quantize", str(out), str(tmp_path / "x"), "--scheme", "int8"])
    assert res.exit_code == 1 and "already a moe-local pack" in res.output

    ids = np.random.default_rng(1).integers(0, 256, 70).astype(np.int32)
    np.save(tmp_path / "ids.npy", ids)
    res = runner.invoke(app, ["eval", str(out), "--tokens", str(tmp_path / "ids.npy"), "--window", "32",
                              "--reference", str(src), "--device", "cpu", "--dtype", "float32", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(got) == {"ppl", "nll", "tokens", "kl", "top1"}
    assert got["tokens"] == 31 + 31 + 5  # windows of 32, 32, 6 tokens
    assert 0 < got["kl"] < 1 and 0.5 < got["top1"] <= 1

    # perplexity against transformers on the same windows
    t = torch.from_numpy(ids.astype(np.int64))
    nll, n = 0.0, 0
    for s in range(0, 70, 32):
        chunk = t[s : s + 32]
        logp = torch.log_softmax(reference_logits(ref, chunk)[:-1], -1)
        nll -= float(logp.gather(1, chunk[1:, None]).sum())
        n += chunk.numel() - 1
    res = runner.invoke(app, ["eval", str(src), "--tokens", str(tmp_path / "ids.npy"), "--window", "32",
                              "--reference", str(src), "--device", "cpu", "--dtype", "float32", "--json"])
    base = json.loads(res.stdout.strip().splitlines()[-1])
    assert base["nll"] == pytest.approx(nll / n, rel=1e-5)
    assert base["kl"] == pytest.approx(0, abs=1e-6) and base["top1"] == 1.0


def test_cli_eval_bad_token_file_is_one_line(tiny, tmp_path):
    from moe_local.cli.app import app

    np.save(tmp_path / "bad.npy", np.array([1, 2, 999], dtype=np.int32))
    res = CliRunner().invoke(app, ["eval", str(tiny[0]), "--tokens", str(tmp_path / "bad.npy"), "--device", "cpu"])
    assert res.exit_code == 1 and "outside the vocabulary of 256" in res.output


def test_dry_run_quantize_summary_and_inspect_agree_on_the_pack_size(tiny, tmp_path):
    """The dry run predicts the weight files to the byte (headers, alignment padding included) and the
    copied files + manifest from above by a few bytes; the quantize summary and inspect print the
    same measured total, in the same words."""
    from moe_local.cli.app import app
    from moe_local.runtime.inspect import pack_size_text, summarize
    from moe_local.formats.pack import pack_size
    from moe_local.convert.quantize import make_plan, plan_summary

    src, _ = tiny
    out = tmp_path / "sized"
    runner = CliRunner()
    dry = runner.invoke(app, ["quantize", str(src), str(out), "--scheme", "int4", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    planned = plan_summary(make_plan(src, build_recipe("int4")), str(src))
    res = runner.invoke(app, ["quantize", str(src), str(out), "--scheme", "int4"])
    assert res.exit_code == 0, res.output

    size = pack_size(out)
    on_disk = {f.name: f.stat().st_size for f in out.iterdir()}
    assert size.total == sum(on_disk.values())
    assert size.weight_bytes == sum(n for name, n in on_disk.items() if name.endswith(".safetensors"))
    assert planned["weight_bytes"] == size.weight_bytes
    assert 0 <= planned["other_bytes"] - size.other_bytes <= 10 * planned["experts"]  # crc32s at their widest
    assert planned["pack_bytes"] == planned["weight_bytes"] + planned["other_bytes"]

    text = pack_size_text(size.weight_bytes, size.other_bytes)
    assert f"wrote {out}: {text};" in " ".join(res.stderr.split())
    assert "pack total: ~" + pack_size_text(planned["weight_bytes"], planned["other_bytes"]) in " ".join(dry.stdout.split())
    s = summarize(out)
    assert s.checkpoint_bytes == size.total == s.pack["pack_bytes"]
    assert (s.pack["weight_bytes"], s.pack["other_bytes"]) == (size.weight_bytes, size.other_bytes)
    table = runner.invoke(app, ["inspect", str(out)])
    assert text in " ".join(table.stdout.replace("│", " ").split())


def _bad_token_files(tmp_path):
    (tmp_path / "ids.json").write_text("[1, 2, 3]")
    np.save(tmp_path / "objects.npy", np.array([1, "a", None], dtype=object), allow_pickle=True)
    np.save(tmp_path / "floats.npy", np.array([1.0, 2.0]))
    np.save(tmp_path / "grid.npy", np.zeros((2, 3), dtype=np.int32))
    return {
        "ids.json": "found no .npy header",
        "objects.npy": "found an array of Python objects",
        "floats.npy": "found a 1-D float64 array",
        "grid.npy": "found a 2-D int32 array",
    }


def test_cli_eval_refuses_a_non_npy_or_pickled_token_file_in_one_line(tiny, tmp_path):
    """No numpy "allow_pickle / load unsafely" advice reaches the user: one line naming the file."""
    from moe_local.cli.app import app

    for name, found in _bad_token_files(tmp_path).items():
        path = tmp_path / name
        res = CliRunner().invoke(app, ["eval", str(tiny[0]), "--tokens", str(path), "--device", "cpu"])
        assert res.exit_code == 1, name
        line = res.output.strip()
        assert line.count("\n") == 0, line
        assert str(path) in line and "expected a .npy of integer token ids (uint16/int32/int64)" in line and found in line
        assert "pickle=" not in line and "unsafely" not in line


def test_calibration_tokens_go_through_the_same_loader(tiny, tmp_path):
    from moe_local.convert.calibration import calibrate

    for name, found in _bad_token_files(tmp_path).items():
        with pytest.raises(MoeLocalError, match=found) as exc:
            calibrate(tiny[0], tmp_path / name, max_tokens=16)
        assert str(tmp_path / name) in str(exc.value) and "allow_pickle" not in str(exc.value)


def test_deepseek_style_fp8_source_is_dequantized_while_streaming(tiny, tmp_path):
    """Expert weights stored as float8_e4m3fn + 128x128 `weight_scale_inv` blocks (the DeepSeek-V3 release)."""
    src = tmp_path / "fp8"
    shutil.copytree(tiny[0], src)
    tensors = load_file(src / "model.safetensors")
    expected = {}
    for name in [n for n in tensors if ".experts." in n]:
        w = tensors.pop(name)
        scale = w.abs().max() / 448.0
        codes = (w / scale).to(torch.float8_e4m3fn)
        tensors[name] = codes
        tensors[name + "_scale_inv"] = scale.reshape(1, 1).float()
        expected[name] = codes.float() * scale
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "pack"
    quantize(src, out, build_recipe("bf16"))
    pack = Pack(out)
    for layer, e in [(0, 1), (2, 6)]:
        w = pack.load(layer, e)
        for proj, hf in EXPERT_NAMES.items():
            want = expected[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{hf}.weight"].to(torch.bfloat16)
            assert torch.equal(getattr(w, proj).packed["weight"], want)
    assert not any(n.endswith("_scale_inv") for n in pack.names())


def _mapped_rss(path: Path) -> int | None:
    """Resident bytes of all of this process's mappings of `path` (Linux /proc/self/smaps), else None."""
    smaps = Path("/proc/self/smaps")
    if not smaps.exists():
        return None
    total, inside = 0, False
    target = str(path.resolve())
    for line in smaps.read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            inside = len(fields) >= 6 and fields[-1] == target
        elif inside and fields[:1] == ["Rss:"]:
            total += int(fields[1]) * 1024
    return total


def test_loading_a_pack_reads_no_expert_and_a_token_touches_only_its_experts(tmp_path):
    src = tmp_path / "src"
    save_tiny(mixtral_config(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_local_experts=8), src)
    out = tmp_path / "pack"
    quantize(src, out, build_recipe("int8"))
    expert_file = out / "experts-00001.safetensors"
    lm = load_model(out, device="cpu", dtype="float32")
    before = _mapped_rss(expert_file)
    if before is None:
        pytest.skip("needs /proc/self/smaps")
    per_expert = lm.source.max_expert_nbytes()
    assert per_expert > 150_000
    assert before <= 64 << 10  # at most a header page and kernel fault-around, no expert data
    lm.model.setup_cache(1)
    lm.model(torch.tensor([5]), 0)  # one token: top-2 experts in each of 2 layers
    after = _mapped_rss(expert_file)
    # 4 experts, plus the kernel's fault-around (up to 64 KiB of cached pages on each side of a range)
    assert per_expert <= after <= 4 * (per_expert + (128 << 10))
    assert after < 16 * per_expert / 2  # far from all 16 experts
