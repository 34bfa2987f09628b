"""Fixtures shared by the test modules (helpers they share are plain functions in tiny.py,
tiny_tokenizer.py and cache_helpers.py): the shared trained model, a tiny Mixtral pack, and one
intra-op thread for the modules that ask for it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_MODEL = Path(os.environ.get(
    "MOE_LOCAL_SHARED_MODEL",
    Path(__file__).resolve().parents[1] / ".." / "shared" / "models" / "pycode-deepseek",
)).resolve()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_model() -> Path:
    if not (SHARED_MODEL / "config.json").is_file():
        pytest.skip(f"trained test model not found at {SHARED_MODEL} (see shared/README.md)")
    return SHARED_MODEL


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: tiny matmuls on a shared 2-core box run much faster than with contended
    threads. A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`; module scope
    sets it before the module's reference runs, so every run in it uses the same thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    """A tiny Mixtral INT4 pack (3 MoE layers x 8 experts, top-2, hidden 64); its checkpoint is `pack.parent / "ckpt"`."""
    from tests.cache_helpers import make_mixtral_pack

    return make_mixtral_pack(tmp_path_factory.mktemp("mixtral"))
