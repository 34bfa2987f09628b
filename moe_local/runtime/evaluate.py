"""Measured quality: perplexity of a model on a token file, and its agreement with a reference model.

The token ids are split into consecutive windows of W tokens; within a window every token after the
first is scored given the window's prefix (one forward pass per window, no state carried across
windows). perplexity = exp(mean negative log-likelihood). With a reference model (e.g. the bf16
checkpoint for a quantized pack) we also report the mean KL(reference || ours) of the next-token
distributions over the same positions and how often both put the same token first: KL and top-1
see differences that perplexity averages away.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from moe_local.errors import MoeLocalError

DEFAULT_WINDOW = 512


@dataclass
class EvalResult:
    ppl: float
    nll: float
    tokens: int
    kl: float | None = None
    top1: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


TOKEN_FILE_WANTED = "expected a .npy of integer token ids (uint16/int32/int64)"


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a .npy header, or a one-line MoeLocalError saying what the file is instead.

    Why read the header ourselves: np.load on a file without the .npy magic falls back to pickle and
    its refusal advises the user to "load it unsafely"; we never load pickles, so we check first and
    name the file and what we found.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(6)
            if head != b"\x93NUMPY":
                found = "an empty file" if not head else f"no .npy header (the file starts with {head!r})"
                raise MoeLocalError(f"{TOKEN_FILE_WANTED}, found {found}", path)
            fh.seek(0)
            try:
                version = np.lib.format.read_magic(fh)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _fortran, dtype = read(fh)  # parsed with ast.literal_eval, never unpickled
            except (ValueError, EOFError) as exc:
                raise MoeLocalError(f"{TOKEN_FILE_WANTED}, found a damaged .npy header ({exc})", path) from None
    except FileNotFoundError:
        raise MoeLocalError("no such token file", path) from None
    except IsADirectoryError:
        raise MoeLocalError(f"{TOKEN_FILE_WANTED}, found a directory", path) from None
    except OSError as exc:
        raise MoeLocalError(f"cannot read the token file: {exc.strerror}", path) from None
    if dtype.hasobject:
        raise MoeLocalError(f"{TOKEN_FILE_WANTED}, found an array of Python objects (dtype {dtype}; "
                            "pickled data is never loaded)", path)
    if len(shape) != 1 or dtype.kind not in "iu":
        raise MoeLocalError(f"{TOKEN_FILE_WANTED}, found a {len(shape)}-D {dtype} array", path)
    return shape, dtype


def load_token_ids(path: str | Path, max_tokens: int | None = None, vocab_size: int | None = None,
                   offset: int = 0) -> torch.Tensor:
    """The first `max_tokens` ids (after `offset`) of a 1-D integer .npy file, as int64.

    The one token-file loader (eval --tokens, quantize --calibration): pickles are never loaded, and
    anything that is not a 1-D integer .npy is refused in one line naming the file.
    """
    path = Path(path)
    _npy_header(path)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise MoeLocalError(f"{TOKEN_FILE_WANTED}, found a truncated or unreadable array ({exc})", path) from None
    end = len(arr) if max_tokens is None else min(len(arr), offset + max_tokens)
    ids = torch.from_numpy(np.array(arr[offset:end], dtype=np.int64))  # a copy: the map is read-only
    if ids.numel() < 2:
        raise MoeLocalError(f"needs at least 2 token ids, has {ids.numel()} (after offset {offset})", path)
    if vocab_size is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise MoeLocalError(f"token ids range {int(ids.min())}..{int(ids.max())} outside the vocabulary of {vocab_size}", path)
    return ids


def check_eval_options(window: int, max_tokens: int | None) -> None:
    """Refuse counts that cannot score anything before a model is loaded, naming the flag."""
    if window < 2:
        raise MoeLocalError(f"--window must be at least 2, got {window}")
    if max_tokens is not None and max_tokens < 2:
        raise MoeLocalError(f"--max-tokens must be at least 2 (one id predicts the next), got {max_tokens}")


def windows(n: int, window: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) windows; a trailing window of one token scores nothing and is dropped."""
    return [(s, min(s + window, n)) for s in range(0, n, window) if min(s + window, n) - s >= 2]


def _logits(lm, ids: torch.Tensor) -> torch.Tensor:
    logits = lm.model(ids.to(lm.device), 0).float().cpu()
    if not bool(torch.isfinite(logits).all()):  # a NaN perplexity is not a result: name where it came from
        where = lm.model.locate_nonfinite(ids.to(lm.device), 0) or "the logits"
        raise MoeLocalError(f"non-finite values (NaN or Inf) first appear in the output of {where}: the weights "
                            f"in {lm.root} hold NaN/Inf or overflow in {str(lm.dtype).removeprefix('torch.')}")
    return logits


@torch.inference_mode()
def window_logprobs(lm, ids: torch.Tensor, window: int = DEFAULT_WINDOW) -> list[torch.Tensor]:
    """Next-token log-probabilities [T-1, vocab] per window: a reference computed once, compared many times."""
    lm.model.setup_cache(window)
    return [F.log_softmax(_logits(lm, ids[s:e])[:-1], dim=-1) for s, e in windows(ids.numel(), window)]


@torch.inference_mode()
def evaluate(lm, ids: torch.Tensor, window: int = DEFAULT_WINDOW, reference=None,
             progress: Callable[[int], None] | None = None) -> EvalResult:
    """Score `ids` with `lm` (a runtime.loader.LoadedModel); optionally compare with `reference`
    (another LoadedModel, or its `window_logprobs` for the same ids and window)."""
    if window < 2:
        raise MoeLocalError(f"--window must be at least 2, got {window}")
    spans = windows(ids.numel(), window)
    lm.model.setup_cache(window)
    if reference is not None and not isinstance(reference, list):
        reference.model.setup_cache(window)
    nll_sum, kl_sum, agree, scored = 0.0, 0.0, 0, 0
    for i, (start, end) in enumerate(spans):
        chunk = ids[start:end]
        targets = chunk[1:]
        logp = F.log_softmax(_logits(lm, chunk)[:-1], dim=-1)
        nll_sum += float(-logp.gather(1, targets[:, None]).double().sum())
        if reference is not None:
            if isinstance(reference, list):
                ref_logp = reference[i]
            else:
                ref_logp = F.log_softmax(_logits(reference, chunk)[:-1], dim=-1)
            kl_sum += float((ref_logp.exp() * (ref_logp - logp)).sum(-1).double().sum())
            agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
        scored += targets.numel()
        if progress is not None:
            progress(targets.numel())
    nll = nll_sum / scored
    return EvalResult(
        ppl=math.exp(nll),
        nll=nll,
        tokens=scored,
        kl=None if reference is None else kl_sum / scored,
        top1=None if reference is None else agree / scored,
    )
