"""`moe-local bench`'s measurement, llama-bench style: prompt and decode throughput, numbers only.

Definitions (the README repeats them), so that figures compare with llama-bench's:
- pp (prompt processing) tok/s = P random prompt ids / the seconds of one forward over them, from
  an empty KV cache;
- tg (text generation) tok/s = N decode forwards of one token each / their seconds, timed right
  after that prefill (so at context P..P+N; llama-bench's tg starts at an empty context, which
  for these models changes only the small attention share). The ids fed are random too: no
  sampling, no tokenizer, the same ids for every engine and run;
- one warm-up repetition first (not counted): the page cache, the expert cache and the allocator
  settle, as llama-bench's warm-up run does;
- bytes read per token = the weights one decode token touches, measured, not estimated: the
  resident non-expert weights as held (one row of an untied embedding table, everything else
  whole) + the routed experts every MoE layer actually demanded during the timed decode steps, each
  at the size it is stored in (a pack's byte range, a cache slot; a resident expert as held);
- bandwidth = the best of a few sums over a buffer larger than the last-level cache, on the
  threads the run uses; roofline % = tg tok/s x bytes per token / bandwidth.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moe_local.cache.budget import module_bytes
from moe_local.errors import MoeLocalError
from moe_local.runtime.loader import LoadedModel
from moe_local.runtime.threads import apply_threads, default_threads, threads_for_batch
from moe_local.runtime.timing import now
from moe_local.units import GiB, MiB


@dataclass
class BenchOptions:
    prompt_tokens: int = 512  # -p
    gen_tokens: int = 128  # -n
    repetitions: int = 5  # -r
    threads: int | None = None  # -t (None: physical cores)
    seed: int = 0
    bandwidth_gbps: float | None = None  # --bandwidth: given, so not measured

    def validate(self) -> None:
        """One line naming the flag for a bad value, before any model is loaded."""
        for flag, value in (("-p/--n-prompt", self.prompt_tokens), ("-n/--n-gen", self.gen_tokens),
                            ("-r/--repetitions", self.repetitions)):
            if value < 1:
                raise MoeLocalError(f"{flag} must be >= 1, got {value}")
        if self.threads is not None and self.threads < 1:
            raise MoeLocalError(f"-t/--threads must be >= 1, got {self.threads}")
        if self.bandwidth_gbps is not None and not (self.bandwidth_gbps > 0 and math.isfinite(self.bandwidth_gbps)):
            raise MoeLocalError(f"--bandwidth must be a positive number of GB/s, got {self.bandwidth_gbps}")


@dataclass
class Repetition:
    pp_s: float
    tg_s: float
    pp_tps: float
    tg_tps: float


@dataclass
class Figures:
    mean: float
    stddev: float  # sample standard deviation over the repetitions (0 for one)
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> "Figures":
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), sd, min(values), max(values))


@dataclass
class BenchResult:
    model: str
    family: str
    weights: str  # what the experts are stored as: "bf16", "int4 g32", ...
    size_bytes: int  # the model's weight files on disk
    params: int  # total parameters
    backend: str  # "CPU" | "CUDA"
    device: str
    dtype: str
    threads: int
    experts: str  # tiered | resident
    prompt_tokens: int
    gen_tokens: int
    pp: Figures
    tg: Figures
    dense_bytes_per_token: int
    expert_bytes_per_token: float
    bytes_per_token: float
    bandwidth_gbps: float
    bandwidth_measured: bool
    roofline_tps: float  # the decode rate the bandwidth allows at bytes_per_token
    roofline_pct: float  # tg mean / roofline_tps
    repetitions: list[Repetition] = field(default_factory=list)
    warmup: Repetition | None = None

    def to_dict(self) -> dict:
        return {"format": "moe-local-bench", "version": 1, **asdict(self)}


# ------------------------------------------------------------------------------------------------ bandwidth
def last_level_cache_bytes() -> int:
    """The largest CPU cache sysfs reports (0 if it says nothing)."""
    best = 0
    for size in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = size.read_text().strip().upper()
        mult = {"K": 1024, "M": MiB, "G": GiB}.get(text[-1:], 1)
        try:
            best = max(best, int(text.rstrip("KMG")) * mult)
        except ValueError:
            continue
    return best


def measure_read_bandwidth(threads: int, nbytes: int | None = None, passes: int = 5) -> float:
    """GB/s of a float32 sum over a buffer well beyond the last-level cache; the best of `passes`.

    A sum reads every byte once and does one add per 4 bytes, far below what a core can add: the
    memory is the limit, as it is for batch-1 decode."""
    if nbytes is None:
        nbytes = max(512 * MiB, 2 * last_level_cache_bytes())
    apply_threads(threads)
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(passes + 1):  # the first pass only faults the pages in
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    del buf
    return nbytes / best / 1e9


# ------------------------------------------------------------------------------------------------ bytes per token
class CountingProvider:
    """Wraps the model's expert provider and records which (layer, expert) each call demanded.

    Only ids are kept while timing (a copy of a small tensor); sets are built afterwards."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.recording = False
        self.calls: list[tuple[int, torch.Tensor]] = []

    def forward(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.recording:
            self.calls.append((layer, ids.detach().reshape(-1).clone()))
        return self.inner.forward(layer, x, ids, weights)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def demanded(self) -> list[tuple[int, int]]:
        """(layer, expert) per call, each distinct expert of a call once (as the cache counts a use)."""
        return [(layer, int(e)) for layer, ids in self.calls for e in torch.unique(ids).tolist()]


def expert_nbytes(lm: LoadedModel, layer: int, expert: int) -> int:
    """One routed expert at the size the provider reads it: its stored byte range (a pack, a cache slot
    of a checkpoint's tensors) or, for resident experts, the tensors as held."""
    held = getattr(lm.provider, "experts", None)
    if isinstance(held, dict) and (layer, expert) in held:
        return int(held[(layer, expert)].nbytes())
    source = getattr(lm.provider, "source", lm.source)
    sized = getattr(source, "expert_nbytes", None)
    if callable(sized):
        return int(sized(layer, expert))
    return int(lm.source.load(layer, expert).nbytes())


def dense_bytes_per_token(lm: LoadedModel) -> int:
    """Resident non-expert weights one token reads: all of them, but only one row of an untied embedding."""
    total = module_bytes(lm.model)
    emb = lm.model.model.embed_tokens.weight
    if emb is not lm.model.lm_head.weight:
        # a float table or a `--dense`-packed one (PackedWeight: its stored bytes); rows are equal-sized
        held = emb.numel() * emb.element_size() if isinstance(emb, torch.Tensor) else int(emb.nbytes)
        total -= held - held // emb.shape[0]
    return total


# ------------------------------------------------------------------------------------------------ the model
@dataclass
class ModelFacts:
    weights: str  # how the routed experts are stored: "BF16", "int4 g32", "int8 + ternary g64", ...
    size_bytes: int  # weight files on disk
    params: int  # total parameters


def model_facts(root: str | Path) -> ModelFacts:
    """The table's size / params / weights columns, from headers and the manifest (no tensor read)."""
    from moe_local.runtime.inspect import summarize

    s = summarize(root)
    if s.pack is None:
        return ModelFacts(s.checkpoint_dtype, s.checkpoint_bytes, s.total_params)
    labels: list[str] = []
    for g in s.pack["groups"]:
        gs = g["params"].get("group_size")
        label = g["scheme"] + (f" g{gs}" if gs else "")
        if label not in labels:
            labels.append(label)
    return ModelFacts(" + ".join(labels), s.pack["weight_bytes"], s.total_params)


# ------------------------------------------------------------------------------------------------ the run
def _random_ids(n: int, vocab: int, gen: torch.Generator) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=gen).tolist()


