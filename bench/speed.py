"""`dynkv bench speed`: prefill, time to first token, decode and memory of each method against full KV.

    dynkv bench speed --preset mid --lengths 8k --budget 1.7% --json speed.json
    python -m dynkv_bench.speed --preset 8b --lengths 128k,1M --device cuda     # same command

For every document length the harness runs the **full-KV reference** (plain transformers: SDPA
attention, a ``DynamicCache``, one prefill forward of the document, the question, a greedy decode loop;
no dynkv code on that path) and then each method through :class:`~dynkv_cli.engine.Engine` (chunked
prefill into the compressed cache, the question, greedy decode). Both see the same random-weight model
(:mod:`.presets`), the same document ids and the same question ids.

Every (length, method) runs in a fresh Python process by default, so peaks do not mix and the
allocator starts clean: on CUDA the peak is ``torch.cuda.max_memory_allocated`` (reset after the
weights are built and a short warm-up run), on the CPU the process's peak RSS (``VmHWM``, reset through
``/proc/self/clear_refs``). Both are reported as growth over the memory held before the run (weights,
runtime) and as the absolute peak.

Numbers per row: prefill seconds and tokens/s (document tokens only), time to first token (document +
question + first greedy token), decode tokens/s (``decode_tokens - 1`` one-token forwards), peak memory,
cache bytes right after the document (compressed cache: keys, values, positions and scores; reference:
the ``DynamicCache`` keys and values), the engine's scoring time and its share of prefill, and an
estimate of the prefill's matrix-product FLOPs with the time they need at the measured matmul rate.
Ratios are against the full-KV row of the same length, from the same run. With ``--repeats N`` every
(length, method) runs N times, round robin, and the medians are reported (per-run numbers in the JSON):
use it on a shared machine. ``--sync-score`` makes the engine's scoring time exact on CUDA: the engine
(``Engine(sync_timing=True)``) synchronises the device before and after each layer's scoring step, at the
cost of one device stall per layer (without it, on CUDA the host runs ahead of the device and the step's
time includes the layer's queued work, so ``score_seconds`` is an upper bound).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import typer

REFERENCE = "full-kv"
DEFAULT_METHODS = ("dynamickv", "snapkv", "streamingllm")
#: The question after the document (the engine's probe renders the same text).
QUESTION = "what does the document above say about the key figures and dates answer briefly"
WARMUP_TOKENS = 512
CHUNK_MEMORY_POINTS = 64


def _sample(values: list, k: int) -> list:
    """At most ``k`` evenly spaced entries of ``values``, always with the first and the last."""
    if len(values) <= k:
        return list(values)
    return [values[round(i * (len(values) - 1) / (k - 1))] for i in range(k)]


__all__ = [
    "REFERENCE",
    "RunSpec",
    "SpeedReport",
    "SpeedRow",
    "add_ratios",
    "main",
    "parse_lengths",
    "run_speed",
]


# ---- data --------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """Everything one measurement needs (sent to the child process as JSON)."""

    preset: str
    method: str
    length: int
    device: str = "cpu"
    dtype: str = "float32"
    budget: str = "1.7%"
    chunk_size: int | None = None
    ref_chunk: int = 0
    decode_tokens: int = 32
    seed: int = 0
    vocab_size: int | None = None
    warmup: bool = True
    threads: int | None = None
    sync_score: bool = False


@dataclass
class SpeedRow:
    method: str
    doc_tokens: int
    status: str = "ok"  # ok | skipped | failed
    note: str = ""
    budget: str | None = None
    budget_tokens: int | None = None
    chunk_size: int | None = None
    chunks: int = 1
    question_tokens: int = 0
    prefill_seconds: float = 0.0
    prefill_tokens_per_s: float = 0.0
    ttft_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    decode_tokens_per_s: float = 0.0
    peak_memory_bytes: int = 0  # growth over memory held before the run
    peak_total_bytes: int = 0  # absolute peak (CUDA max allocated / process peak RSS)
    baseline_bytes: int = 0  # memory held before the run (weights, runtime)
    peak_memory_kind: str = ""
    cache_bytes: int = 0
    full_kv_bytes: int = 0
    kept_per_layer: list[int] = field(default_factory=list)
    score_seconds: float | None = None
    score_share: float | None = None
    matmul_flops: float = 0.0  # estimate, prefill only: linear layers + attention products
    matmul_bound_seconds: float | None = None  # matmul_flops at the measured matmul rate
    matmul_bound_ratio: float | None = None  # prefill_seconds / matmul_bound_seconds (1M target: <= 2)
    tokens: list[int] = field(default_factory=list)  # greedy output ids
    wall_seconds: float = 0.0  # whole measured run (prefill + question + decode)
    score_timing: str = ""  # "engine timer" or "synchronized" (see --sync-score)
    # engine rows: memory held after each chunk minus memory before the run (CUDA allocated / RSS),
    # at most CHUNK_MEMORY_POINTS evenly spaced chunks; flat across chunks = the cache is bounded
    chunk_memory_bytes: list[int] = field(default_factory=list)
    repeats: int = 1  # timings and peaks above are medians over this many runs, each in its own process
    samples: list[dict] = field(default_factory=list)  # per-run prefill/ttft/decode seconds and peak bytes
    # ratios against the full-KV row of the same length (None for the reference itself or when unknown)
    prefill_speedup: float | None = None
    ttft_speedup: float | None = None
    decode_speedup: float | None = None
    memory_ratio: float | None = None
    cache_ratio: float | None = None

    @classmethod
    def from_dict(cls, d: dict) -> SpeedRow:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class SpeedReport:
    machine: dict
    settings: dict
    model: dict
    rows: list[SpeedRow]

    def to_dict(self) -> dict:
        return {
            "machine": self.machine,
            "settings": self.settings,
            "model": self.model,
            "rows": [asdict(r) for r in self.rows],
        }

    @classmethod
    def from_dict(cls, d: dict) -> SpeedReport:
        return cls(d["machine"], d["settings"], d["model"], [SpeedRow.from_dict(r) for r in d["rows"]])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> SpeedReport:
        return cls.from_dict(json.loads(Path(path).read_text()))


# ---- words -------------------------------------------------------------------------------------------
def parse_lengths(text: str) -> list[int]:
    """``"8k,32k,1M"`` -> ``[8192, 32768, 1048576]`` (k = 1024, M = 1024*1024; plain numbers as they are)."""
    out = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        mult = 1
        low = part.lower()
        if low.endswith("k"):
            mult, low = 1024, low[:-1]
        elif low.endswith("m"):
            mult, low = 1024 * 1024, low[:-1]
        try:
            n = int(float(low) * mult)
        except ValueError:
            raise ValueError(f"length {part!r} is not a number of tokens like 8k, 32768 or 1M") from None
        if n < 1:
            raise ValueError(f"length {part!r} must be at least 1 token")
        out.append(n)
    if not out:
        raise ValueError("give at least one length, e.g. --lengths 8k")
    return out


def _dtype_name(dtype: str | None, device: str) -> str:
    from dynkv_cli.model import DTYPES, pick_device, pick_dtype

    dt = pick_dtype(dtype, pick_device(device))
    return next(k for k, v in DTYPES.items() if v == dt and k in ("float32", "bfloat16", "float16"))


# ---- memory and timing ---------------------------------------------------------------------------------
def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    """Reset the process's peak RSS (VmHWM) to the current RSS; False when the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _proc_status_kib("VmHWM"), _proc_status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024


