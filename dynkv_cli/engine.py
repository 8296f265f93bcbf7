"""The engine: chunked prefill into a compressed cache, then questions answered from it.

    prefix  -> forward, kept whole
    for each chunk X_t of C document tokens:
        forward [X_t ; probe] over the cache; in each layer, right after its attention:
            score candidates (kept + X_t) with the observation queries, keep the top per KV head,
            free the rest, and every m layers re-share the budget between layers (DynamicKV)
        the probe's keys are dropped
    suffix (question, answer prefix) -> forward over the cache -> decode -> the question is removed

How and why: ``docs/engine.md``. Everything the CLI does goes through :class:`Engine`.
"""

from __future__ import annotations

import array
import ctypes
import functools
import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .budget import PERCENT_WARN_TOKENS, Budget, fitting_budget, format_bytes, parse_memory
from .cache import CompressedCache
from .config import CompressionSettings, GenerationSettings, dataclass_from_dict
from .decode import decode, eos_ids, pick
from .errors import CacheFileError, CacheTooLargeError, DynkvError, OutOfMemoryError, UsageError
from .kernels import observation_scores
from .methods import Method, parse_method
from .methods.base import Candidates
from .model import LoadedModel, rotate_keys
from .prompt import TaskPrompt, encode, prompt_ids
from .spans import candidate_spans, span_starts

DEFAULT_PROBE = "Answer questions about the document above."
#: Positions kept free after the document for a question and its prompt (besides max_new_tokens).
QUESTION_ALLOWANCE = 256
#: Without ``max_cache``, a cache may take this share of the memory available when reading starts
#: (CPU: MemAvailable; CUDA: free device memory after the weights are loaded).
CPU_MEMORY_SHARE = 0.5
CUDA_MEMORY_SHARE = 0.8


@dataclass
class Progress:
    """Reported to ``on_progress`` after every chunk (prefill) and every token (decode)."""

    phase: str
    done: int
    total: int | None
    elapsed: float
    kept_per_layer: list[int] | None = None  # prefill: entries per layer per KV head after this chunk
    bytes_used: int = 0  # prefill: cache bytes after this chunk

    @property
    def tokens_per_s(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0


@dataclass
class CompressStats:
    method: str
    budget: str
    budget_tokens: int | None  # B: average document tokens per layer per KV head; None = no compression
    chunk_size: int
    doc_tokens: int
    prefix_tokens: int
    chunks: int
    kept_per_layer: list[int]
    bytes_used: int
    full_kv_bytes: int
    prefill_seconds: float
    score_seconds: float
    peak_memory_bytes: int
    peak_memory_kind: str  # "cuda_max_allocated" or "process_rss"
    compactions: int = 0
    observation: str = "probe"

    @property
    def compression_ratio(self) -> float:
        return self.full_kv_bytes / self.bytes_used if self.bytes_used else 0.0

    @property
    def compact_positions(self) -> bool:
        return self.compactions > 0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.doc_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            compression_ratio=self.compression_ratio,
            compact_positions=self.compact_positions,
            prefill_tokens_per_s=self.prefill_tokens_per_s,
        )
        return d


@dataclass
class CompressedDocument:
    """A document read once into a compressed cache; ask it as many questions as you like."""

    cache: CompressedCache
    prompt: TaskPrompt
    settings: CompressionSettings
    stats: CompressStats
    fingerprint: str
    model_name: str
    model_fingerprint: str
    source: str = ""
    low_level: object | None = None  # a reload.LowLevel when read with a low level (selective reload)

    def header(self) -> dict:
        return {
            "model": self.model_name,
            "model_fingerprint": self.model_fingerprint,
            "method": self.settings.method,
            "budget": str(self.settings.budget),
            "document_fingerprint": self.fingerprint,
            "source": self.source,
            "prompt": asdict(self.prompt),
            "settings": self.settings.to_dict(),
            "stats": self.stats.to_dict(),
        }

    def save(self, path: str | Path) -> Path:
        """Write the cache to ``path`` (safetensors tensors + JSON header); a low level too, when there is one."""
        path = Path(path)
        header = self.header()
        extra = None
        if self.low_level is not None:
            header["low_level"] = self.low_level.header()
            extra = self.low_level.tensors()
        self.cache.save(path, header, extra)
        return path