def _one_repetition(lm: LoadedModel, prompt: list[int], gen_ids: list[int], counter: CountingProvider | None,
                    record: bool) -> Repetition:
    model, dev = lm.model, lm.device
    tokens = torch.tensor(prompt, dtype=torch.long, device=dev)
    threads_for_batch(len(prompt), lm.threads, dev)
    t0 = now(dev)
    model(tokens, 0, last_only=True)
    t1 = now(dev)
    if counter is not None:
        counter.recording = record
    pos = len(prompt)
    threads_for_batch(1, lm.threads, dev)
    try:
        for tok in gen_ids:
            model(torch.tensor([tok], dtype=torch.long, device=dev), pos, last_only=True)
            pos += 1
        t2 = now(dev)
    finally:
        if counter is not None:
            counter.recording = False
    pp_s, tg_s = t1 - t0, t2 - t1
    return Repetition(pp_s, tg_s, len(prompt) / pp_s if pp_s > 0 else 0.0,
                      len(gen_ids) / tg_s if tg_s > 0 else 0.0)


def run_bench(lm: LoadedModel, options: BenchOptions, *, name: str, facts: ModelFacts, experts: str,
              on_repetition=None) -> BenchResult:
    """Warm up once, then `repetitions` x (prefill P random ids, decode N more); every figure measured here.

    `on_repetition(i, total, rep)` is called after each one (i = 0 is the warm-up)."""
    options.validate()
    threads = options.threads or default_threads()
    context = int(lm.model.args.max_position_embeddings)
    if options.prompt_tokens + options.gen_tokens > context:
        raise MoeLocalError(f"-p {options.prompt_tokens} + -n {options.gen_tokens} exceeds the model's context of "
                            f"{context} tokens (max_position_embeddings in {lm.root / 'config.json'})")
    before = torch.get_num_threads()
    try:
        return _run(lm, options, threads, name, facts, experts, on_repetition)
    finally:  # a library caller (a test, a notebook) gets its thread count back
        torch.set_num_threads(before)