class _Memory:
    """Peak memory of one measured run on ``device`` (CUDA max allocated, or peak RSS on the CPU)."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.kind = "cuda_max_allocated"
        else:
            reset = _reset_rss_peak()
            self.base = (_proc_status_kib("VmRSS") or 0) * 1024
            self.kind = "process_peak_rss" if reset else "process_peak_rss_since_start"

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return (_proc_status_kib("VmRSS") or 0) * 1024

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        # The kernel's RSS counters are cached per thread and synced lazily, so VmHWM read after the run can
        # come out a few KiB below the VmRSS read at start(); the peak since start() is at least that baseline.
        return max((_proc_status_kib("VmHWM") or 0) * 1024, self.base)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 3) -> float:
    """Measured FLOP/s of a square matrix product on ``device`` in ``dtype`` (best of ``repeats``)."""
    n = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.matmul(a, b)
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


#: Environment variables that change speed or memory (allocator, threads, kernels), recorded with the numbers.
_ENV_PREFIXES = ("MALLOC_", "OMP_", "MKL_", "KMP_", "PYTORCH_", "CUDA_VISIBLE_DEVICES", "TRITON_", "DYNKV_")


def machine_info(device: str, dtype: str) -> dict:
    import transformers

    dev = torch.device(device)
    cpu_model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "memory_total_bytes": _meminfo("MemTotal"),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model,
        "dtype": dtype,
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "env": {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)},
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(device_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    try:
        root = Path(__file__).resolve().parents[1]
        info["git_commit"] = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# ---- one measurement -----------------------------------------------------------------------------------
def document_ids(vocab_size: int, length: int, seed: int) -> list[int]:
    """The benchmark document: ``length`` uniformly random token ids (seeded; the same for every method)."""
    gen = torch.Generator().manual_seed(1_000_003 * seed + length)
    return torch.randint(0, vocab_size, (length,), generator=gen).tolist()


def _cache_nbytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _attention_flops(lm, q: int, k: int, causal: bool) -> float:
    """Products Q.K^T and A.V of one forward of ``q`` queries over ``k`` keys, all layers."""
    s = lm.shape
    per = 4.0 * s.num_heads * s.head_dim * q * k
    if causal:
        per /= 2
    return per * s.num_layers


def run_reference(lm, doc: list[int], question: list[int], spec: RunSpec, mem: _Memory) -> SpeedRow:
    """Plain transformers: SDPA, DynamicCache, one prefill forward (or ``ref_chunk``-sized ones), greedy loop."""
    from transformers import DynamicCache

    model, dev = lm.model, lm.device
    model.set_attn_implementation("sdpa")
    n_dec = spec.decode_tokens
    mem.start()
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        _sync(dev)
        t0 = time.perf_counter()
        step = spec.ref_chunk if spec.ref_chunk and spec.ref_chunk < len(doc) else len(doc)
        ids = torch.tensor([doc], device=dev)
        for s in range(0, len(doc), step):
            model(input_ids=ids[:, s : s + step], past_key_values=cache, use_cache=True, logits_to_keep=1)
        _sync(dev)
        t_prefill = time.perf_counter()
        cache_bytes = _cache_nbytes(cache)
        out = model(
            input_ids=torch.tensor([question], device=dev), past_key_values=cache, use_cache=True, logits_to_keep=1
        )
        nxt = int(torch.argmax(out.logits[0, -1]))
        t_first = time.perf_counter()
        tokens = [nxt]
        while len(tokens) < n_dec:
            out = model(input_ids=torch.tensor([[nxt]], device=dev), past_key_values=cache, use_cache=True)
            nxt = int(torch.argmax(out.logits[0, -1]))
            tokens.append(nxt)
        t_end = time.perf_counter()
    peak = mem.peak()
    del cache, out
    prefill = t_prefill - t0
    decode = t_end - t_first
    n = len(doc)
    return SpeedRow(
        method=REFERENCE,
        doc_tokens=n,
        note="one prefill forward" if step == n else f"prefill in forwards of {step} tokens (DynamicCache)",
        chunk_size=None if step == n else step,
        chunks=-(-n // step),
        question_tokens=len(question),
        prefill_seconds=prefill,
        prefill_tokens_per_s=n / prefill if prefill > 0 else 0.0,
        ttft_seconds=t_first - t0,
        decode_tokens=len(tokens),
        decode_seconds=decode,
        decode_tokens_per_s=(len(tokens) - 1) / decode if decode > 0 else 0.0,
        peak_memory_bytes=max(0, peak - mem.base),
        peak_total_bytes=peak,
        baseline_bytes=mem.base,
        peak_memory_kind=mem.kind,
        cache_bytes=cache_bytes,
        full_kv_bytes=lm.full_kv_bytes(n),
        kept_per_layer=[n] * lm.shape.num_layers,
        matmul_flops=2.0 * _linear_params(lm) * n + _attention_flops(lm, n, n, causal=True),
        tokens=tokens,
        wall_seconds=t_end - t0,
    )


def run_engine(lm, doc: list[int], spec: RunSpec, mem: _Memory) -> SpeedRow:
    """The method through dynkv's engine: chunked prefill with the probe, the question, greedy decode."""
    from dynkv_cli.config import CompressionSettings, GenerationSettings
    from dynkv_cli.engine import Engine
    from dynkv_cli.prompt import TaskPrompt

    model, dev = lm.model, lm.device
    model.set_attn_implementation("dynkv")
    synced = spec.sync_score and spec.method != "full"
    engine = Engine(
        lm,
        CompressionSettings(method=spec.method, budget=spec.budget, chunk_size=spec.chunk_size),
        GenerationSettings(max_new_tokens=spec.decode_tokens, temperature=0.0),
        sync_timing=synced,
    )
    prompt = TaskPrompt(use_chat_template=False, before_document="", after_document="\n\n{question}")
    mem.start()
    _sync(dev)
    t0 = time.perf_counter()
    held: list[int] = []

    def on_progress(p) -> None:
        if p.phase == "prefill":
            held.append(mem.current() - mem.base)

    cdoc = engine.compress(doc, prompt, question=QUESTION, on_progress=on_progress)
    _sync(dev)
    prefill = time.perf_counter() - t0
    st = cdoc.stats
    score_s = st.score_seconds
    answer = engine.ask(cdoc, QUESTION)
    _sync(dev)
    wall = time.perf_counter() - t0
    peak = mem.peak()
    n = st.doc_tokens
    probe = len(lm.tokenizer.encode(QUESTION)) if spec.method != "full" and st.observation == "probe" else 0
    c = engine.chunk_size
    kept = sum(st.kept_per_layer) / max(1, len(st.kept_per_layer))
    attn = 0.0
    for s in range(0, n, c):
        q = min(c, n - s) + probe
        attn += _attention_flops(lm, q, min(s, kept) + q, causal=False)
    flops = 2.0 * _linear_params(lm) * (n + st.chunks * probe) + attn
    n_tok = len(answer.token_ids)
    del cdoc
    return SpeedRow(
        method=spec.method,
        doc_tokens=n,
        budget=spec.budget,
        budget_tokens=st.budget_tokens,
        chunk_size=st.chunk_size,
        chunks=st.chunks,
        question_tokens=answer.prompt_tokens,
        prefill_seconds=prefill,
        prefill_tokens_per_s=n / prefill if prefill > 0 else 0.0,
        ttft_seconds=prefill + answer.first_token_seconds,
        decode_tokens=n_tok,
        decode_seconds=answer.decode_seconds,
        decode_tokens_per_s=answer.decode_tokens_per_s,
        peak_memory_bytes=max(0, peak - mem.base),
        peak_total_bytes=peak,
        baseline_bytes=mem.base,
        peak_memory_kind=mem.kind,
        cache_bytes=st.bytes_used,
        full_kv_bytes=st.full_kv_bytes,
        kept_per_layer=list(st.kept_per_layer),
        score_seconds=score_s,
        score_share=score_s / prefill if prefill > 0 else None,
        score_timing="synchronized" if synced else "engine timer",
        chunk_memory_bytes=_sample(held, CHUNK_MEMORY_POINTS),
        matmul_flops=flops,
        tokens=list(answer.token_ids),
        wall_seconds=wall,
    )


