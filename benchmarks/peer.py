"""moe-local vs llama.cpp on the same model, the same formats and the same threads (never run in CI).

What it does, in order:

1. the model: the issue-7 benchmark model -- a random-weight, Qwen3-30B-A3B-shaped Qwen3MoE (hidden
   2048, 6 layers, 128 experts, top-8, expert size 768, 32000 ids; 7.3 GiB in bf16) saved with
   transformers' `save_pretrained` into /tmp/bench/q3moe (built into q3moe.building, then renamed;
   reused when it exists; other benchmarks share it) -- or any Hugging Face folder (`--model DIR`);
2. llama.cpp: the llama-cpp-python sdist (which vendors llama.cpp) fetched with `pip download`,
   llama-bench and llama-quantize built with cmake in --work (CPU only, -DGGML_NATIVE=ON), never a
   dependency of moe-local; the checkpoint converted with the vendored convert_hf_to_gguf.py (a local
   copy that maps our byte-level test tokenizer's pre-tokenizer to gpt-2) and quantized to Q8_0, Q4_0,
   TQ1_0 and TQ2_0;
3. ours: `moe-local quantize` to the matching schemes: int8 <-> Q8_0, int4 group 32 <-> Q4_0 (both
   32-weight blocks; see FORMATS), ternary <-> TQ1_0 / TQ2_0;
4. runs `llama-bench -p P -n N -r R -t T` and `moe-local bench` with the same figures ALTERNATELY for
   --rounds rounds, and prints per format the median prompt (pp) and decode (tg) tok/s, min/max over
   rounds, the ratio ours/theirs and the % of the bandwidth roofline (tg x bytes read per token /
   measured bandwidth);
5. `--limit 1GiB` (root only): the bigger-than-RAM mode. Each run goes into a memory cgroup with that
   limit (cgroup v1 /sys/fs/cgroup/memory or v2), the page cache dropped first; llama.cpp runs with
   `--repack 0` (pure mmap: weights paged in from the file) and default, moe-local with
   `--experts tiered --ram` inside the limit; 1 thread and T threads.

Results: a table on stdout and one JSON object (`--json FILE`, written atomically).

    python benchmarks/peer.py --json peer.json                      # Q8_0, Q4_0, TQ1_0, TQ2_0
    python benchmarks/peer.py --formats q4_0 --rounds 3 --threads 2
    python benchmarks/peer.py --limit 1GiB --formats q4_0           # bigger-than-RAM (root)
    python benchmarks/peer.py --model ~/models/Qwen3-30B-A3B --formats q4_0
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_MODEL = Path("/tmp/bench/q3moe")
BENCH_CONFIG = dict(hidden_size=2048, num_hidden_layers=6, num_experts=128, num_experts_per_tok=8,
                    moe_intermediate_size=768, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                    vocab_size=32000, intermediate_size=6144, max_position_embeddings=4096,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
TOKENIZER_TEXT = [
    "def main(argv=None):\n    parser = argparse.ArgumentParser()\n    return 0\n",
    "The quick brown fox jumps over the lazy dog. Mixture of experts route tokens.",
    "for i in range(10):\n    print(i, i * i)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ the model
def save_tokenizer(path: Path) -> None:
    """A small byte-level BPE tokenizer (llama.cpp's converter needs one; the ids it covers do not matter)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TOKENIZER_TEXT * 4, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "model_max_length": 4096, "clean_up_tokenization_spaces": False}, indent=2))


def build_bench_model(target: Path = BENCH_MODEL, seed: int = 0) -> Path:
    """The issue-7 model in bf16 at `target` (built beside it, then renamed: a half-built folder never shows).

    If another benchmark is building it right now (`<target>.building` exists and grows), wait for it."""
    if (target / "config.json").is_file():
        return target
    building = target.with_name(target.name + ".building")
    if building.exists():
        log(f"{building} exists: waiting for the other build to finish (delete it if that build died)")
        while building.exists() and not (target / "config.json").is_file():
            time.sleep(10)
        if (target / "config.json").is_file():
            return target
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    log(f"building the benchmark model into {building} (bf16, ~7.3 GiB) ...")
    building.mkdir(parents=True)
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(**BENCH_CONFIG)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(building)
    save_tokenizer(building)
    del model
    building.rename(target)
    log(f"built {target}")
    return target


# ------------------------------------------------------------------------------------------------ formats
class Format:
    """One llama.cpp type and the moe-local scheme that matches it."""

    def __init__(self, name: str, gguf_type: str, scheme: list[str], pack: str, note: str) -> None:
        self.name, self.gguf_type, self.scheme, self.pack, self.note = name, gguf_type, scheme, pack, note


# int4 at group 32: a Q4_0 block is 32 weights sharing one fp16 scale; g32 gives each of our scales
# (plus its zero point) the same 32 weights, so both engines quantize at the same granularity (ours
# reads 4.75 bits/weight to Q4_0's 4.5: the zero point). int8 per output channel (8.125 bits with
# its scale) vs Q8_0's 8.5 (a scale per 32). Ternary: one pack for both TQ types (1.6875 / 2.0625
# bits/weight; ours 1.6 bits of codes + a scale per group).
FORMATS = {
    "q8_0": Format("q8_0", "Q8_0", ["--scheme", "int8"], "int8", "int8 per channel"),
    "q4_0": Format("q4_0", "Q4_0", ["--scheme", "int4", "--group-size", "32"], "int4g32", "int4 g32"),
    # Q4_0 quantizes attention and the LM head too; this is ours with every matrix at 4 bits as well
    # (experts g64: 4.375 bits/weight, dense int4 g32), the same bytes per token as llama.cpp reads.
    "q4_0-all": Format("q4_0-all", "Q4_0", ["--scheme", "int4", "--group-size", "64", "--dense", "int4"],
                       "int4g64-dense-int4", "int4 g64, dense int4 g32"),
    # likewise for Q8_0: experts int8 per channel and every dense matrix int8 (--dense int8)
    "q8_0-all": Format("q8_0-all", "Q8_0", ["--scheme", "int8", "--dense", "int8"], "int8-dense-int8",
                       "int8, dense int8"),
    "tq1_0": Format("tq1_0", "TQ1_0", ["--scheme", "ternary"], "ternary", "ternary"),
    "tq2_0": Format("tq2_0", "TQ2_0", ["--scheme", "ternary"], "ternary", "ternary"),
}


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    log("$ " + " ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


# ------------------------------------------------------------------------------------------------ llama.cpp
SDIST = "llama-cpp-python==0.3.36"


class Llama:
    """The vendored llama.cpp of the llama-cpp-python sdist, built in `work` (CPU only)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.build = work / "build"
        self.bench = self.build / "bin" / "llama-bench"
        self.quantize = self.build / "bin" / "llama-quantize"
        self.src = next(iter(sorted(work.glob("llama_cpp_python-*/vendor/llama.cpp"))), None)

    def ensure(self) -> "Llama":
        if self.src is None:
            self.work.mkdir(parents=True, exist_ok=True)
            run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST,
                 "-d", self.work])
            tarball = next(iter(self.work.glob("llama_cpp_python-*.tar.gz")))
            run(["tar", "xzf", tarball, "-C", self.work])
            self.src = next(iter(sorted(self.work.glob("llama_cpp_python-*/vendor/llama.cpp"))))
        if not (self.bench.is_file() and self.quantize.is_file()):
            run(["cmake", "-S", self.src, "-B", self.build, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                 "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_OPENSSL=OFF"])
            run(["cmake", "--build", self.build, "-j", str(os.cpu_count() or 2),
                 "--target", "llama-bench", "llama-quantize"])
        return self

    def converter(self) -> Path:
        """A local copy of convert_hf_to_gguf.py whose unknown-BPE-pre-tokenizer error maps to gpt-2.

        Our byte-level test tokenizer hashes to no known model; gpt-2's pre-tokenizer is the
        byte-level one (and ids, not text, are what the benchmark feeds)."""
        dst = self.work / "convert"
        if not (dst / "convert_hf_to_gguf.py").is_file():
            tmp = self.work / "convert.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            shutil.copy(self.src / "convert_hf_to_gguf.py", tmp)
            shutil.copytree(self.src / "conversion", tmp / "conversion")
            base = tmp / "conversion" / "base.py"
            text = base.read_text()
            marker = "        if res is None:\n            logger.warning(\"\\n\")"
            assert marker in text, "convert_hf_to_gguf's pre-tokenizer check changed: update benchmarks/peer.py"
            text = text.replace(marker, "        if res is None:  # moe-local peer.py: byte-level BPE test tokenizer\n"
                                        "            res = \"gpt-2\"\n" + marker, 1)
            base.write_text(text)
            tmp.rename(dst)
        return dst / "convert_hf_to_gguf.py"

    def convert(self, model: Path, out_dir: Path) -> Path:
        out = out_dir / f"{model.name}-bf16.gguf"
        if not out.is_file():
            out_dir.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            env = {**os.environ, "PYTHONPATH": str(self.src / "gguf-py"), "NO_LOCAL_GGUF": "1"}
            run([sys.executable, self.converter(), model, "--outtype", "bf16", "--outfile", tmp],
                env=env)
            tmp.rename(out)
        return out

    def quantized(self, bf16: Path, fmt: Format) -> Path:
        out = bf16.with_name(bf16.name.replace("-bf16.gguf", f"-{fmt.gguf_type}.gguf"))
        if not out.is_file():
            tmp = out.with_name(out.name + ".tmp")
            run([self.quantize, bf16, tmp, fmt.gguf_type])
            tmp.rename(out)
        return out


def gguf_bytes_per_token(path: Path, src: Path) -> dict:
    """Weights llama.cpp reads per decode token, from the GGUF's tensor table: every tensor but the
    expert stacks and the embedding (one row of it), plus top-k / n_expert of each expert stack."""
    sys.path.insert(0, str(src / "gguf-py"))
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    top_k = int(reader.fields[f"{arch}.expert_used_count"].parts[-1][0])
    n_exp = int(reader.fields[f"{arch}.expert_count"].parts[-1][0])
    dense = experts = 0
    for t in reader.tensors:
        n = int(t.n_bytes)
        if "_exps" in t.name:
            experts += n * top_k // n_exp
        elif t.name == "token_embd.weight":
            dense += n // int(t.shape[-1])  # ggml shapes are [ne0, ne1]: ne1 rows
        else:
            dense += n
    return {"dense": dense, "experts": experts, "total": dense + experts, "file_bytes": path.stat().st_size}


# ------------------------------------------------------------------------------------------------ ours
def moe_local(*args) -> list[str]:
    return [sys.executable, "-m", "moe_local.cli", *[str(a) for a in args]]


def our_pack(model: Path, fmt: Format, out_dir: Path) -> Path:
    from moe_local.formats.pack import is_pack

    out = out_dir / f"{model.name}-{fmt.pack}"
    if not is_pack(out):
        out_dir.mkdir(parents=True, exist_ok=True)
        run([*moe_local("quantize", model, out, *fmt.scheme)])  # atomic: writes beside, renames
    return out


# ------------------------------------------------------------------------------------------------ one run each
class Limit:
    """A memory cgroup (v1 or v2) that a child process joins before exec; page cache dropped before each run."""

    def __init__(self, limit_bytes: int, name: str = "moe-local-peer") -> None:
        v1 = Path("/sys/fs/cgroup/memory")
        if (v1 / "memory.limit_in_bytes").is_file():
            self.dir = v1 / name
            self.dir.mkdir(exist_ok=True)
            (self.dir / "memory.limit_in_bytes").write_text(str(limit_bytes))
            swap = self.dir / "memory.memsw.limit_in_bytes"
            if swap.is_file():
                swap.write_text(str(limit_bytes))
        else:
            root = Path("/sys/fs/cgroup")
            if not (root / "cgroup.controllers").is_file():
                raise SystemExit("error: no memory cgroup (v1 /sys/fs/cgroup/memory or v2 /sys/fs/cgroup) found")
            self.dir = root / name
            self.dir.mkdir(exist_ok=True)
            (self.dir / "memory.max").write_text(str(limit_bytes))
            if (self.dir / "memory.swap.max").is_file():
                (self.dir / "memory.swap.max").write_text("0")
        self.limit = limit_bytes

    def join(self) -> None:  # preexec_fn: runs in the child
        (self.dir / "cgroup.procs").write_text(str(os.getpid()))

    @staticmethod
    def drop_caches() -> None:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")

    def peak(self) -> int | None:
        for name in ("memory.max_usage_in_bytes", "memory.peak"):
            f = self.dir / name
            if f.is_file():
                return int(f.read_text().split()[0])
        return None

    def remove(self) -> None:
        try:
            self.dir.rmdir()  # empty once its processes have exited
        except OSError as exc:
            log(f"note: could not remove {self.dir}: {exc.strerror}")

    def reset_peak(self) -> None:
        f = self.dir / "memory.max_usage_in_bytes"
        if f.is_file():
            f.write_text("0")


def run_measured(cmd: list[str], limit: Limit | None, timeout: float) -> tuple[int, str, str, float]:
    if limit is not None:
        limit.drop_caches()
        limit.reset_peak()
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           preexec_fn=limit.join if limit is not None else None)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = -999, exc.stdout or "", f"timed out after {timeout:.0f} s"
        out = out.decode() if isinstance(out, bytes) else out
    return rc, out, err, time.perf_counter() - t0


def failure(rc: int, err: str, limit: Limit | None) -> str:
    if rc == -9 or rc == 137:
        return "killed (out of memory)" if limit is not None else "killed"
    if rc == -999:
        return err
    last = [l for l in err.strip().splitlines() if l.strip()]
    return f"exit {rc}: {last[-1][:160] if last else ''}"


def run_llama(llama: Llama, gguf: Path, a, threads: int, limit: Limit | None, extra: list[str]) -> dict:
    cmd = ["nice", "-n", str(a.nice), llama.bench, "-m", gguf, "-p", a.p, "-n", a.n, "-r", a.r, "-t", threads,
           "-o", "json", *extra]
    log("$ " + " ".join(str(c) for c in cmd))
    rc, out, err, wall = run_measured([str(c) for c in cmd], limit, a.timeout)
    res: dict = {"engine": "llama.cpp", "cmd": " ".join(str(c) for c in cmd), "wall_s": wall,
                 "peak_bytes": limit.peak() if limit else None}
    if rc != 0:
        return {**res, "error": failure(rc, err, limit)}
    rows = json.loads(out)
    for row in rows:
        key = "pp" if row["n_prompt"] > 0 else "tg"
        res[key] = row["avg_ts"]
        res[key + "_sd"] = row["stddev_ts"]
        res[key + "_samples"] = row.get("samples_ts")
    return res


def run_ours(pack: Path, a, threads: int, bandwidth: float, limit: Limit | None, extra: list[str]) -> dict:
    cmd = ["nice", "-n", str(a.nice), *moe_local("bench", pack, "-p", a.p, "-n", a.n, "-r", a.r, "-t", threads,
                                                 "--bandwidth", f"{bandwidth:.3f}", "--json", *extra)]
    log("$ " + " ".join(cmd[3:]))
    rc, out, err, wall = run_measured(cmd, limit, a.timeout)
    res: dict = {"engine": "moe-local", "cmd": " ".join(cmd[3:]), "wall_s": wall,
                 "peak_bytes": limit.peak() if limit else None}
    if rc != 0:
        return {**res, "error": failure(rc, err, limit)}
    obj = json.loads(out.strip().splitlines()[-1])
    return {**res, "pp": obj["pp"]["mean"], "pp_sd": obj["pp"]["stddev"], "tg": obj["tg"]["mean"],
            "tg_sd": obj["tg"]["stddev"], "bytes_per_token": obj["bytes_per_token"],
            "samples": obj["repetitions"]}


# ------------------------------------------------------------------------------------------------ summary
def summarize(runs: list[dict], key: str) -> dict | None:
    values = [r[key] for r in runs if key in r]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt_fig(s: dict | None) -> str:
    if s is None:
        return "–"
    return f"{s['median']:.2f} [{s['min']:.2f}–{s['max']:.2f}]"


def ratio(a: dict | None, b: dict | None) -> str:
    return f"{a['median'] / b['median']:.2f}x" if a and b and b["median"] > 0 else "–"


def roof(s: dict | None, bytes_per_token: float | None, bandwidth: float) -> str:
    if s is None or not bytes_per_token:
        return "–"
    return f"{100 * s['median'] * bytes_per_token / (bandwidth * 1e9):.0f}%"


def table(rows: list[dict], bandwidth: float) -> str:
    """Markdown: one line per engine configuration; ratios on moe-local's line (ours / the llama.cpp run above)."""
    lines = ["| format | engine | configuration | pp tok/s median [min–max] | tg tok/s median [min–max] "
             "| pp ours/theirs | tg ours/theirs | bytes/token | tg % of roofline |", "|" + "---|" * 9]
    for row in rows:
        for eng in ("llama.cpp", "moe-local"):
            e, other = row[eng], row["llama.cpp"]
            ours = eng == "moe-local"
            bpt = e["bytes_per_token"]
            errors = "; ".join(sorted(set(e["errors"])))
            cells = [row["format"], eng, e["config"], fmt_fig(e["pp"]), fmt_fig(e["tg"]),
                     ratio(e["pp"], other["pp"]) if ours else "", ratio(e["tg"], other["tg"]) if ours else "",
                     f"{bpt / 2**20:.1f} MiB" if bpt else "–",
                     roof(e["tg"], bpt, bandwidth) + (f" ({errors})" if errors else "")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def hardware(bandwidth: float, threads: int) -> dict:
    model = next((l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True)
                  .stdout.splitlines() if l.startswith("Model name")), "?")
    return {"cpu": model, "logical_cpus": os.cpu_count(), "threads": threads, "bandwidth_gbps": bandwidth,
            "loadavg_start": os.getloadavg()}


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", type=Path, help="a Hugging Face folder (default: build/reuse the issue-7 model)")
    p.add_argument("--work", type=Path, default=Path("/tmp/peer"), help="llama.cpp sdist, build, GGUFs and packs")
    p.add_argument("--formats", default="q8_0,q4_0,tq1_0,tq2_0", help=f"comma list of {', '.join(FORMATS)}")
    p.add_argument("--threads", "-t", type=int, default=None, help="threads for both engines (default: physical cores)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (llama.cpp, ours; then ours, llama.cpp)")
    p.add_argument("-p", type=int, default=512, help="prompt tokens (pp)")
    p.add_argument("-n", type=int, default=128, help="generated tokens (tg)")
    p.add_argument("-r", type=int, default=5, help="repetitions inside each engine's own bench")
    p.add_argument("--limit", default=None, help="bigger-than-RAM mode: memory cgroup limit, e.g. 1GiB (root)")
    p.add_argument("--ram", default=None, help="moe-local --ram in --limit mode (default: a quarter of the limit)")
    p.add_argument("--bandwidth", type=float, default=None, help="read bandwidth GB/s (default: measured once)")
    p.add_argument("--nice", type=int, default=0, help="nice level of the measured runs")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one engine run may take")
    p.add_argument("--llama-args", default="", help="extra llama-bench flags for every llama.cpp run, e.g. '--repack 0'")
    p.add_argument("--ours-args", default="", help="extra moe-local bench flags, e.g. '--dtype bfloat16'")
    p.add_argument("--json", type=Path, default=None, help="write every figure to this file")
    p.add_argument("--build-only", action="store_true", help="only build the benchmark model")
    a = p.parse_args(argv)
    if a.build_only:
        build_bench_model()
        return 0
    names = [f.strip().lower() for f in a.formats.split(",") if f.strip()]
    bad = [f for f in names if f not in FORMATS]
    if bad or a.rounds < 1:
        p.error(f"unknown format {bad[0]}" if bad else "--rounds must be >= 1")

    repo = str(Path(__file__).resolve().parents[1])  # this checkout's moe_local, here and in every child
    sys.path.insert(0, repo)
    os.environ["PYTHONPATH"] = os.pathsep.join([repo, *filter(None, [os.environ.get("PYTHONPATH")])])
    from moe_local.runtime.bench import default_threads, measure_read_bandwidth
    from moe_local.units import parse_size

    threads = a.threads or default_threads()
    model = (a.model or build_bench_model()).resolve()
    llama = Llama(a.work).ensure()
    bf16 = llama.convert(model, a.work / "gguf")
    bandwidth = a.bandwidth or measure_read_bandwidth(threads)
    log(f"read bandwidth {bandwidth:.1f} GB/s on {threads} threads")
    limit = Limit(parse_size(a.limit, "--limit")) if a.limit else None
    ours_extra = a.ours_args.split()
    if limit is not None:
        ram = a.ram or f"{limit.limit // 4 // 2**20}MiB"
        ours_extra += ["--experts", "tiered", "--ram", ram]
    # in the limited mode every engine configuration runs at 1 thread and at T threads
    thread_list = sorted({1, threads}) if limit is not None else [threads]

    configs = []  # (format, engine, config label, threads, callable)
    for name in names:
        fmt = FORMATS[name]
        gguf = llama.quantized(bf16, fmt)
        pack = our_pack(model, fmt, a.work / "packs")
        theirs_bpt = gguf_bytes_per_token(gguf, llama.src)
        for t in thread_list:
            base = a.llama_args.split()
            llama_variants = [(" ".join(base) or "default", base)]
            if limit:
                llama_variants.append(("--repack 0 (mmap)", [*base, "--repack", "0"]))
            for label, extra in llama_variants:
                configs.append((name, "llama.cpp", f"{fmt.gguf_type}, {label}, t={t}", t, theirs_bpt["total"],
                                lambda t=t, extra=extra, gguf=gguf: run_llama(llama, gguf, a, t, limit, extra)))
            label = f"{fmt.note}{', ' + ' '.join(ours_extra) if ours_extra else ''}, t={t}"
            configs.append((name, "moe-local", label, t, None,
                            lambda t=t, pack=pack: run_ours(pack, a, t, bandwidth, limit, ours_extra)))

    try:
        return measure(a, names, configs, thread_list, model, bandwidth, threads, ours_extra)
    finally:
        if limit is not None:
            limit.remove()


def measure(a, names, configs, thread_list, model, bandwidth, threads, ours_extra) -> int:
    results: dict[tuple, list[dict]] = {c[:3]: [] for c in configs}
    info = {"hardware": hardware(bandwidth, threads), "model": str(model), "limit": a.limit,
            "args": {"p": a.p, "n": a.n, "r": a.r, "rounds": a.rounds, "formats": names, "ours_args": ours_extra}}
    for rnd in range(a.rounds):
        # alternate: each round flips which engine of a format goes first, so drift hits both alike
        for name in names:
            group = [c for c in configs if c[0] == name]
            if rnd % 2:
                group = group[::-1]
            for c in group:
                r = c[5]()
                r["round"] = rnd
                results[c[:3]].append(r)
                shown = r.get("error") or f"pp {r.get('pp', 0):.2f} tg {r.get('tg', 0):.2f} tok/s"
                log(f"round {rnd + 1}/{a.rounds} {c[2]} [{c[1]}]: {shown}")
        if a.json:
            write_json(a.json, {**info, "partial": True, "runs": {" | ".join(k): v for k, v in results.items()}})

    rows = []
    for name in names:
        for t in thread_list:
            llama_cfgs = [c for c in configs if c[0] == name and c[1] == "llama.cpp" and c[3] == t]
            ours_cfg = next(c for c in configs if c[0] == name and c[1] == "moe-local" and c[3] == t)
            ours_runs = results[ours_cfg[:3]]
            ours_bpt = next((r["bytes_per_token"] for r in ours_runs if "bytes_per_token" in r), None)
            ours = {"config": ours_cfg[2], "pp": summarize(ours_runs, "pp"), "tg": summarize(ours_runs, "tg"),
                    "bytes_per_token": ours_bpt, "errors": [r["error"] for r in ours_runs if "error" in r]}
            for lc in llama_cfgs:
                lr = results[lc[:3]]
                theirs = {"config": lc[2], "pp": summarize(lr, "pp"), "tg": summarize(lr, "tg"),
                          "bytes_per_token": lc[4], "errors": [r["error"] for r in lr if "error" in r]}
                rows.append({"format": name, "threads": t, "llama.cpp": theirs, "moe-local": ours})
    text = table(rows, bandwidth)
    print(text)
    print(f"\nhardware: {info['hardware']['cpu']}, {info['hardware']['logical_cpus']} CPUs, {threads} threads, "
          f"read bandwidth {bandwidth:.1f} GB/s; load average at start {info['hardware']['loadavg_start']}, "
          f"at end {os.getloadavg()}")
    if a.json:
        write_json(a.json, {**info, "partial": False, "loadavg_end": os.getloadavg(), "rows": rows,
                            "runs": {" | ".join(k): v for k, v in results.items()}, "table": text})
    return 0


if __name__ == "__main__":
    sys.exit(main())
