"""Turn a model reference (a folder, or a hub repo id) into a local folder.

A hub id is fetched with `huggingface_hub.snapshot_download`, asking only for the files we read
(configs, safetensors, tokenizer files), so a repo that also ships PyTorch pickles or GGUF files
does not cost their download. `HF_HOME` and `HF_HUB_OFFLINE` are honoured by huggingface-hub itself.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from moe_local.errors import CheckpointError

# Everything the loader, tokenizer and chat template may read; nothing else is downloaded.
HUB_FILE_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "tokenizer*",
    "*.tiktoken",
]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def looks_like_repo_id(ref: str) -> bool:
    """`org/name` with no path-only characters: what the hub accepts as a repo id."""
    return bool(_REPO_ID.match(ref)) and not ref.startswith((".", "/", "~"))


def resolve_model_dir(ref: str | os.PathLike, revision: str | None = None) -> Path:
    """Return the local folder holding `ref`, downloading a hub repo if needed.

    Raises CheckpointError with one line when the folder does not exist, or the hub cannot be
    reached and nothing is cached.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError("is a file, not a model folder (expected a folder with config.json)", path)
    ref = str(ref)
    if not looks_like_repo_id(ref):
        raise CheckpointError("no such folder, and not a hub repo id of the form org/name", ref)
    return _download(ref, revision)


def _download(repo_id: str, revision: str | None) -> Path:
    # Imported here: huggingface_hub is slow to import and most runs use local folders.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        local = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILE_PATTERNS)
    except LocalEntryNotFoundError as exc:
        if hasattr(exc, "snapshot_path"):  # IncompleteSnapshotError (recent huggingface-hub): an interrupted download
            raise CheckpointError(f"cached snapshot {exc.snapshot_path} is incomplete{_missing(exc)} and the hub "
                                  "cannot be reached; finish the download with network access", repo_id) from None
        raise CheckpointError(
            "not in the local Hugging Face cache and the hub cannot be reached "
            "(offline: HF_HUB_OFFLINE is set or there is no network); download it first or pass a folder",
            repo_id,
        ) from None
    except GatedRepoError:
        raise CheckpointError("is gated on the hub: accept its licence and log in (hf auth login)", repo_id) from None
    except RepositoryNotFoundError:
        raise CheckpointError("no such repo on the hub (or it is private)", repo_id) from None
    except (HfHubHTTPError, OSError) as exc:
        raise CheckpointError(f"download failed: {exc}", repo_id) from None
    return Path(local)


def _missing(exc: Exception) -> str:
    """The files huggingface-hub names as missing, from its message (it offers no attribute for them)."""
    found = re.search(r"missing \(([^)]*)\)", str(exc))
    return f" (missing {found[1]})" if found else ""