_LINEAR_CACHE: dict[int, int] = {}


def _linear_params(lm) -> int:
    key = id(lm.model)
    if key not in _LINEAR_CACHE:
        from .presets import linear_params

        _LINEAR_CACHE[key] = linear_params(lm)[0]
    return _LINEAR_CACHE[key]


def _ref_would_not_fit(lm, n: int, spec: RunSpec) -> str | None:
    """On the CPU, refuse a full-KV run whose cache alone would not fit in available memory (no OOM killer)."""
    if lm.device.type == "cuda":
        return None
    avail = _meminfo("MemAvailable")
    need = lm.full_kv_bytes(n)
    if avail is not None and need > 0.8 * avail:
        return f"full KV needs {need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
    return None


def measure(lm, spec: RunSpec) -> SpeedRow:
    """One row: warm up (short run of the same path), then measure ``spec`` on the model ``lm``."""
    from dynkv_cli.errors import OutOfMemoryError

    vocab = lm.shape.vocab_size
    doc = document_ids(vocab, spec.length, spec.seed)
    question = lm.tokenizer.encode(QUESTION)
    is_ref = spec.method == REFERENCE
    if is_ref and (why := _ref_would_not_fit(lm, spec.length, spec)):
        return SpeedRow(method=spec.method, doc_tokens=spec.length, status="skipped", note=why)
    mem = _Memory(lm.device)
    try:
        if spec.warmup:
            from dataclasses import replace

            w = replace(spec, decode_tokens=min(2, spec.decode_tokens))
            wdoc = document_ids(vocab, min(WARMUP_TOKENS, spec.length), spec.seed + 1)
            run_reference(lm, wdoc, question, w, mem) if is_ref else run_engine(lm, wdoc, w, mem)
        gc.collect()  # once, before the measured run: the warm-up's garbage must not count
        row = run_reference(lm, doc, question, spec, mem) if is_ref else run_engine(lm, doc, spec, mem)
    except (torch.OutOfMemoryError, OutOfMemoryError) as e:
        gc.collect()
        if lm.device.type == "cuda":
            torch.cuda.empty_cache()
        msg = str(e).splitlines()[0][:160] if str(e) else "out of memory"
        return SpeedRow(method=spec.method, doc_tokens=spec.length, status="skipped", note=f"out of memory: {msg}")
    return row


