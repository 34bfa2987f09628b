"""Shared fixtures: tiny random checkpoints saved by transformers in the real hub layout."""

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
