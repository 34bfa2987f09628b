"""A loaded model with its tokenizer and chat template: what `generate` and `chat` talk to.

`Session.open(ref, ...)` loads everything once; `prompt_ids()` turns user input (text, a chat turn or
raw ids) into token ids; `ChatSession` keeps the conversation and streams replies. The CLI only
parses options and renders events, so everything here is usable (and tested) without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from moe_local.errors import GenerationError
from moe_local.runtime.chat_template import Message, pick_template, plain_chat, render_chat
from moe_local.runtime.generate import GenerateOptions, GenerationResult, GenerationStream, Generator, StepInfo
from moe_local.runtime.loader import LoadedModel, ProviderFactory, load_model, resident_provider
from moe_local.runtime.report import run_report
from moe_local.loading.hub import resolve_model_dir
from moe_local.runtime.tokenizer import Tokenizer, load_tokenizer

NO_TOKENIZER = (
    "has no tokenizer.json, so text cannot be tokenized; give token ids with `moe-local generate --prompt-ids 1,2,3`")
NO_PROMPT = "give a prompt: --prompt TEXT or --prompt-ids 1,2,3"


def check_prompt_options(prompt: str | None, ids: Sequence[int] | str | None, chat: bool = False,
                         system: str | None = None) -> None:
    """A prompt is text or token ids, not both and not neither: refused before any model is loaded."""
    if prompt is None and ids is None:
        raise GenerationError(NO_PROMPT)
    if ids is not None and (prompt is not None or chat or system is not None):
        raise GenerationError("--prompt-ids is the whole prompt: do not combine it with --prompt, --chat or --system")


@dataclass
class Session:
    lm: LoadedModel
    tokenizer: Tokenizer | None
    generator: Generator

    @classmethod
    def open(cls, ref: str | Path, device: str | None = None, dtype: str | None = None,
             provider: ProviderFactory = resident_provider, on_step=None,
             need_tokenizer: bool = False, threads: int | None = None) -> "Session":
        """Load model and tokenizer; with need_tokenizer, a missing tokenizer fails before any weight is read.
        `threads`: CPU threads to compute with (None: as the process has them, see runtime.threads)."""
        root = resolve_model_dir(ref)
        tokenizer = load_tokenizer(root)
        if tokenizer is None and need_tokenizer:
            raise GenerationError(NO_TOKENIZER, root)
        lm = load_model(root, device, dtype, provider=provider, threads=threads)
        return cls(lm, tokenizer, Generator(lm, tokenizer, on_step=on_step))

    # ------------------------------------------------------------ prompts
    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise GenerationError(NO_TOKENIZER, self.lm.root)
        return self.tokenizer

    @property
    def chat_template(self) -> str | None:
        return pick_template(self.tokenizer.chat_template) if self.tokenizer else None

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> tuple[str, bool]:
        """Rendered conversation and whether it came from a real template (else the plain fallback)."""
        tok = self.require_tokenizer()
        template = self.chat_template
        if template is None:
            return plain_chat(messages, add_generation_prompt), False
        return render_chat(template, messages, tok.special_tokens, add_generation_prompt), True

    def chat_ids(self, messages: list[Message]) -> list[int]:
        text, templated = self.render(messages)
        # A template writes BOS itself; the plain fallback relies on the tokenizer's post-processor.
        return self.require_tokenizer().encode(text, add_special_tokens=not templated)

    def prompt_ids(self, prompt: str | None = None, ids: Sequence[int] | None = None, chat: bool = False,
                   system: str | None = None) -> list[int]:
        if ids is not None:
            return [int(t) for t in ids]
        if prompt is None:
            raise GenerationError(NO_PROMPT)
        if chat:
            return self.chat_ids(conversation(system, [("user", prompt)]))
        return self.require_tokenizer().encode(prompt)

    def stream(self, prompt_ids: Sequence[int], options: GenerateOptions) -> GenerationStream:
        return self.generator.stream(prompt_ids, options)

    def run_report(self, result: "GenerationResult", options: dict | None = None) -> dict:
        """The `--stats-json` object for one reply: timings, plus the cache section when experts are tiered."""
        t = result.timings
        report = run_report(
            model=str(self.lm.root), device=str(self.lm.device), dtype=str(self.lm.dtype).removeprefix("torch."),
            options=options or {}, prompt_tokens=t.prompt_tokens, generated_tokens=t.generated_tokens,
            ttft_s=t.ttft_s, prompt_s=t.prefill_s, token_latencies_s=t.token_latencies_s[1:],
            cache=self.cache_report(),
        )
        # A chat turn reuses the earlier turns' keys/values: only the new tokens were prefilled.
        report["tokens"]["cached"] = t.cached_tokens
        report["timings"]["prompt_tps"] = t.prompt_tps
        return report

    def cache_report(self) -> dict | None:
        """The expert provider's counters (the run report's "cache" section); None when experts are resident."""
        report = getattr(self.lm.provider, "report", None)
        return report() if callable(report) else None

    def cache_stats(self) -> dict | None:
        """The expert cache's live figures (`TieredExperts.live()`); None when the experts are resident."""
        live = getattr(self.lm.provider, "live", None)
        return live() if callable(live) else None

    def close(self) -> None:
        """Let the expert provider finish in-flight transfers and write its routing trace."""
        close = getattr(self.lm.provider, "close", None)
        if callable(close):
            close()


def conversation(system: str | None, turns: Sequence[tuple[str, str]]) -> list[Message]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": r, "content": c} for r, c in turns]


@dataclass
class ChatSession:
    """A conversation over a Session. Each reply re-renders the whole chat; the generator reuses the cached prefix."""

    session: Session
    system: str | None = None
    messages: list[Message] = field(default_factory=list)
    last: GenerationResult | None = None

    reserve_tokens: int = 4096  # KV cache allocated up front so later turns reuse earlier turns' keys/values

    def __post_init__(self) -> None:
        self.session.require_tokenizer()
        self.session.generator.reserve(self.reserve_tokens)
        self.reset()

    @property
    def templated(self) -> bool:
        return self.session.chat_template is not None

    def reset(self) -> None:
        self.messages = conversation(self.system, [])
        self.last = None

    def reply(self, user_text: str, options: GenerateOptions) -> GenerationStream:
        """Stream the assistant's answer; it joins the history when the stream ends (also if interrupted)."""
        messages = self.messages + [{"role": "user", "content": user_text}]
        stream = self.session.stream(self.session.chat_ids(messages), options)
        self.messages = messages

        def done(result: GenerationResult) -> None:
            self.messages.append({"role": "assistant", "content": result.text})
            self.last = result

        stream.on_done(done)
        return stream


__all__ = ["ChatSession", "Session", "StepInfo", "check_prompt_options", "conversation"]