def _build(spec: RunSpec, attn: str):
    from dynkv_cli.model import DTYPES

    from .presets import build_model

    if spec.threads:
        torch.set_num_threads(spec.threads)
    return build_model(
        spec.preset,
        device=spec.device,
        dtype=DTYPES[spec.dtype],
        attn_implementation=attn,
        seed=spec.seed,
        vocab_size=spec.vocab_size,
    )


def _child(spec_path: str, out_path: str) -> int:
    """Entry point of one isolated measurement: build the model, measure, write the row as JSON."""
    spec = RunSpec(**json.loads(Path(spec_path).read_text()))
    lm, info = _build(spec, "sdpa" if spec.method == REFERENCE else "dynkv")
    row = measure(lm, spec)
    Path(out_path).write_text(json.dumps({"row": asdict(row), "model": asdict(info)}))
    return 0


def _run_isolated(spec: RunSpec) -> tuple[SpeedRow, dict | None]:
    with tempfile.TemporaryDirectory(prefix="dynkv-speed-") as tmp:
        sp, op = Path(tmp) / "spec.json", Path(tmp) / "row.json"
        sp.write_text(json.dumps(asdict(spec)))
        proc = subprocess.run(
            [sys.executable, "-m", "dynkv_bench.speed", "--child", str(sp), str(op)],
            capture_output=True,
            text=True,
        )
        if proc.returncode == 0 and op.is_file():
            data = json.loads(op.read_text())
            return SpeedRow.from_dict(data["row"]), data["model"]
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [""]
        why = "killed (likely out of memory)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
        return SpeedRow(
            method=spec.method, doc_tokens=spec.length, status="failed", note=f"{why}: {tail[0][:200]}"
        ), None


