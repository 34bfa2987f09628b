"""Hub ids from a hand-built Hugging Face cache, offline: the same results as the folder itself.

The cache is laid out the way huggingface_hub writes it (and reads it back when HF_HUB_OFFLINE=1):
`$HF_HOME/hub/models--org--name/refs/main` holds the commit hash, `snapshots/<hash>/<file>` are
relative symlinks into `blobs/`. Blobs are named by their sha256 here, as the hub names LFS files
(small files get git blob ids there, which nothing reads). Symlinks matter: code that resolves a
snapshot file lands in `blobs/`, where no sibling files exist.

Hub runs are real subprocesses: huggingface_hub reads HF_HOME / HF_HUB_OFFLINE once, on first import,
and this process has already imported it (through transformers, in the fixtures).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import errors as hub_errors
from typer.testing import CliRunner

from moe_local.cli.app import app
from moe_local.formats.pack import MANIFEST
from tests.tiny import assert_one_line_error
from tests.tiny_tokenizer import save_chat_model

REPO = "tiny-org/tiny-mixtral"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
GEN = ("--prompt", "hello experts", "-n", "10", "--temperature", "0", "--ignore-eos", "--json")

runner = CliRunner()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_hub_cache(hf_home: Path, repo_id: str, folder: Path, commit: str = COMMIT) -> Path:
    """Copy `folder` into `hf_home` as a cached snapshot of `repo_id` at `commit` (branch main); return the snapshot."""
    storage = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub writes it
    for src in sorted(folder.iterdir()):
        blob = storage / "blobs" / _sha256(src)
        blob.write_bytes(src.read_bytes())
        (snapshot / src.name).symlink_to(Path("..", "..", "blobs", blob.name))
    return snapshot


def hub_cli(hf_home: Path, *args) -> subprocess.CompletedProcess:
    """`moe-local ARGS` in a fresh process, offline, with `hf_home` as the only Hugging Face cache."""
    # Either cache variable would override HF_HOME/hub.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(hf_home))
    return subprocess.run([sys.executable, "-m", "moe_local.cli.app", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120)


def hub_ok(hf_home: Path, *args) -> str:
    r = hub_cli(hf_home, *args)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def folder_ok(*args) -> str:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.stdout


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hub_src")
    save_chat_model(path)
    return path


@pytest.fixture(scope="module")
def hub(folder, tmp_path_factory) -> tuple[Path, Path]:
    """(HF_HOME, snapshot folder) with `folder` cached as REPO."""
    hf_home = tmp_path_factory.mktemp("hf_home")
    return hf_home, build_hub_cache(hf_home, REPO, folder)


def test_generate_from_hub_id_matches_folder(folder, hub):
    from_hub = json.loads(hub_ok(hub[0], "generate", REPO, *GEN))
    from_folder = json.loads(folder_ok("generate", folder, *GEN))
    assert len(from_hub["tokens"]) == 10
    assert from_hub["prompt_tokens"] == from_folder["prompt_tokens"]  # the cached tokenizer was used
    assert from_hub["tokens"] == from_folder["tokens"]
    assert from_hub["text"] == from_folder["text"]


def test_inspect_hub_id_matches_folder(folder, hub):
    from_hub = json.loads(hub_ok(hub[0], "inspect", REPO, "--json"))
    from_folder = json.loads(folder_ok("inspect", folder, "--json"))
    assert Path(from_hub.pop("path")) == hub[1]
    from_folder.pop("path")
    assert from_hub == from_folder
    assert from_hub["checkpoint_bytes"] > 0 and from_hub["family"] == "mixtral"


def test_quantize_from_hub_id_records_the_commit_and_real_hashes(folder, hub, tmp_path):
    """The manifest's sha256 comes free from blob names; it must equal hashing the bytes."""
    hub_ok(hub[0], "quantize", REPO, tmp_path / "pack", "--scheme", "int8")
    source = json.loads((tmp_path / "pack" / MANIFEST).read_text())["source"]
    assert source["ref"] == REPO and source["revision"] == COMMIT
    assert "model.safetensors" in source["files"] and "tokenizer.json" in source["files"]
    for name, info in source["files"].items():
        assert info == {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}, name


def test_revision_by_commit_hash_and_unknown_branch(hub):
    hub_ok(hub[0], "quantize", REPO, hub[0] / "pack", "--revision", COMMIT, "--dry-run")
    r = hub_cli(hub[0], "quantize", REPO, hub[0] / "pack2", "--revision", "no-such-branch", "--dry-run")
    line = assert_one_line_error(r.stdout + r.stderr, r.returncode)
    assert REPO in line and "offline" in line


@pytest.mark.skipif(not hasattr(hub_errors, "IncompleteSnapshotError"), reason="this huggingface_hub keeps no cached file listing")
def test_incomplete_snapshot_is_one_clear_line(folder, tmp_path):
    """huggingface_hub's cached file listing names a file the snapshot lacks (an interrupted download)."""
    snapshot = build_hub_cache(tmp_path, REPO, folder)
    (snapshot / "model.safetensors").unlink()
    listing = {"format_version": 1, "files": {f.name: {"size": f.stat().st_size, "blob_id": "0" * 40}
                                              for f in sorted(folder.iterdir())}}
    trees = snapshot.parents[1] / "trees"
    trees.mkdir()
    (trees / f"{COMMIT}.json").write_text(json.dumps(listing))
    r = hub_cli(tmp_path, "inspect", REPO)
    line = assert_one_line_error(r.stdout + r.stderr, r.returncode)
    assert REPO in line and "incomplete" in line and "(missing model.safetensors)" in line, line