def _run(lm: LoadedModel, options: BenchOptions, threads: int, name: str, facts: ModelFacts, experts: str,
         on_repetition) -> BenchResult:
    measured = options.bandwidth_gbps is None
    bandwidth = measure_read_bandwidth(threads) if measured else float(options.bandwidth_gbps)
    apply_threads(threads)

    vocab = int(lm.model.args.vocab_size)
    gen = torch.Generator().manual_seed(options.seed)
    counter = CountingProvider(lm.model.experts.provider)
    lm.model.experts.provider = counter
    reps: list[Repetition] = []
    try:
        lm.model.setup_cache(options.prompt_tokens + options.gen_tokens)
        warm = min(options.gen_tokens, 8)
        warmup = _one_repetition(lm, _random_ids(options.prompt_tokens, vocab, gen), _random_ids(warm, vocab, gen),
                                 counter, record=False)
        if on_repetition is not None:
            on_repetition(0, options.repetitions, warmup)
        for i in range(options.repetitions):
            rep = _one_repetition(lm, _random_ids(options.prompt_tokens, vocab, gen),
                                  _random_ids(options.gen_tokens, vocab, gen), counter, record=True)
            reps.append(rep)
            if on_repetition is not None:
                on_repetition(i + 1, options.repetitions, rep)
    finally:
        lm.model.experts.provider = counter.inner

    decode_tokens = options.gen_tokens * options.repetitions
    sizes: dict[tuple[int, int], int] = {}
    expert_total = 0
    for key in counter.demanded():
        if key not in sizes:
            sizes[key] = expert_nbytes(lm, *key)
        expert_total += sizes[key]
    expert_per_token = expert_total / decode_tokens
    dense = dense_bytes_per_token(lm)
    per_token = dense + expert_per_token
    tg = Figures.of([r.tg_tps for r in reps])
    roofline = bandwidth * 1e9 / per_token
    return BenchResult(
        model=name, family=lm.model.family, weights=facts.weights, size_bytes=facts.size_bytes, params=facts.params,
        backend="CUDA" if lm.device.type == "cuda" else "CPU", device=str(lm.device),
        dtype=str(lm.dtype).removeprefix("torch."), threads=threads, experts=experts,
        prompt_tokens=options.prompt_tokens, gen_tokens=options.gen_tokens,
        pp=Figures.of([r.pp_tps for r in reps]), tg=tg,
        dense_bytes_per_token=dense, expert_bytes_per_token=expert_per_token, bytes_per_token=per_token,
        bandwidth_gbps=bandwidth, bandwidth_measured=measured, roofline_tps=roofline,
        roofline_pct=100 * tg.mean / roofline, repetitions=reps, warmup=warmup,
    )