# ---- the whole benchmark -------------------------------------------------------------------------------
def add_ratios(rows: list[SpeedRow]) -> list[SpeedRow]:
    """Fill the ratio fields of every row against the ok full-KV row of the same document length."""
    refs = {r.doc_tokens: r for r in rows if r.method == REFERENCE and r.status == "ok"}

    def div(a, b):
        return a / b if a and b else None

    for r in rows:
        ref = refs.get(r.doc_tokens)
        if r.method == REFERENCE or ref is None or r.status != "ok":
            continue
        r.prefill_speedup = div(r.prefill_tokens_per_s, ref.prefill_tokens_per_s)
        r.ttft_speedup = div(ref.ttft_seconds, r.ttft_seconds)
        r.decode_speedup = div(r.decode_tokens_per_s, ref.decode_tokens_per_s)
        r.memory_ratio = div(r.peak_memory_bytes, ref.peak_memory_bytes)
        r.cache_ratio = div(r.cache_bytes, ref.cache_bytes)
    return rows


def run_speed(
    preset: str = "mid",
    *,
    methods: list[str] | tuple[str, ...] = DEFAULT_METHODS,
    lengths: list[int] | tuple[int, ...] = (8192,),
    budget: str = "1.7%",
    decode_tokens: int = 32,
    device: str | None = None,
    dtype: str | None = None,
    chunk_size: int | None = None,
    ref_chunk: int = 0,
    seed: int = 0,
    vocab_size: int | None = None,
    isolate: bool = True,
    warmup: bool = True,
    threads: int | None = None,
    measure_matmul: bool = True,
    repeats: int = 1,
    sync_score: bool = False,
    on_row: Callable[[SpeedRow], None] | None = None,
) -> SpeedReport:
    """Measure the full-KV reference and every method at every length; ratios against the reference.

    ``isolate``: each (length, method) in a fresh process (clean peaks; the default for the CLI). Without
    it, one model is built here and reused (fast; peaks after the first run may be lower, since the
    allocator keeps freed memory).
    """
    from dynkv_cli.budget import parse_budget
    from dynkv_cli.config import CompressionSettings
    from dynkv_cli.model import pick_device

    dev = pick_device(device)
    dtype_name = _dtype_name(dtype, str(dev))
    if decode_tokens < 1:
        raise ValueError("decode_tokens must be at least 1")
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    parse_budget(budget)
    methods = [m for m in methods if m != REFERENCE]
    for m in methods:
        CompressionSettings(method=m, budget=budget, chunk_size=chunk_size).validate()
    base = RunSpec(
        preset=preset,
        method="",
        length=0,
        device=str(dev),
        dtype=dtype_name,
        budget=budget,
        chunk_size=chunk_size,
        ref_chunk=ref_chunk,
        decode_tokens=decode_tokens,
        seed=seed,
        vocab_size=vocab_size,
        warmup=warmup,
        threads=threads,
        sync_score=sync_score,
    )
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_all(base, methods, list(lengths), isolate, measure_matmul, on_row, repeats)
    finally:
        torch.set_num_threads(prev_threads)


