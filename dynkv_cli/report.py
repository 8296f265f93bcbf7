"""`dynkv profile`: what a document costs in cache memory and time, for one or several methods.

    report = profile_document(lm, load_profile("qa"), open_document("report.pdf"), ["dynamickv", "snapkv"])
    print(report.render())          # the terminal report (plain text, bar chart of kept tokens per layer)
    json.dumps(report.to_dict())    # the same numbers for scripts

Every method compresses the same document with the same profile (prompt, budget, retention preset,
chunk size) and then answers the profile's question with a short greedy decode, to time decoding.
Bytes are the cache's own count (:meth:`CompressedCache.bytes_used`), against what a plain KV cache of
the whole document would take.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from .config import GenerationSettings
from .documents import Document
from .engine import DEFAULT_PROBE, CompressStats
from .errors import UsageError
from .methods import parse_method
from .model import LoadedModel
from .profiles import Profile
from .tasks import Hooks, TaskRunner

BLOCKS = " ▏▎▍▌▋▊▉█"


#: what a method's row reports of its compression (the JSON keys, in order)
_STATS_SHOWN = (
    "budget", "budget_tokens", "doc_tokens", "prefix_tokens", "chunk_size", "chunks", "kept_per_layer",
    "bytes_used", "full_kv_bytes", "compression_ratio", "peak_memory_bytes", "peak_memory_kind",
    "prefill_seconds", "prefill_tokens_per_s", "score_seconds",
)  # fmt: skip


@dataclass
class MethodReport:
    """One method's row: its compression stats (read through, never copied) and its answer's timing."""

    method: str
    stats: CompressStats
    first_token_seconds: float
    decode_tokens: int
    decode_seconds: float
    decode_tokens_per_s: float

    def __getattr__(self, name: str):
        if name in _STATS_SHOWN:
            return getattr(self.stats, name)
        raise AttributeError(name)

    def to_dict(self) -> dict:
        d = self.stats.to_dict()
        return {
            "method": self.method,
            **{k: d[k] for k in _STATS_SHOWN},
            "first_token_seconds": self.first_token_seconds,
            "decode_tokens": self.decode_tokens,
            "decode_seconds": self.decode_seconds,
            "decode_tokens_per_s": self.decode_tokens_per_s,
        }


@dataclass
class MemoryReport:
    source: str
    model: str
    model_type: str
    device: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    profile: str
    question: str
    methods: list[MethodReport] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "methods"}
        return {**d, "methods": [m.to_dict() for m in self.methods]}

    def render(self, bar_width: int = 24) -> str:
        return render(self, bar_width)


def profile_document(
    lm: LoadedModel,
    profile: Profile,
    doc: Document,
    methods: Sequence[str],
    *,
    decode_tokens: int = 16,
    hooks: Hooks | None = None,
    warmup: bool = True,
    max_cache: int | str | None = None,
) -> MemoryReport:
    """Compress ``doc`` with each method and time a short answer. Raises UsageError for an unknown method.

    ``max_cache``: the largest cache a budget may make (see :meth:`Engine.memory_limit`).

    ``warmup``: first run one short untimed pass (kernel compilation, allocator, lazy imports), so the
    first method's timings are not charged for them.
    """
    for m in methods:
        parse_method(m)  # an unknown method: one line naming the valid ones
    if not methods:
        raise UsageError("no methods given: e.g. --methods dynamickv,snapkv")
    question = profile.instruction or profile.probe or DEFAULT_PROBE
    shape = lm.shape
    report = MemoryReport(
        source=doc.source,
        model=lm.name,
        model_type=shape.model_type,
        device=str(lm.device),
        dtype=str(lm.dtype).replace("torch.", ""),
        num_layers=shape.num_layers,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        profile=profile.name,
        question=question,
    )
    if warmup:
        _warm_up(lm, profile, doc, methods[0], question)
    for name in methods:
        runner = TaskRunner(lm, profile.with_overrides(method=name), hooks, max_cache=max_cache)
        cdoc = runner.compress(doc, question=question)
        gen = GenerationSettings(max_new_tokens=decode_tokens, temperature=0.0)
        answer = runner.engine.ask(cdoc, question, generation=gen)
        report.methods.append(
            MethodReport(
                method=name,
                stats=cdoc.stats,
                first_token_seconds=answer.first_token_seconds,
                decode_tokens=len(answer.token_ids),
                decode_seconds=answer.decode_seconds,
                decode_tokens_per_s=answer.decode_tokens_per_s,
            )
        )
    return report


def _warm_up(lm: LoadedModel, profile: Profile, doc: Document, method: str, question: str) -> None:
    text = ""
    for seg in doc.segments():
        text += seg.text
        if len(text) >= 2000:
            break
    runner = TaskRunner(lm, profile.with_overrides(method=method, budget="50%", chunk_size=128))
    cdoc = runner.engine.compress(text[:2000], profile.prompt, question=question)
    runner.engine.ask(cdoc, question, generation=GenerationSettings(max_new_tokens=2))


# ---- rendering -------------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def bar(value: float, top: float, width: int) -> str:
    """A horizontal bar of ``width`` cells for ``value`` out of ``top`` (eighths of a cell)."""
    if top <= 0 or value <= 0:
        return " " * width
    eighths = round(min(value / top, 1.0) * width * 8)
    full, part = divmod(eighths, 8)
    text = "█" * full + (BLOCKS[part] if part else "")
    return text.ljust(width)


def table(rows: list[list[str]], right: bool = True) -> list[str]:
    """Plain-text columns: the first left-aligned, the others right-aligned (``right``) or left."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        rest = [c.rjust(w) if right else c.ljust(w) for c, w in zip(r[1:], widths[1:])]
        out.append("  ".join([r[0].ljust(widths[0]), *rest]).rstrip())
    return out