@dataclass
class Answer:
    question: str
    text: str
    token_ids: list[int]
    stop_reason: str  # "eos" | "stop_string" | "repetition" | "max_new_tokens"
    prompt_tokens: int
    first_token_seconds: float
    decode_seconds: float
    first_logits: torch.Tensor | None = field(default=None, repr=False)
    reload: dict | None = None  # selective reload: the blocks brought back, entries, bytes, seconds

    @property
    def decode_tokens_per_s(self) -> float:
        n = max(0, len(self.token_ids) - 1)
        return n / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "question": self.question,
            "answer": self.text,
            "tokens": len(self.token_ids),
            "stop_reason": self.stop_reason,
            "first_token_seconds": self.first_token_seconds,
            "decode_seconds": self.decode_seconds,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            **({"reload": self.reload} if self.reload is not None else {}),
        }


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim`` or None (other C libraries, other systems)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _release_host_memory() -> None:
    """Give freed heap memory back to the OS after a chunk.

    Kept sets change size every chunk (DynamicKV moves budget between layers), which fragments glibc's
    heap: without this, a 1B-shaped model's process grew by ~770 MiB over 20k tokens on CPU while its
    cache stayed at ~14 MiB; with it, by ~47 MiB, at no measurable cost in time.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _cache_keyword_of(cls: type) -> str:
    """``cache`` where the model's forward takes it (transformers >= 5.24), else ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def _cache_keyword(model) -> str:
    if getattr(type(model), "forward", None) is None:  # not a module (a test's stand-in): the old name
        return "past_key_values"
    return _cache_keyword_of(type(model))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Pass:
    """One forward pass of a chunk (+ probe): scores and cuts each layer right after its attention.

    One path for every method and both cache layouts: a layer hands out its heads in groups (all KV
    heads at once when they keep the same count, one by one when they do not), the method scores each
    group's candidates, :meth:`Method.head_counts` shares the layer's entries between heads, and the
    layer keeps the top of each head. Every ``m`` layers the method may move budget between layers.
    """

    #: observation queries per block when every chunk query observes (H2O): bounds the [rows x keys] tile
    OBS_BLOCK = 256

    def __init__(
        self,
        cache: CompressedCache,
        method: Method,
        n_chunk: int,
        n_probe: int,
        pin_from: int | None,
        n_obs: int,
        sync: bool = False,
        span_starts: torch.Tensor | None = None,
        low=None,
    ):
        """``pin_from``: the position from which chunk entries stay whatever their score (None: none);
        ``n_obs``: the observing queries at the end of the pass (probe or tail window); ``sync``:
        synchronise the device around each scoring step (exact ``score_seconds`` on CUDA)."""
        self.cache, self.method = cache, method
        self.n_chunk, self.n_probe, self.pin_from, self.n_obs = n_chunk, n_probe, pin_from, n_obs
        self.sync = sync
        self.span_starts = span_starts  # [n_chunk] bool: where the chunk's spans begin (None: no spans)
        self.low = low  # a reload.LowLevel: keeps each layer's best chunk entries before the cut (None: off)
        self.score_seconds = 0.0

    def _pinned(self, positions: torch.Tensor) -> torch.Tensor:
        if self.pin_from is None:
            return torch.zeros_like(positions, dtype=torch.bool)
        return positions >= self.pin_from

    def _observe(self, query: torch.Tensor, keys: torch.Tensor, scaling: float, end: int) -> torch.Tensor:
        """Observation attention ``[G, end]`` of ``query`` ``[1, H, q, d]`` over ``keys`` ``[G, n, d]``."""
        if self.method.observation != "all":
            q = query[0, :, query.shape[2] - self.n_obs :]
            att = observation_scores(q, keys, scaling, end)
            k = self.method.probe_window if self.n_probe else 0
            if 0 < k < self.n_obs:  # the probe's last k tokens observe too: per query, the larger share
                tail = observation_scores(q[:, -k:], keys, scaling, end)
                att = torch.maximum(att / self.n_obs, tail / k) * self.n_obs
            return att
        # every chunk query observes, in blocks; chunk query i sits at key index end - n_chunk + i
        total = keys.new_zeros(keys.shape[0], end, dtype=torch.float32)
        for a in range(0, self.n_chunk, self.OBS_BLOCK):
            b = min(a + self.OBS_BLOCK, self.n_chunk)
            kend = end - self.n_chunk + b
            total[:, :kend] += observation_scores(query[0, :, a:b], keys[:, :kend], scaling, kend)
        return total

    def _score(self, l: int, query: torch.Tensor, group, scaling: float) -> torch.Tensor:
        """Scores ``[g, n - P - probe]`` of one head group's candidates (entries after the prefix)."""
        P = self.cache.prefix_len
        end = group.keys.shape[1] - self.n_probe  # candidates: [P, end); the probe's entries follow
        method = self.method
        att = None
        if method.observation != "none":
            att = self._observe(query, group.keys, scaling, end)[:, P:]
        c = Candidates(
            l,
            att,
            group.positions[:, P:end],
            group.scores[:, P:end],
            self.n_chunk,
            group.keys[:, P:end],
            group.values[:, P:end],
            candidate_spans(group.positions[:, P:end], group.scores[:, P:end], self.span_starts),
        )
        return method.score(c)

    def after_attention(self, l: int, query: torch.Tensor, scaling: float) -> None:
        """Score and cut layer ``l`` (its attention for this pass is done), then maybe re-share budgets."""
        layer = self.cache.layers[l]
        if self.method.keeps_all:  # the full reference: nothing to score, only the probe's entries leave
            layer.truncate(layer.length - self.n_probe)
            return
        if self.sync:
            _synchronize(query.device)
        t0 = time.perf_counter()
        g = query.shape[1] // layer.num_kv_heads
        rows = []  # per KV head: (scores, positions) of its candidates
        low = [] if self.low is not None else None
        for group in layer.head_groups():
            scores = self._score(l, query[:, group.start * g : group.stop * g], group, scaling)
            P, n = self.cache.prefix_len, scores.shape[1]
            rows += list(zip(scores.unbind(0), group.positions[:, P : P + n].unbind(0)))
            if low is not None:  # the chunk's entries are the last n_chunk candidates of every head
                a, b = P + n - self.n_chunk, P + n
                low.append((group.keys[:, a:b], group.values[:, a:b], group.positions[:, a:b], scores[:, -self.n_chunk :]))
        if low:
            self.low.capture(l, *(torch.cat(parts) for parts in zip(*low)))
        pinned = min(self.method.pinned_window, self.n_chunk) if self.pin_from is not None else 0
        self._keep(layer, rows, len(rows) * max(int(self.method.capacity(l)), pinned), store=True)
        if self.method.is_update_layer(l):
            self._reallocate(l)
        if self.sync:
            _synchronize(query.device)
        self.score_seconds += time.perf_counter() - t0

    def _keep(self, layer, rows: list[tuple[torch.Tensor, torch.Tensor]], total: int, store: bool) -> None:
        """Keep ``total`` of a layer's document entries over its heads; free the rest (and the probe's).

        ``rows[h]``: head ``h``'s (scores, positions) of its candidates; pinned entries always stay.
        ``store``: the scores become the entries' stored scores (after scoring; not after a re-share).
        """
        pins = [self._pinned(p) for _, p in rows]
        counts = self.method.head_counts(
            [s.masked_fill(pin, float("-inf")) for (s, _), pin in zip(rows, pins)],
            [int(pin.sum()) for pin in pins],
            total,
        )
        P = self.cache.prefix_len
        if all(k >= s.numel() for k, (s, _) in zip(counts, rows)):
            layer.keep(P, None, [s for s, _ in rows])
            return
        index = [
            torch.topk(s.masked_fill(pin, float("inf")), k).indices.sort().values
            for (s, _), pin, k in zip(rows, pins, counts)
        ]
        layer.keep(P, index, [s[i] for (s, _), i in zip(rows, index)] if store else None)

    def _reallocate(self, l: int) -> None:
        """The method's cross-layer update after layer ``l``: layers ``0..l`` may shrink to new counts.

        Counts are per KV head, or per layer over all heads when heads keep different counts (ragged).
        """
        cache, P = self.cache, self.cache.prefix_len
        sizes = [layer.doc_size(P) for layer in cache.layers]
        doc_scores, pinned = [], []
        for s, pos in (cache.layers[j].doc_rows(P) for j in range(l + 1)):
            pin = self._pinned(pos)
            doc_scores.append(s.masked_fill(pin, float("-inf")))
            pinned.append(int(pin[0].sum()) if pin.shape[1] else 0)
        G = cache.layers[0].num_kv_heads
        unit = G if cache.ragged else 1
        counts = self.method.reallocate(l, sizes, doc_scores, pinned, unit=unit)
        for j, b in enumerate(counts or []):
            if b < sizes[j]:
                layer = cache.layers[j]
                self._keep(layer, layer.head_rows(P), b * G // unit, store=False)


class Engine:
    """Compress documents into a bounded cache and answer from it.

    Example::

        lm = load_model("path/to/model")  # a model folder or hub id
        engine = Engine(lm, CompressionSettings(method="dynamickv", budget="1.7%"))
        doc = engine.compress(text, TaskPrompt(after_document="\\n{question}\\nAnswer:"), question=q)
        print(engine.ask(doc, q).text)
    """

    def __init__(
        self,
        lm: LoadedModel,
        settings: CompressionSettings | None = None,
        generation: GenerationSettings | None = None,
        *,
        max_cache: int | str | None = None,
        sync_timing: bool = False,
    ):
        """``max_cache``: the most bytes the cache may take (an int or a word like ``2GiB``; ``off``: no
        limit). None: a share of the memory available when a document starts (see :meth:`memory_limit`).

        ``sync_timing``: synchronise the device before and after each layer's scoring step, so that
        ``CompressStats.score_seconds`` is exact on CUDA (where the host otherwise runs ahead of the
        device and the step's time includes the layer's queued work); costs one stall per layer."""
        self.lm = lm
        self.sync_timing = sync_timing
        self.settings = (settings or CompressionSettings()).validate()
        self.generation = (generation or GenerationSettings()).validate()
        self.max_cache = max_cache
        self._max_cache_bytes = parse_memory(max_cache) if max_cache is not None else None

    # ---- helpers ---------------------------------------------------------------------------------
    @property
    def chunk_size(self) -> int:
        if self.settings.chunk_size:
            return int(self.settings.chunk_size)
        return 4096 if self.lm.device.type == "cuda" else 1024

    def _forward(
        self, ids: list[int] | torch.Tensor, cache: CompressedCache, state: _Pass | None = None, keep: int = 1
    ) -> torch.Tensor:
        """Logits of the last of ``ids`` (a host list, or a tensor of ids already on the device: a greedy
        pick fed back without a host sync) run over ``cache`` at positions from ``cache.next_pos``;
        ``keep > 1``: the logits ``[keep, vocab]`` of the last ``keep`` ids."""
        dev = self.lm.device
        if isinstance(ids, torch.Tensor):
            input_ids, n = ids.reshape(1, -1).to(dev), ids.numel()
        else:
            input_ids, n = torch.tensor([ids], device=dev), len(ids)
        pos = torch.arange(cache.next_pos, cache.next_pos + n, device=dev)
        cache.pending_positions = pos
        kwargs = {"dynkv_cache": cache, "dynkv_state": state} if state is not None else {"dynkv_cache": cache}
        try:
            out = self.lm.model(
                input_ids=input_ids,
                position_ids=pos[None],
                **{_cache_keyword(self.lm.model): cache},
                use_cache=True,
                logits_to_keep=keep,
                **kwargs,
            )
        except torch.OutOfMemoryError as e:
            raise OutOfMemoryError(self._oom_advice(cache, n)) from e
        finally:
            cache.pending_positions = None
        return out.logits[0, -1] if keep == 1 else out.logits[0, -keep:]

    def _ensure_positions(self, cache: CompressedCache, needed: int) -> None:
        """Compact positions (one monotone map for all layers, keys re-rotated) if ``needed`` more won't fit."""
        limit = self.lm.max_positions
        if cache.next_pos + needed <= limit:
            return
        P = cache.prefix_len
        free = limit - P - needed
        span = cache.next_pos - P
        if free < 2 or span <= 0:
            raise UsageError(
                f"the model's position limit ({limit}) is too small for a chunk, probe and answer of {needed} "
                "tokens; use a smaller --chunk-size or --max-new-tokens"
            )
        target = free // 2
        f = target / span

        def mapping(p: torch.Tensor) -> torch.Tensor:
            return torch.where(p >= P, P + torch.round((p - P).to(torch.float64) * f).to(p.dtype), p)

        cache.remap_positions(mapping, lambda k, d: rotate_keys(k, d, self.lm.inv_freq))
        cache.next_pos = P + target

    def _method(self, budget_tokens: int | None) -> Method:
        """The method object for a document whose budget resolved to ``budget_tokens`` (None: keep all)."""
        shape = self.lm.shape
        spec = self.settings.spec
        if budget_tokens is None:
            spec = parse_method("full")
        return spec.create(budget_tokens or 0, shape.num_layers, shape.num_kv_heads)

    def _span_starts(self, method: Method, chunk: list[int]) -> torch.Tensor | None:
        """Where the chunk's spans begin, for a method that keeps spans whole (None otherwise)."""
        mode = method.span_mode
        if mode == "none":
            return None
        return torch.tensor(span_starts(self.lm.tokenizer, chunk, mode), device=self.lm.device)

    def _capacity(self, method: Method, total: int | None, prefix: list[int], probe: list[int]) -> int | None:
        """Entries per KV head a layer is preallocated for: the prefix, the budget (the whole document for
        ``full``), one chunk and the probe. A layer that holds more for a while (DynamicKV's cap before
        its update) grows once; one cut far below gives the memory back (``CompressedCache.headroom``).
        None when unknown (``full`` of a document of unknown length).
        """
        if method.keeps_all:
            kept = total
        else:
            kept = method.budget if total is None else min(method.budget, total)
        if kept is None:
            return None
        return len(prefix) + kept + self.chunk_size + len(probe)

    def _token_chunks(self, document, total: int | None) -> tuple[Iterator[list[int]], int | None]:
        """Turn text, ids, or an iterable of text segments / id lists into chunks of token ids.

        Segments are encoded one at a time and never joined. When the length is needed up front (a
        percentage or full budget, or the ``full`` method: the cache's size depends on it) and not
        given, the ids are spooled to an unnamed temporary file as they are encoded (4 bytes a token)
        and read back a chunk at a time: memory stays flat, the source is read once (a one-shot
        iterable such as stdin or a generator works, a PDF page is extracted once).
        """
        tok = self.lm.tokenizer
        if isinstance(document, str):
            ids = encode(tok, document)
            return _chunked(iter([ids]), self.chunk_size), len(ids)
        if isinstance(document, torch.Tensor):
            document = document.tolist()
        if isinstance(document, (list, tuple)) and (not document or isinstance(document[0], int)):
            return _chunked(iter([list(document)]), self.chunk_size), len(document)
        pieces = (encode(tok, p) if isinstance(p, str) else list(p) for p in document)
        if total is None and self._needs_length():
            spool, total = _spool_ids(pieces)
            return _read_spool(spool, self.chunk_size), total
        return _chunked(pieces, self.chunk_size), total

    def _needs_length(self) -> bool:
        """Whether the cache's size depends on the document's length (so it is counted before reading)."""
        return self.settings.budget.kind in ("percent", "full") or self.settings.spec.keeps_all

    # ---- memory ----------------------------------------------------------------------------------
    def memory_limit(self) -> tuple[int | None, str]:
        """The most bytes a cache may take, and where that limit comes from (for messages).

        ``max_cache`` when given (``off``: None, no limit); else a share of the memory available now:
        ``CPU_MEMORY_SHARE`` of MemAvailable (/proc/meminfo) on CPU, ``CUDA_MEMORY_SHARE`` of the
        device's free memory on CUDA; None where neither can be read.
        """
        if self.max_cache is not None:
            return self._max_cache_bytes, "--max-cache"
        dev = self.lm.device
        if dev.type == "cuda":
            try:
                free, _ = torch.cuda.mem_get_info(dev)
            except (RuntimeError, AssertionError):
                return None, ""
            return int(free * CUDA_MEMORY_SHARE), f"{CUDA_MEMORY_SHARE:.0%} of the free GPU memory; --max-cache sets it"
        avail = _mem_available()
        if avail is None:
            return None, ""
        return int(avail * CPU_MEMORY_SHARE), f"{CPU_MEMORY_SHARE:.0%} of the available memory; --max-cache sets it"

    def _what_keeps(self, budget: Budget, total: int | None, kept: int) -> str:
        """``a 2% budget of this 10,485,760-token document keeps 209,716 tokens per layer``."""
        doc = f"this {total:,}-token document" if total is not None else "this document"
        if budget.kind == "full" or self.settings.spec.keeps_all:
            return f"a full cache of {doc} keeps all {kept:,} tokens per layer"
        return f"a {budget} budget of {doc} keeps {kept:,} tokens per layer"

    def _check_memory(self, budget: Budget, total: int | None, kept: int, extra: int) -> None:
        """Refuse (before the first chunk) a cache of ``kept`` tokens per layer (+ ``extra`` tokens of
        prefix, chunk and probe while a chunk is read) that would not fit :meth:`memory_limit`."""
        limit, where = self.memory_limit()
        if limit is None:
            return
        bpt = self.lm.cache_bytes_per_token()
        need = (kept + extra) * bpt
        if need <= limit:
            return
        fit = fitting_budget(limit, bpt, extra)
        advice = (
            f"use --budget {fit} or less"
            if fit
            else f"even a chunk of {self.chunk_size} tokens does not fit: use a smaller --chunk-size or a larger --max-cache"
        )
        raise CacheTooLargeError(
            f"{self._what_keeps(budget, total, kept)}, a {format_bytes(need)} cache; "
            f"this machine allows {format_bytes(limit)} ({where}): {advice}"
        )

    def _oom_advice(self, cache: CompressedCache, n_ids: int) -> str:
        """What an out-of-memory in the middle of a pass says: the size it reached and a budget that fits."""
        dev = self.lm.device
        bpt = self.lm.cache_bytes_per_token()
        held = cache.bytes_used()
        msg = (
            f"out of memory on {dev} with a {format_bytes(held)} cache and a pass of {n_ids:,} tokens "
            f"(chunks of {self.chunk_size})"
        )
        if dev.type == "cuda":
            try:
                free, share = torch.cuda.mem_get_info(dev)[0], CUDA_MEMORY_SHARE
            except (RuntimeError, AssertionError):
                free, share = 0, CUDA_MEMORY_SHARE
        else:
            free, share = _mem_available() or 0, CPU_MEMORY_SHARE
        fit = fitting_budget(int((held + free) * share), bpt, n_ids)
        if fit:
            return f"{msg}; use --budget {fit} or less, or a smaller --chunk-size"
        return f"{msg}; try a smaller --chunk-size or --budget"

    # ---- API -------------------------------------------------------------------------------------
    def compress(
        self,
        document: str | Iterable[str] | Iterable[list[int]] | list[int],
        prompt: TaskPrompt | None = None,
        *,
        question: str | None = None,
        probe: str | None = None,
        total_tokens: int | None = None,
        fingerprint: str | None = None,
        source: str = "",
        on_progress: Callable[[Progress], None] | None = None,
        on_warning: Callable[[str], None] | None = None,
        low_level: float | None = None,
    ) -> CompressedDocument:
        """Stream ``document`` through the model in chunks into a compressed cache.

        Args:
            document: text, token ids, or an iterable of text segments (e.g. PDF pages) or id lists.
            prompt: the text around the document (default: plain ``document + "\\n\\n" + question``).
            question / probe: the probe text that observes each chunk (probe wins; default: the question,
                else a generic instruction). Ignored with ``observation: tail``.
            total_tokens: the document's length in tokens when known (a percentage budget needs it;
                without it the ids are spooled to a temporary file first, see :meth:`_token_chunks`).
            on_warning: called with a one-line warning (a percentage budget that makes a large cache).
            low_level: keep a second, low-compression level in host memory for selective reload
                (:mod:`dynkv_cli.reload`): this fraction of each block's entries (1.0: all); None: off.

        Raises:
            CacheTooLargeError: before the first chunk, when the cache would not fit :meth:`memory_limit`.
            OutOfMemoryError: the device ran out of memory anyway (with the size and a budget that fits).
        """
        prompt = prompt or TaskPrompt()
        settings, lm = self.settings, self.lm
        budget = settings.budget
        chunks, total = self._token_chunks(document, total_tokens)
        B = budget.resolve(total, lm.cache_bytes_per_token())
        if settings.spec.keeps_all:
            B = None
        method = self._method(B)
        probe_ids: list[int] = []
        if method.observation == "probe":
            probe_ids = prompt_ids(lm.tokenizer, prompt, probe or question or DEFAULT_PROBE).suffix
            if not probe_ids:
                raise UsageError("the probe is empty: give a question or a probe text")
        reserve = max(min(QUESTION_ALLOWANCE, lm.max_positions // 8), len(probe_ids)) + self.generation.max_new_tokens
        prefix = prompt_ids(lm.tokenizer, prompt, question or "").prefix
        kept = total if method.keeps_all else B
        if kept is not None:
            if total is not None:
                kept = min(kept, total)
            self._check_memory(budget, total, kept, len(prefix) + self.chunk_size + len(probe_ids))
            if on_warning and budget.kind == "percent" and not method.keeps_all and kept > PERCENT_WARN_TOKENS:
                on_warning(
                    f"{self._what_keeps(budget, total, kept)}, a {format_bytes(kept * lm.cache_bytes_per_token())} "
                    f"cache, not a small one (reading it takes long): a fixed budget such as --budget "
                    f"{PERCENT_WARN_TOKENS // 2} keeps it small"
                )

        dev = lm.device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        peak = _rss_bytes()
        cache = CompressedCache(
            lm.shape.num_layers,
            ragged=method.ragged,
            capacity=self._capacity(method, total, prefix, probe_ids),
            headroom=self.chunk_size + len(probe_ids),
        )
        low = None
        if low_level is not None and not method.keeps_all:
            from .reload import LowLevel

            low = LowLevel(low_level, lm.shape.num_layers, pin=dev.type == "cuda")
        digest = hashlib.sha256()
        t_start = time.perf_counter()
        score_s, n_chunks, seen = 0.0, 0, 0
        with torch.inference_mode():
            if prefix:
                self._forward(prefix, cache)
                cache.next_pos = len(prefix)
            cache.prefix_len = len(prefix)
            for chunk in chunks:
                digest.update(torch.tensor(chunk, dtype=torch.int64).numpy().tobytes())
                self._ensure_positions(cache, len(chunk) + len(probe_ids) + reserve)
                pw = min(method.pinned_window, len(chunk))
                state = _Pass(
                    cache,
                    method,
                    n_chunk=len(chunk),
                    n_probe=len(probe_ids),
                    pin_from=cache.next_pos + len(chunk) - pw if pw else None,
                    n_obs=len(probe_ids) or max(1, pw),  # the probe observes, else the tail window
                    sync=self.sync_timing,
                    span_starts=self._span_starts(method, chunk),
                    low=low,
                )
                if low is not None:
                    low.begin_chunk(cache.next_pos, cache.next_pos + len(chunk))
                self._forward(chunk + probe_ids, cache, state)
                cache.next_pos += len(chunk)
                seen += len(chunk)
                n_chunks += 1
                score_s += state.score_seconds
                if dev.type == "cpu":
                    _release_host_memory()
                peak = max(peak, _rss_bytes())
                if on_progress:
                    on_progress(
                        Progress(
                            "prefill",
                            seen,
                            total,
                            time.perf_counter() - t_start,
                            cache.kept_per_layer(),
                            cache.bytes_used(),
                        )
                    )
        if seen == 0:
            raise UsageError("the document is empty: nothing to compress")
        # a stored document needs room for a question and its answer, not for another chunk
        cache.fit(QUESTION_ALLOWANCE + self.generation.max_new_tokens)
        elapsed = time.perf_counter() - t_start
        if dev.type == "cuda":
            peak_bytes, peak_kind = torch.cuda.max_memory_allocated(dev), "cuda_max_allocated"
        else:
            peak_bytes, peak_kind = peak, "process_rss"
        stats = CompressStats(
            method="full" if B is None else settings.method,
            budget=str(budget),
            budget_tokens=B,
            chunk_size=self.chunk_size,
            doc_tokens=seen,
            prefix_tokens=cache.prefix_len,
            chunks=n_chunks,
            kept_per_layer=cache.kept_per_layer(),
            bytes_used=cache.bytes_used(),
            full_kv_bytes=lm.full_kv_bytes(seen + cache.prefix_len),
            prefill_seconds=elapsed,
            score_seconds=score_s,
            peak_memory_bytes=peak_bytes,
            peak_memory_kind=peak_kind,
            compactions=cache.compactions,
            observation=method.observation,
        )
        return CompressedDocument(
            cache,
            prompt,
            settings,
            stats,
            fingerprint or digest.hexdigest()[:32],
            lm.name,
            lm.shape.fingerprint(),
            source,
            low_level=low,
        )

    def ask(
        self,
        doc: CompressedDocument,
        question: str = "",
        *,
        generation: GenerationSettings | None = None,
        on_token: Callable[[str], None] | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        keep_logits: bool = False,
        reload: int | None = None,
    ) -> Answer:
        """Prefill the suffix for ``question`` over the compressed cache and decode an answer.

        The question and answer are removed from the cache afterwards, so the document can be asked again.
        ``reload``: low-level entries per KV head per layer to bring back for this question first
        (:func:`dynkv_cli.reload.reload`; the document must have been read with ``low_level``).
        """
        gen = (generation or self.generation).validate()
        reloaded = None
        if reload:
            from .reload import reload as reload_blocks

            doc, reloaded = reload_blocks(self, doc, question, int(reload))
        lm, cache = self.lm, doc.cache
        suffix = prompt_ids(lm.tokenizer, doc.prompt, question).suffix
        if not suffix:
            raise UsageError("the prompt has no text after the document: give a question")
        eos = eos_ids(lm)
        lengths, pos0 = cache.lengths(), cache.next_pos
        rng = torch.Generator(device="cpu")
        if gen.seed is not None:
            rng.manual_seed(gen.seed)
        first_logits = None
        t0 = time.perf_counter()

        def step(token: int | torch.Tensor) -> torch.Tensor:
            """One answer token through the model: the next logits."""
            logits = self._forward(token if isinstance(token, torch.Tensor) else [token], cache)
            cache.next_pos += 1
            return logits

        def progress(n: int) -> None:
            on_progress(Progress("decode", n, gen.max_new_tokens, time.perf_counter() - t0))

        try:
            with torch.inference_mode():
                self._ensure_positions(cache, len(suffix) + gen.max_new_tokens)
                pos0 = cache.next_pos
                lengths = cache.lengths()
                logits = self._forward(suffix, cache)
                cache.next_pos += len(suffix)
                if keep_logits:
                    first_logits = logits.float().cpu()
                out = decode(
                    step,
                    logits,
                    lm.tokenizer,
                    gen,
                    eos,
                    pick_fn=_pick,  # looked up here: tests replace engine._pick to script an answer
                    rng=rng,
                    t0=t0,
                    on_token=on_token,
                    on_progress=progress if on_progress else None,
                )
        finally:
            cache.truncate(lengths)
            cache.next_pos = pos0
        total = time.perf_counter() - t0
        t_first = out.first_token_seconds
        return Answer(
            question,
            out.text,
            out.token_ids,
            out.stop_reason,
            len(suffix),
            t_first,
            total - t_first,
            first_logits,
            reload=None if reloaded is None else reloaded.to_dict(),
        )

    def teacher_force(self, doc: CompressedDocument, question: str, answer_ids: list[int]) -> list[tuple[float, int]]:
        """How the compressed cache scores a given answer: per answer token, its log-probability and the
        argmax id at its position (teacher forcing: the question and ``answer_ids[:-1]`` in one pass).

        A benchmark's fidelity score compares these with full KV's. The cache is left as it was.
        """
        if not answer_ids:
            return []
        lm, cache = self.lm, doc.cache
        suffix = prompt_ids(lm.tokenizer, doc.prompt, question).suffix
        ids = suffix + list(answer_ids[:-1])
        lengths, pos0 = cache.lengths(), cache.next_pos
        try:
            with torch.inference_mode():
                self._ensure_positions(cache, len(ids))
                lengths, pos0 = cache.lengths(), cache.next_pos
                logits = self._forward(ids, cache, keep=len(answer_ids)).float().reshape(len(answer_ids), -1)
        finally:
            cache.truncate(lengths)
            cache.next_pos = pos0
        logp = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(answer_ids, device=logp.device)
        got = logp.gather(1, target[:, None])[:, 0]
        return list(zip(got.tolist(), logp.argmax(-1).tolist()))

    def load(self, path: str | Path, *, on_warning: Callable[[str], None] | None = None) -> CompressedDocument:
        """Load a cache saved by :meth:`CompressedDocument.save`; refuses a cache made with another model.

        Before any tensor is read: the model fingerprint, then the tensors' shapes and dtypes against the
        model (layers, KV heads, head dim). Every tensor is checked against its checksum as it is read
        (:class:`CacheFileError` names a damaged one). A file written before checksums loads and
        ``on_warning`` (default: :func:`warnings.warn`) is told it cannot be verified.
        """
        meta = CompressedCache.read_header(path)
        if meta.get("model_fingerprint") != self.lm.shape.fingerprint():
            raise CacheFileError(
                f"{path} was compressed with model {meta.get('model')!r}, not {self.lm.name!r}; "
                f"load it with --model {meta.get('model')}"
            )
        if on_warning is None:
            import warnings

            def on_warning(msg: str) -> None:
                warnings.warn(msg, stacklevel=3)

        cache, meta = CompressedCache.load(
            path, self.lm.device, self.lm.dtype, shape=self.lm.shape, on_warning=on_warning
        )
        settings = CompressionSettings.from_dict(meta["settings"])
        st = dict(meta["stats"])
        for k in ("compression_ratio", "compact_positions", "prefill_tokens_per_s"):
            st.pop(k, None)
        return CompressedDocument(
            cache,
            dataclass_from_dict(TaskPrompt, meta["prompt"], "prompt"),
            settings,
            CompressStats(**st),
            meta["document_fingerprint"],
            meta.get("model", ""),
            meta["model_fingerprint"],
            meta.get("source", ""),
            low_level=cache.loaded_low_level,
        )


def _chunked(pieces: Iterable[list[int]], size: int) -> Iterator[list[int]]:
    """Regroup id lists into chunks of ``size`` ids (the last may be shorter), copying each id once."""
    buf: list[int] = []
    for p in pieces:
        buf.extend(p)
        if len(buf) < size:
            continue
        n = len(buf) - len(buf) % size
        for a in range(0, n, size):
            yield buf[a : a + size]
        buf = buf[n:]
    if buf:
        yield buf


#: array typecode of spooled token ids (4 bytes: every tokenizer's ids fit)
_SPOOL_TYPE = "i"


def _spool_ids(pieces: Iterable[list[int]]):
    """Write id lists to an unnamed temporary file (no name to clean up); returns it, rewound, and the count."""
    try:
        spool = tempfile.TemporaryFile(prefix="dynkv-ids-")
    except OSError as e:
        raise DynkvError(f"cannot create a temporary file to count the document's tokens: {e.strerror}") from e
    n = 0
    try:
        for p in pieces:
            a = array.array(_SPOOL_TYPE, p)
            a.tofile(spool)
            n += len(a)
        spool.flush()
        spool.seek(0)
    except OSError as e:
        spool.close()
        raise DynkvError(
            f"cannot write the document's token ids to a temporary file ({e.strerror}); "
            "free space in the temporary folder (TMPDIR) or give --budget in tokens"
        ) from e
    except BaseException:
        spool.close()
        raise
    return spool, n


def _read_spool(spool, size: int) -> Iterator[list[int]]:
    """Read a spool back ``size`` ids at a time; the file is closed (and gone) at the end."""
    width = array.array(_SPOOL_TYPE).itemsize
    try:
        while True:
            data = spool.read(size * width)
            if not data:
                return
            a = array.array(_SPOOL_TYPE)
            a.frombytes(data)
            yield a.tolist()
    finally:
        spool.close()


def _mem_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


# decode.py picks tokens; the engine hands it this name so tests can patch engine._pick.
_pick = pick