def median_row(runs: list[SpeedRow]) -> SpeedRow:
    """One row from repeated runs: median times and peaks, rates recomputed; per-run numbers in ``samples``."""
    import statistics
    from dataclasses import replace

    ok = [r for r in runs if r.status == "ok"]
    if not ok:
        return runs[0]
    keys = ("prefill_seconds", "ttft_seconds", "decode_seconds", "peak_memory_bytes")

    def med(name):
        vals = [getattr(r, name) for r in ok]
        return None if any(v is None for v in vals) else statistics.median(vals)

    out = replace(ok[0])
    for name in (*keys, "wall_seconds", "score_seconds", "peak_total_bytes", "baseline_bytes"):
        setattr(out, name, med(name))
    out.peak_memory_bytes = int(out.peak_memory_bytes)
    out.peak_total_bytes, out.baseline_bytes = int(out.peak_total_bytes), int(out.baseline_bytes)
    out.prefill_tokens_per_s = out.doc_tokens / out.prefill_seconds if out.prefill_seconds > 0 else 0.0
    n_dec = max(0, out.decode_tokens - 1)
    out.decode_tokens_per_s = n_dec / out.decode_seconds if out.decode_seconds > 0 else 0.0
    if out.score_seconds is not None:
        out.score_share = out.score_seconds / out.prefill_seconds if out.prefill_seconds > 0 else None
    out.repeats = len(ok)
    out.samples = [{k: getattr(r, k) for k in (*keys, "score_seconds")} for r in ok]
    if len(ok) < len(runs):
        bad = [r.note for r in runs if r.status != "ok"]
        out.note = (out.note + "; " if out.note else "") + f"{len(bad)} of {len(runs)} runs failed: {bad[0]}"
    if any(r.tokens != ok[0].tokens for r in ok):
        out.note = (out.note + "; " if out.note else "") + "greedy tokens differ between repeats"
    return out