def render(report: MemoryReport, bar_width: int = 24) -> str:
    ms = report.methods
    first = ms[0]
    peak_word = "peak GPU memory" if first.peak_memory_kind.startswith("cuda") else "peak process memory (RSS)"
    lines = [
        f"dynkv profile: {report.source}",
        f"model    {report.model} ({report.model_type}, {report.num_layers} layers, {report.num_kv_heads} KV heads "
        f"x {report.head_dim} dims, {report.dtype}, {report.device})",
        f"document {first.doc_tokens:,} tokens (+{first.prefix_tokens} prompt tokens), "
        f"{first.chunks} chunk(s) of {first.chunk_size}; profile {report.profile}",
        "",
    ]

    def kept(m: MethodReport) -> str:
        k = m.kept_per_layer
        return f"{sum(k) / len(k):,.1f}" if k else "0"

    rows = [
        ["", *[m.method for m in ms]],
        ["budget (tokens/layer)", *[f"{m.budget} ({m.budget_tokens if m.budget_tokens else 'all'})" for m in ms]],
        ["kept tokens/layer (mean)", *[kept(m) for m in ms]],
        ["full KV cache", *[human_bytes(m.full_kv_bytes) for m in ms]],
        ["compressed cache", *[human_bytes(m.bytes_used) for m in ms]],
        ["compression ratio", *[f"{m.compression_ratio:,.1f}x" for m in ms]],
        [peak_word, *[human_bytes(m.peak_memory_bytes) for m in ms]],
        ["prefill", *[f"{m.prefill_tokens_per_s:,.0f} tok/s" for m in ms]],
        ["prefill time", *[f"{m.prefill_seconds:,.2f} s" for m in ms]],
        ["  of which scoring", *[f"{m.score_seconds:,.2f} s" for m in ms]],
        ["first token", *[f"{m.first_token_seconds:,.3f} s" for m in ms]],
        ["decode", *[f"{m.decode_tokens_per_s:,.1f} tok/s ({m.decode_tokens})" for m in ms]],
    ]
    lines += table(rows)
    lines += ["", "kept tokens per layer (per KV head; prompt prefix not counted)"]
    top = max((max(m.kept_per_layer, default=0) for m in ms), default=0)
    num_w = max(len(f"{top:,}"), 1)
    head = "layer  " + "  ".join(m.method.ljust(bar_width + 1 + num_w) for m in ms)
    lines.append(head.rstrip())
    for layer in range(report.num_layers):
        cells = []
        for m in ms:
            v = m.kept_per_layer[layer] if layer < len(m.kept_per_layer) else 0
            cells.append(f"{bar(v, top, bar_width)} {v:>{num_w},}")
        lines.append(f"{layer:>5}  " + "  ".join(cells))
    return "\n".join(lines)


# ---- `dynkv info` --------------------------------------------------------------------------------------


def cache_info(path: str | Path) -> dict:
    """The JSON header of a cache file saved by :meth:`CompressedDocument.save` (tensors are not read)."""
    from .cache import CompressedCache

    meta = CompressedCache.read_header(path)
    meta["file_bytes"] = Path(path).stat().st_size
    return meta


def render_cache_info(path: str | Path, meta: dict) -> str:
    st = meta.get("stats", {})
    kept = st.get("kept_per_layer") or []
    rows = [
        ["file", f"{path} ({human_bytes(meta.get('file_bytes', 0))})"],
        ["format", str(meta.get("format"))],
        ["model", f"{meta.get('model')} (fingerprint {meta.get('model_fingerprint')})"],
        ["source", str(meta.get("source") or "-")],
        ["document", f"{st.get('doc_tokens', 0):,} tokens (+{st.get('prefix_tokens', 0)} prompt tokens), fingerprint {meta.get('document_fingerprint')}"],
        ["method", f"{meta.get('method')}, budget {meta.get('budget')} ({st.get('budget_tokens') or 'all'} tokens/layer)"],
        ["observation", str(st.get("observation", "-"))],
        ["chunks", f"{st.get('chunks', 0)} of {st.get('chunk_size', 0)} tokens"],
        ["kept tokens/layer", f"{sum(kept) / len(kept):,.1f} mean, {min(kept)}..{max(kept)}" if kept else "-"],
        ["cache", f"{human_bytes(st.get('bytes_used', 0))} (full KV cache: {human_bytes(st.get('full_kv_bytes', 0))}, "
         f"{st.get('compression_ratio', 0):,.1f}x smaller)"],
        ["prefill", f"{st.get('prefill_seconds', 0):,.2f} s ({st.get('prefill_tokens_per_s', 0):,.0f} tok/s)"],
    ]  # fmt: skip
    top = max(kept, default=0)
    lines = table(rows, right=False) + ["", "kept tokens per layer (per KV head)"]
    lines += [f"{i:>5}  {bar(v, top, 24)} {v:,}" for i, v in enumerate(kept)]
    return "\n".join(lines)
