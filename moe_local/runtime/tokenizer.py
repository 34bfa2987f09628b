"""Text <-> ids with the checkpoint's own `tokenizer.json`, and streaming detokenization.

We use the `tokenizers` library directly (not transformers): `tokenizer.json` holds the whole
pipeline (normalizer, pre-tokenizer, model, post-processor, decoder). `tokenizer_config.json` adds
what transformers layers on top: the names of the special tokens (bos/eos) and the chat template.

Streaming: a byte-level BPE token can hold half of a UTF-8 character, so decoding tokens one at a
time would print U+FFFD. `StreamDecoder` decodes a short window of recent tokens and emits only the
new part once it no longer ends in an incomplete character (the approach of text-generation-inference).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_local.errors import CheckpointError
from moe_local.loading.checkpoint import read_json

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
REPLACEMENT = "\ufffd"


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as an AddedToken dict {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


@dataclass
class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template transformers would use."""

    backend: Any  # tokenizers.Tokenizer
    path: Path
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... -> text
    chat_template: str | dict[str, str] | None = None
    config: dict = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self.backend.token_to_id(text)

    @property
    def eos_ids(self) -> list[int]:
        tid = self.token_id(self.special_tokens.get("eos_token"))
        return [] if tid is None else [tid]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


def load_tokenizer(root: Path) -> Tokenizer | None:
    """The tokenizer in `root`, or None when the checkpoint ships none (ids-only use still works)."""
    path = Path(root) / TOKENIZER_FILE
    if not path.is_file():
        return None
    from tokenizers import Tokenizer as Backend  # imported here: only text prompts need it

    try:
        backend = Backend.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise CheckpointError(f"cannot read the tokenizer ({str(exc).splitlines()[0]})", path) from None
    config_path = Path(root) / TOKENIZER_CONFIG
    config = read_json(config_path) if config_path.is_file() else {}
    special = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        text = _token_text(config.get(key))
        if text is not None:
            special[key] = text
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
        template = {t["name"]: t["template"] for t in template if isinstance(t, dict) and "name" in t}
    jinja = Path(root) / "chat_template.jinja"
    if jinja.is_file():  # transformers >= 4.43 saves the template here, and it takes precedence
        template = jinja.read_text(encoding="utf-8")
    return Tokenizer(backend, path, special, template or None, config)


class StreamDecoder:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window decoded for context (spaces/merges depend on neighbours)
        self.read = 0  # tokens before this index have been emitted

    def push(self, token: int) -> str:
        """Add one token; return the newly completed text (maybe empty while a character is pending)."""
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix : self.read])
        after = self.tok.decode(self.ids[self.prefix :])
        if after.endswith(REPLACEMENT) or len(after) <= len(before):
            return ""  # an incomplete character (or nothing visible yet): hold it back
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Whatever is still held back at the end (may contain U+FFFD if the model stopped mid-character)."""
        before = self.tok.decode(self.ids[self.prefix : self.read])
        after = self.tok.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :] if after.startswith(before) else ""