def _run_all(base: RunSpec, methods, lengths, isolate, measure_matmul, on_row, repeats: int = 1) -> SpeedReport:
    from dataclasses import replace

    from dynkv_cli.model import DTYPES

    dev = torch.device(base.device)
    machine = machine_info(base.device, base.dtype)
    rate = matmul_rate(dev, DTYPES[base.dtype]) if measure_matmul else None
    machine["matmul_flops_per_s"] = rate
    rows: list[SpeedRow] = []
    model_info: dict = {}
    lm = None
    if not isolate:
        lm, info = _build(replace(base, method=REFERENCE, length=1), "dynkv")
        model_info = asdict(info)
    for n in lengths:
        specs = [replace(base, method=m, length=n) for m in [REFERENCE, *methods]]
        samples: list[list[SpeedRow]] = [[] for _ in specs]
        for _ in range(repeats):  # round robin: a change in machine load touches every method alike
            for i, spec in enumerate(specs):
                if isolate:
                    row, info_d = _run_isolated(spec)
                    model_info = model_info or (info_d or {})
                else:
                    row = measure(lm, spec)
                samples[i].append(row)
                if on_row:
                    on_row(row)
        for runs in samples:
            row = median_row(runs)
            if rate and row.status == "ok":
                row.matmul_bound_seconds = row.matmul_flops / rate
                row.matmul_bound_ratio = row.prefill_seconds / row.matmul_bound_seconds
            rows.append(row)
    machine["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    settings = {
        "preset": base.preset,
        "methods": [REFERENCE, *methods],
        "lengths": lengths,
        "budget": base.budget,
        "decode_tokens": base.decode_tokens,
        "chunk_size": base.chunk_size,
        "engine_chunk_size": base.chunk_size or (4096 if dev.type == "cuda" else 1024),
        "ref_chunk": base.ref_chunk,
        "seed": base.seed,
        "vocab_size": base.vocab_size,
        "threads": base.threads,
        "repeats": repeats,
        "sync_score": base.sync_score,
        "isolated_processes": isolate,
        "warmup": base.warmup,
        "question": QUESTION,
    }
    return SpeedReport(machine, settings, model_info, add_ratios(rows))


# ---- rendering -------------------------------------------------------------------------------------------
def _mib(b: int | None) -> str:
    return "-" if not b else f"{b / 2**20:,.1f}"


def _x(v: float | None) -> str:
    return "" if v is None else f" ({v:.2f}x)"


def render_table(report: SpeedReport):
    from rich.table import Table

    m = report.model or {}
    title = (
        f"dynkv bench speed: {report.settings['preset']} ({(m.get('params') or 0) / 1e6:,.1f}M params), "
        f"{report.machine['device_name']}, {report.machine['dtype']}, budget {report.settings['budget']}, "
        f"{report.settings['decode_tokens']} decode tokens"
    )
    t = Table(
        title=title,
        caption="(x): the value divided by full-kv's at the same length; peak mem = peak growth over the weights",
    )
    for col in (
        "tokens",
        "method",
        "prefill tok/s",
        "TTFT s",
        "decode tok/s",
        "peak mem MiB",
        "cache MiB",
        "score %",
        "status",
    ):
        t.add_column(col, justify="left" if col in ("method", "status") else "right")
    for r in report.rows:
        if r.status != "ok":
            t.add_row(f"{r.doc_tokens:,}", r.method, "-", "-", "-", "-", "-", "-", f"{r.status}: {r.note}")
            continue
        speed_x = None if r.ttft_speedup is None else 1 / r.ttft_speedup
        t.add_row(
            f"{r.doc_tokens:,}",
            r.method,
            f"{r.prefill_tokens_per_s:,.0f}{_x(r.prefill_speedup)}",
            f"{r.ttft_seconds:.2f}{_x(speed_x)}",
            f"{r.decode_tokens_per_s:.1f}{_x(r.decode_speedup)}",
            f"{_mib(r.peak_memory_bytes)}{_x(r.memory_ratio)}",
            f"{_mib(r.cache_bytes)}{_x(r.cache_ratio)}",
            "-" if r.score_share is None else f"{100 * r.score_share:.1f}",
            "ok" if r.method != REFERENCE else f"ok, {r.note}",
        )
    return t


