"""Prefill, then one token at a time: sampling, stopping and streaming for one sequence (batch 1).

`Generator(lm, tokenizer).stream(prompt_ids, options)` yields a `TokenEvent` per generated token
(its id and the text it completes, possibly "") and leaves a `GenerationResult` on the stream when
done (or interrupted). The model's KV cache is preallocated for prompt + max_tokens (capped at the
context) and kept between requests: a new prompt that starts with the previous sequence (the next
turn of a chat) only prefills its new tokens.

Stop rules: an EOS id (generation_config.json, else config.json, else the tokenizer's eos_token;
`ignore_eos` turns it off), a stop string (text up to it is emitted, the string itself and anything
after are not; text that might be the start of a stop string is held back), max tokens, or a full
context. An `on_step` hook sees every forward (phase, start position, token count) so the expert
cache can cut a routing trace into steps without the generator knowing about it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from moe_local.cache.budget import prefill_chunk as prefill_chunk_tokens
from moe_local.errors import GenerationError
from moe_local.loading.checkpoint import read_json
from moe_local.runtime.sampling import Sampler, SamplingOptions
from moe_local.runtime.threads import threads_for_batch
from moe_local.runtime.timing import Timings, now
from moe_local.runtime.tokenizer import StreamDecoder, Tokenizer


@dataclass
class GenerateOptions:
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> None:
        """One line naming the flag for a bad value (front ends call it before loading a model)."""
        self.sampling.validate()
        if self.max_tokens < 0:
            raise GenerationError(f"--max-tokens must be >= 0, got {self.max_tokens}")


@dataclass
class TokenEvent:
    token: int
    text: str  # newly completed text (may be "" while a character or a possible stop string is pending)


@dataclass
class StepInfo:
    phase: str  # "prefill" | "decode"
    start: int  # position of the first token of this forward
    tokens: int  # tokens in this forward


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    tokens: list[int]
    text: str
    stop_reason: str  # "eos" | "stop" | "length" | "context" | "interrupted"
    timings: Timings

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_ids,
            "tokens": self.tokens,
            "text": self.text,
            "stop_reason": self.stop_reason,
            "timings": self.timings.to_dict(),
        }


class GenerationStream:
    """Iterate for events; `.result` is set when iteration ends (normally, by break, or by Ctrl-C)."""

    def __init__(self, run: Callable[["GenerationStream"], Iterator[TokenEvent]]) -> None:
        self.result: GenerationResult | None = None
        self._done: list[Callable[[GenerationResult], None]] = []
        self._iter = run(self)

    def on_done(self, fn: Callable[[GenerationResult], None]) -> None:
        self._done.append(fn)

    def _finish(self, result: GenerationResult) -> None:
        self.result = result
        for fn in self._done:
            fn(result)

    def __iter__(self) -> Iterator[TokenEvent]:
        return self._iter

    def close(self) -> None:
        self._iter.close()

    def collect(self) -> GenerationResult:
        for _ in self._iter:
            pass
        assert self.result is not None
        return self.result


def eos_ids_for(root: Path, config: dict, tokenizer: Tokenizer | None = None) -> list[int]:
    """EOS ids: generation_config.json's (else config.json's), plus the tokenizer's eos_token.

    The tokenizer's is added because chat templates end turns with it (e.g. `<|im_end|>`) even
    where generation_config.json names another id.
    """
    ids: list[int] = []
    gen_path = root / "generation_config.json"
    for source in (read_json(gen_path) if gen_path.is_file() else {}, config):
        value = source.get("eos_token_id")
        if isinstance(value, int):
            value = [value]
        if isinstance(value, list) and value:
            ids = [int(v) for v in value]
            break
    if tokenizer is not None:
        ids += [t for t in tokenizer.eos_ids if t not in ids]
    return ids


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string (to hold back)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class TextStops:
    """Text assembly with stop strings: emits only text that can no longer turn into a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.text = ""
        self.stopped = False

    def feed(self, delta: str, final: bool = False) -> str:
        self.pending += delta
        hits = [(i, s) for s in self.stops if (i := self.pending.find(s)) >= 0]
        if hits:
            cut = min(hits)[0]
            out, self.pending, self.stopped = self.pending[:cut], "", True
        else:
            hold = 0 if final else _stop_prefix_len(self.pending, self.stops)
            out = self.pending[: len(self.pending) - hold]
            self.pending = self.pending[len(out) :]
        self.text += out
        return out