def speed_command(
    preset: str = typer.Option("mid", "--preset", "-p", help="tiny, mid, 1b, 8b, or a config.json / model folder"),
    methods: str = typer.Option(",".join(DEFAULT_METHODS), "--methods", help="engine methods, comma-separated"),
    lengths: str = typer.Option("8k", "--lengths", help="document lengths: 8k,32k,128k,1M (k=1024)"),
    budget: str = typer.Option("1.7%", "--budget", help="budget word: 1.7%, 128 (tokens), 512MiB"),
    decode_tokens: int = typer.Option(32, "--decode-tokens", help="greedy tokens decoded after the question"),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto"),
    dtype: str = typer.Option("auto", "--dtype", help="float32, bfloat16, float16 or auto (cpu fp32, cuda bf16)"),
    chunk_size: int = typer.Option(0, "--chunk-size", help="engine chunk (0: 1024 on CPU, 4096 on CUDA)"),
    ref_chunk: int = typer.Option(0, "--ref-chunk", help="full-KV prefill in forwards of this many tokens (0: one)"),
    seed: int = typer.Option(0, "--seed"),
    vocab_size: int = typer.Option(0, "--vocab-size", help="override the preset's vocabulary size (0: keep)"),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads (0: torch's default)"),
    repeats: int = typer.Option(1, "--repeats", help="runs per method and length (round robin); medians reported"),
    sync_score: bool = typer.Option(
        False, "--sync-score", help="synchronise around each scoring step so score time is exact on CUDA"
    ),
    in_process: bool = typer.Option(False, "--in-process", help="one process for all runs (faster, peaks mix)"),
    json_out: Path = typer.Option(None, "--json", help="write every number and machine info to this file"),
) -> None:
    """Prefill, time to first token, decode and peak memory of each method against a full-KV SDPA run."""
    from rich.console import Console

    err = Console(stderr=True)
    try:
        lens = parse_lengths(lengths)
    except ValueError as e:
        err.print(f"[red]error:[/] {e}")
        raise SystemExit(2) from None
    meths = [m.strip() for m in methods.split(",") if m.strip()]

    def progress(row: SpeedRow) -> None:
        if row.status == "ok":
            err.print(
                f"[dim]{row.doc_tokens:>8,} {row.method:<13} prefill {row.prefill_seconds:8.2f}s "
                f"decode {row.decode_tokens_per_s:7.2f} tok/s peak +{_mib(row.peak_memory_bytes)} MiB[/]"
            )
        else:
            err.print(f"[yellow]{row.doc_tokens:>8,} {row.method:<13} {row.status}: {row.note}[/]")

    from dynkv_cli.errors import UsageError

    try:
        report = run_speed(
            preset,
            methods=meths,
            lengths=lens,
            budget=budget,
            decode_tokens=decode_tokens,
            device=device,
            dtype=None if dtype == "auto" else dtype,
            chunk_size=chunk_size or None,
            ref_chunk=ref_chunk,
            seed=seed,
            vocab_size=vocab_size or None,
            isolate=not in_process,
            threads=threads or None,
            repeats=repeats,
            sync_score=sync_score,
            on_row=progress,
        )
    except (UsageError, ValueError) as e:
        err.print(f"[red]error:[/] {e}")
        raise SystemExit(2) from None
    out = Console()
    if not out.is_terminal:
        out = Console(width=170)  # a file or a pipe: one line per row
    out.print(render_table(report))
    if json_out:
        report.save(json_out)
        err.print(f"wrote {json_out}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return _child(argv[1], argv[2])
    import typer

    app = typer.Typer(add_completion=False)
    app.command()(speed_command)
    app(argv, prog_name="python -m dynkv_bench.speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