class Generator:
    """Owns the model's KV cache for a sequence of requests on one LoadedModel."""

    def __init__(self, lm, tokenizer: Tokenizer | None = None, eos_ids: Sequence[int] | None = None,
                 on_step: Callable[[StepInfo], None] | None = None, reuse_prefix: bool = True,
                 prefill_chunk: int | None = None) -> None:
        """prefill_chunk: tokens per prefill forward (None: sized by cache.budget.prefill_chunk from the
        model's heads and context, so one chunk's attention scores fit the planned workspace)."""
        self.lm = lm
        self.model = lm.model
        args = self.model.args
        self.prefill_chunk = int(prefill_chunk or prefill_chunk_tokens(args.num_attention_heads, self.context_length))
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids if eos_ids is not None else eos_ids_for(lm.root, lm.config, tokenizer))
        self.on_step = on_step
        self.reuse_prefix = reuse_prefix
        self._capacity = 0
        self._cached: list[int] = []  # ids whose keys/values are valid in the cache, from position 0
        self._seen: int | None = None  # the model's kv_version after our last use of its cache

    @property
    def model_context(self) -> int:
        return int(self.model.args.max_position_embeddings)

    @property
    def context_length(self) -> int:
        """Positions this generator may use: the model's context, capped at the KV cache the memory
        budget planned for (`BudgetPlan.kv_tokens`), so the cache never grows past what --ram /
        --gpu-mem reserved for it."""
        plan = getattr(self.lm.provider, "plan", None)
        planned = getattr(plan, "kv_tokens", 0) or 0
        return min(self.model_context, planned) if planned else self.model_context

    @property
    def vocab_size(self) -> int:
        return int(self.model.args.vocab_size)

    def check_prompt(self, prompt_ids: Sequence[int]) -> None:
        where = self.lm.root / "config.json"
        if not prompt_ids:
            raise GenerationError("the prompt is empty: give at least one token")
        if len(prompt_ids) >= self.context_length:
            if self.context_length < self.model_context:
                raise GenerationError(
                    f"prompt has {len(prompt_ids)} tokens but the memory budget reserved a KV cache of "
                    f"{self.context_length} tokens (the model's context is {self.model_context}); shorten the "
                    f"prompt, or reserve more (serve --ctx-size)")
            raise GenerationError(
                f"prompt has {len(prompt_ids)} tokens but the model's context is {self.context_length} "
                f"(max_position_embeddings in {where}); shorten the prompt")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise GenerationError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")

    def reserve(self, need: int) -> int:
        """Make room for `need` positions (capped at the context); return how many cached positions stay valid.

        Growing re-allocates the cache and so forgets it; a chat reserves a generous size up front.
        """
        need = min(need, self.context_length)
        if self.model.kv_version != self._seen or self.model.max_len != self._capacity:
            # Another Generator (or caller) used this model's cache since: nothing in it is ours.
            self._capacity = self.model.max_len  # its size is still usable, its contents are not
            self._cached = []
        if need > self._capacity:
            # Grow geometrically so a chat does not re-allocate (and re-prefill) every turn.
            self._capacity = min(self.context_length, max(need, 2 * self._capacity))
            self.model.setup_cache(self._capacity)
            self._cached = []
        self._seen = self.model.kv_version
        return len(self._cached)

    def _common_prefix(self, prompt_ids: Sequence[int]) -> int:
        """How many leading prompt tokens the cache already holds (and the forward may skip).

        A model with recurrent state (`can_resume`) only continues from exactly where its state is:
        when the new prompt diverges inside the cached sequence, or equals it (one token must run),
        it is recomputed from position 0 rather than continued from a state that saw other tokens."""
        if not self.reuse_prefix:
            return 0
        n = 0
        for a, b in zip(self._cached, prompt_ids):
            if a != b:
                break
            n += 1
        n = min(n, len(prompt_ids) - 1)  # at least one token must run to get next-token logits
        return n if n == 0 or self.model.can_resume(n) else 0

    def stream(self, prompt_ids: Sequence[int], options: GenerateOptions | None = None) -> GenerationStream:
        options = options or GenerateOptions()
        prompt = [int(t) for t in prompt_ids]
        self.check_prompt(prompt)
        options.validate()
        sampler = Sampler(options.sampling, self.lm.device)
        return GenerationStream(lambda s: self._run(s, prompt, options, sampler))

    def generate(self, prompt_ids: Sequence[int], options: GenerateOptions | None = None) -> GenerationResult:
        return self.stream(prompt_ids, options).collect()

    def _forward(self, ids: list[int], start: int, phase: str) -> torch.Tensor:
        """Run `ids` at positions start.. and return the last position's logits.

        A long prefill runs in chunks of `prefill_chunk` tokens (each a step of its own for `on_step`):
        the same logits as one forward, since every chunk attends to the cached positions before it,
        with activations bounded by the chunk instead of the prompt."""
        row = None
        for at in range(0, len(ids), self.prefill_chunk):
            row = self._forward_one(ids[at:at + self.prefill_chunk], start + at, phase)
        assert row is not None
        return row

    def _forward_one(self, ids: list[int], start: int, phase: str) -> torch.Tensor:
        if self.on_step is not None:
            self.on_step(StepInfo(phase, start, len(ids)))
        # Positions >= start are overwritten (or left stale if the forward fails): forget them first.
        del self._cached[start:]
        tokens = torch.tensor(ids, dtype=torch.long, device=self.lm.device)
        threads_for_batch(len(ids), self.lm.threads, self.lm.device)
        try:
            logits = self.model(tokens, start, last_only=True)
        finally:  # even interrupted, only positions >= start were touched: the prefix stays ours
            self._seen = self.model.kv_version
        row = logits[-1]
        if not bool(torch.isfinite(row).all()):  # one check per step: NaN weights must not pass as an EOS
            raise self._nonfinite(tokens, start)
        self._cached += ids  # in place: a decode step must not copy the whole history
        return row

    def _nonfinite(self, tokens: torch.Tensor, start: int) -> GenerationError:
        """The error for a step whose logits hold NaN/Inf, naming the first layer that produced them."""
        where = self.model.locate_nonfinite(tokens, start) or "the logits"
        self._cached = []  # the diagnosis re-ran the step: nothing in the cache is trusted any more
        dtype = str(self.lm.dtype).removeprefix("torch.")
        hint = "" if self.lm.dtype == torch.float32 else f" or overflow in {dtype} (try --dtype float32)"
        return GenerationError(
            f"non-finite values (NaN or Inf) first appear in the output of {where} at position {start}: "
            f"the weights in {self.lm.root} hold NaN/Inf{hint}")

    def _run(self, stream: GenerationStream, prompt: list[int], options: GenerateOptions,
             sampler: Sampler) -> Iterator[TokenEvent]:
        dev = self.lm.device
        timings = Timings(prompt_tokens=len(prompt))
        generated: list[int] = []
        decoder: StreamDecoder | None = self.tokenizer.stream_decoder() if self.tokenizer else None
        text = TextStops(options.stop)
        reason = "interrupted"
        t0 = now(dev)
        first = last = t0
        try:
            self.reserve(len(prompt) + options.max_tokens)
            start = self._common_prefix(prompt)
            timings.cached_tokens = start
            logits = self._forward(prompt[start:], start, "prefill")
            timings.prefill_s = now(dev) - t0
            max_new = min(options.max_tokens, self.context_length - len(prompt))
            history = list(prompt)
            reason = "length"
            while len(generated) < max_new:
                tok = sampler(logits, history)
                t = now(dev)
                timings.token_latencies_s.append(t - last)
                if not generated:
                    first = t
                    timings.ttft_s = t - t0
                last = t
                generated.append(tok)
                history.append(tok)
                is_eos = tok in self.eos_ids and not options.ignore_eos
                at_limit = len(generated) >= max_new
                delta = ""
                if decoder is not None:
                    piece = "" if is_eos else decoder.push(tok)
                    if is_eos or at_limit:
                        piece += decoder.flush()  # the end: release any held-back text
                    delta = text.feed(piece, final=is_eos or at_limit)
                yield TokenEvent(tok, delta)
                if is_eos:
                    reason = "eos"
                    break
                if text.stopped:
                    reason = "stop"
                    break
                if at_limit:
                    reason = "length" if max_new == options.max_tokens else "context"
                    break
                logits = self._forward([tok], len(prompt) + len(generated) - 1, "decode")
        except (GeneratorExit, KeyboardInterrupt):  # the consumer stopped early, or Ctrl-C
            reason = "interrupted"
            raise
        finally:
            end = now(dev)
            timings.generated_tokens = len(generated)
            timings.decode_s = (last - first) if generated else 0.0
            timings.total_s = end - t0
            stream._finish(GenerationResult(prompt, generated, text.text, reason, timings))
