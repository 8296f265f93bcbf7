"""The compressed KV cache: per layer, per KV head, only the kept tokens, with their original positions.

Every layer holds its own number of tokens (the same count for each KV head of a layer, each head its
own tokens). Entries are kept in ascending original position. Layout per layer::

    keys, values : [1, G, n, d]   (KV heads only, never repeated query heads)
    positions    : [G, n] int64   (original RoPE position of every entry)
    scores       : [G, n] float32 (last observation score; used to re-allocate between layers)

The first ``prefix_len`` entries of every layer are the task prefix (template header, instruction),
kept always; the rest are document tokens, then any question/answer being asked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .errors import CacheFileError

#: The format written now: ``/2`` adds a sha256 of every tensor's bytes to the header (``checksums``).
FORMAT = "dynkv-cache/2"
#: Written before checksums; still loaded (with a warning that it cannot be verified).
FORMAT_V1 = "dynkv-cache/1"
FORMATS = (FORMAT_V1, FORMAT)
CHECKSUM = "sha256"

#: torch dtype -> safetensors dtype name (what a cache holds: keys/values in the model dtype, int64, fp32)
_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
#: Factor a full layer's buffers grow by when an update does not fit (x1.5: growth amortised, O(log n) times).
GROWTH = 1.5


@dataclass
class HeadGroup:
    """KV heads ``start:stop`` of a layer as the engine's step sees them: keys, values ``[g, n, d]``,
    positions and stored scores ``[g, n]`` (views; the heads of a group hold the same number of entries)."""

    start: int
    stop: int
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    scores: torch.Tensor


class _ValidView:
    """A layer attribute that reads as the valid part (the first ``_n`` entries along ``dim``) of the
    buffer ``slot``; a tensor assigned whole (a loaded file, transformers' own helpers) becomes the
    buffer, all of it valid."""

    def __init__(self, slot: str, dim: int):
        self.slot, self.dim = slot, dim

    def __get__(self, layer, owner=None):
        if layer is None:
            return self
        buf = getattr(layer, self.slot)
        return None if buf is None else buf.narrow(self.dim, 0, layer._n)

    def __set__(self, layer, t: torch.Tensor | None) -> None:
        if t is not None:
            layer._n = t.shape[self.dim]
        setattr(layer, self.slot, t)


class CompressedLayer(DynamicLayer):
    """One layer of the compressed cache. ``update`` appends; the engine selects and truncates.

    Storage is preallocated and written in place: buffers ``[1, G, capacity, d]`` (keys, values) and
    ``[G, capacity]`` (positions, scores) of which the first :attr:`length` entries per head are valid.
    ``keys``, ``values``, ``positions`` and ``scores`` are views of that valid part, so an update, a
    ``select`` or a ``truncate`` never allocates a new copy of the layer (no per-token ``torch.cat``,
    no heap churn). An update that does not fit grows the buffers by :data:`GROWTH` (amortised: a
    layer grows O(log n) times). Assigning one of the four attributes adopts the tensor as its buffer.
    """

    def __init__(self, cache: CompressedCache):
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._p: torch.Tensor | None = None
        self._s: torch.Tensor | None = None
        self._n = 0
        #: how many times the buffers were reallocated to grow (tests check it stays O(log n))
        self.growths = 0
        super().__init__()
        self._cache = cache

    # ---- the views the rest of dynkv reads (assigning adopts the tensor as the buffer) ----------------
    keys = _ValidView("_k", -2)
    values = _ValidView("_v", -2)
    positions = _ValidView("_p", -1)
    scores = _ValidView("_s", -1)

    @property
    def capacity(self) -> int:
        """Entries per KV head the buffers hold before they must grow."""
        return 0 if self._k is None else self._k.shape[-2]

    def _allocate(self, like_k: torch.Tensor, like_v: torch.Tensor, cap: int) -> None:
        """New buffers of ``cap`` entries per head (shapes and dtypes from ``like_k``/``like_v``); valid part copied."""
        B, G = like_k.shape[0], like_k.shape[1]
        dev = like_k.device
        k = like_k.new_empty(B, G, cap, like_k.shape[-1])
        v = like_v.new_empty(B, G, cap, like_v.shape[-1])
        p = torch.empty(G, cap, dtype=torch.long, device=dev)
        s = torch.empty(G, cap, dtype=torch.float32, device=dev)
        n = self._n
        if self._k is not None and n:
            k[:, :, :n].copy_(self.keys)
            v[:, :, :n].copy_(self.values)
            p[:, :n].copy_(self.positions)
            s[:, :n].copy_(self.scores)
        self._k, self._v, self._p, self._s = k, v, p, s

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Buffers for the cache's ``capacity`` (None: just this first update), empty."""
        self.device = key_states.device
        self.is_initialized = True
        self._n = 0
        self._allocate(key_states, value_states, max(self._cache.capacity or 0, key_states.shape[-2]))

    def adopt(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Take ``keys``/``values`` ``[1, G, n, d]`` (a loaded file) as full buffers; set positions and scores next."""
        self.device = keys.device
        self.is_initialized = True
        self.keys, self.values = keys, values

    def fit(self, headroom: int) -> None:
        """Shrink the buffers to the kept entries plus ``headroom`` (one copy; nothing when already that small).

        Prefill needs room for a chunk in every layer; a stored document needs only room for a question
        and its answer, so the engine may call this once after the last chunk."""
        if self._k is not None and self.capacity > self._n + headroom:
            self._allocate(self._k, self._v, self._n + headroom)

    def reserve(self, n: int) -> None:
        """Make room for ``n`` entries per head: grow by :data:`GROWTH` (at least to ``n``) when full."""
        cap = self.capacity
        if n <= cap:
            return
        self._allocate(self._k, self._v, max(n, int(cap * GROWTH) + 1))
        self.growths += 1

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new entries after the valid ones, in place; returns views of all valid keys and values."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q, n = key_states.shape[-2], self._n
        self.reserve(n + q)
        pos = self._cache.new_positions(q)
        self._k[:, :, n : n + q].copy_(key_states)
        self._v[:, :, n : n + q].copy_(value_states)
        self._p[:, n : n + q].copy_(pos[None, :])  # broadcast over heads; copy_ moves it to the device
        self._s[:, n : n + q].zero_()
        self._n = n + q
        return self.keys, self.values

    @property
    def length(self) -> int:
        return 0 if self._k is None else self._n

    def get_seq_length(self) -> int:
        return self.length

    def _gather_into(self, buf: torch.Tensor, dim: int, index: torch.Tensor) -> None:
        """``buf[..., :k] = valid(buf).gather(dim, index)`` through the cache's scratch (no new layer-sized copy)."""
        src = buf.narrow(dim, 0, self._n)
        tmp = self._cache.scratch(tuple(index.shape), buf.dtype, buf.device)
        torch.gather(src, dim, index, out=tmp)
        buf.narrow(dim, 0, index.shape[dim]).copy_(tmp)

    def select(self, index: torch.Tensor, scores: torch.Tensor | None = None) -> None:
        """Keep entries ``index`` ([G, k], ascending per head) of every head; free the rest (in place)."""
        G, k = index.shape
        d_k, d_v = self._k.shape[-1], self._v.shape[-1]
        self._gather_into(self._k, 2, index[None, :, :, None].expand(1, G, k, d_k))
        self._gather_into(self._v, 2, index[None, :, :, None].expand(1, G, k, d_v))
        self._gather_into(self._p, 1, index)
        if scores is not None:
            self._s[:, :k].copy_(scores)
        else:
            self._gather_into(self._s, 1, index)
        self._n = k
        room = self._cache.headroom
        if room and self.capacity > 2 * (k + room):  # a layer cut well below its buffer gives the memory back
            self._allocate(self._k, self._v, k + room)

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` entries (drops a question/answer appended after the document)."""
        if self._k is None or n >= self._n:
            return
        self._n = n

    def nbytes(self) -> int:
        """Bytes of the kept entries (what a budget buys), not of the buffers (see :meth:`reserved_bytes`)."""
        if self.keys is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.positions, self.scores))

    def reserved_bytes(self) -> int:
        """Bytes of the buffers, valid or not (the memory the layer actually holds)."""
        bufs = [t for t in (self._k, self._v, self._p, self._s) if t is not None]
        return sum(t.numel() * t.element_size() for t in bufs)


    # ---- the engine's per-layer step reads and cuts a layer through these (both layouts) ----------
    @property
    def num_kv_heads(self) -> int:
        return 0 if self.keys is None else self.keys.shape[1]

    def head_groups(self) -> list[HeadGroup]:
        """All KV heads as one group (they hold the same number of entries): ``[G, n, ...]`` views."""
        return [HeadGroup(0, self.num_kv_heads, self.keys[0], self.values[0], self.positions, self.scores)]

    def doc_rows(self, prefix_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored scores and positions of the document entries as a cross-layer update ranks them: ``[G, n]``
        (counts per KV head)."""
        if self.keys is None:
            return torch.zeros(1, 0), torch.zeros(1, 0, dtype=torch.long)
        return self.scores[:, prefix_len:], self.positions[:, prefix_len:]

    def doc_size(self, prefix_len: int) -> int:
        """Document entries per KV head (what a cross-layer update counts for this layout)."""
        return max(0, self.length - prefix_len) if self.keys is not None else 0

    def head_rows(self, prefix_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per KV head: (stored scores, positions) of its document entries."""
        s, p = self.doc_rows(prefix_len)
        return list(zip(s.unbind(0), p.unbind(0)))

    def keep(self, prefix_len: int, index: list[torch.Tensor] | None, scores: list[torch.Tensor] | None) -> None:
        """Keep the prefix and, of head ``h``, document entries ``index[h]`` (ascending, counted from the
        prefix's end); free the rest. ``index`` None: keep the first ``len(scores[h])`` document entries.
        ``scores`` (when given) become the kept entries' stored scores. Heads keep equal counts here."""
        P = prefix_len
        if index is None:
            n = int(scores[0].numel())
            self.truncate(P + n)
            self.scores[:, P : P + n] = torch.stack(scores)
            return
        idx = torch.stack(index)
        G = idx.shape[0]
        keep = torch.cat([torch.arange(P, device=idx.device).expand(G, P), idx + P], dim=1)
        kept = None
        if scores is not None:
            kept = torch.cat([self.scores.new_zeros(G, P), torch.stack(scores).to(torch.float32)], dim=1)
        self.select(keep, kept)


class RaggedLayer(DynamicLayer):
    """A layer whose KV heads keep different numbers of entries, stored flat without padding.

    Layout: ``keys``, ``values`` ``[T, d]`` (head ``h`` owns rows ``offsets[h]:offsets[h+1]``),
    ``positions`` ``[T]``, ``scores`` ``[T]``, ``lens`` (entries per head). Head budgets that differ
    (AdaKV) then free memory instead of masking it. Attention reads it through
    :func:`dynkv_cli.attention.ragged_attention`.
    """

    ragged = True

    def __init__(self, cache: CompressedCache):
        super().__init__()
        self._cache = cache
        self.positions: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.lens: list[int] = []

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        G = key_states.shape[1]
        self.keys = key_states.new_zeros(0, key_states.shape[-1])
        self.values = value_states.new_zeros(0, value_states.shape[-1])
        self.positions = torch.zeros(0, dtype=torch.long, device=key_states.device)
        self.scores = torch.zeros(0, dtype=torch.float32, device=key_states.device)
        self.lens = [0] * G

    @property
    def offsets(self) -> torch.Tensor:
        """Where each head's rows start, and the end: ``[G + 1]`` on the keys' device.

        Kept between calls and moved on the device when every head grew by the same count (a decode
        step adds one entry per head): a host list copied to CUDA would sync the stream every layer
        and every token."""
        lens, dev = tuple(self.lens), self.keys.device
        cached = getattr(self, "_offsets", None) if dev.type != "cpu" else None  # on the CPU a list is cheapest
        if cached is not None and cached[0] != lens:
            old, off = cached
            grew = lens[0] - old[0] if len(old) == len(lens) and lens else None
            if grew is None or off.device != dev or any(a - b != grew for a, b in zip(lens, old)):
                cached = None
            else:
                cached = (lens, off + torch.arange(len(lens) + 1, device=dev) * grew)
        if cached is None:
            off = [0]
            for n in lens:
                off.append(off[-1] + n)
            cached = (lens, torch.tensor(off, dtype=torch.long, device=dev))
        self._offsets = cached
        return cached[1]

    def _bounds(self) -> list[tuple[int, int]]:
        out, a = [], 0
        for n in self.lens:
            out.append((a, a + n))
            a += n
        return out

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        pos = self._cache.new_positions(q).to(self.positions.device)
        ks, vs, ps, ss = [], [], [], []
        for h, (a, b) in enumerate(self._bounds()):
            ks += [self.keys[a:b], key_states[0, h]]
            vs += [self.values[a:b], value_states[0, h]]
            ps += [self.positions[a:b], pos]
            ss += [self.scores[a:b], self.scores.new_zeros(q)]
        self.keys, self.values = torch.cat(ks), torch.cat(vs)
        self.positions, self.scores = torch.cat(ps), torch.cat(ss)
        self.lens = [n + q for n in self.lens]
        return key_states, value_states

    def head(self, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys ``[n_h, d]``, values, positions ``[n_h]`` and scores of head ``h``."""
        a, b = self._bounds()[h]
        return self.keys[a:b], self.values[a:b], self.positions[a:b], self.scores[a:b]

    @property
    def length(self) -> int:
        """The longest head (transformers asks for one length)."""
        return max(self.lens) if self.lens else 0

    def get_seq_length(self) -> int:
        return self.length

    def select_heads(self, index: list[torch.Tensor], scores: list[torch.Tensor] | None = None) -> None:
        """Keep entries ``index[h]`` (ascending, head-local) of each head; free the rest."""
        flat = torch.cat([idx + a for idx, (a, _) in zip(index, self._bounds())])
        new_scores = torch.cat(scores) if scores is not None else self.scores[flat]
        self.keys, self.values = self.keys[flat].contiguous(), self.values[flat].contiguous()
        self.positions, self.scores = self.positions[flat], new_scores
        self.lens = [int(i.numel()) for i in index]

    def truncate(self, n) -> None:
        """Keep the first ``n`` entries of every head (``n``: an int or one count per head)."""
        if self.keys is None:
            return
        counts = [n] * len(self.lens) if isinstance(n, int) else list(n)
        if all(c >= m for c, m in zip(counts, self.lens)):
            return
        dev = self.keys.device
        self.select_heads([torch.arange(min(c, m), device=dev) for c, m in zip(counts, self.lens)])

    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.positions, self.scores))


    # ---- the engine's per-layer step reads and cuts a layer through these (both layouts) ----------
    @property
    def num_kv_heads(self) -> int:
        return len(self.lens)

    def head_groups(self) -> list[HeadGroup]:
        """One group per KV head (heads hold different numbers of entries): ``[1, n_h, ...]`` views."""
        out = []
        for h in range(len(self.lens)):
            k, v, p, s = self.head(h)
            out.append(HeadGroup(h, h + 1, k[None], v[None], p[None], s[None]))
        return out

    def head_rows(self, prefix_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per KV head: (stored scores, positions) of its document entries."""
        return [(s[prefix_len:], p[prefix_len:]) for _, _, p, s in (self.head(h) for h in range(len(self.lens)))]

    def doc_size(self, prefix_len: int) -> int:
        """Document entries over all KV heads (a cross-layer update counts per layer for this layout)."""
        return sum(max(0, n - prefix_len) for n in self.lens)

    def doc_rows(self, prefix_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored scores and positions of all heads' document entries in one row ``[1, T]`` (a cross-layer
        update counts per layer over all heads)."""
        if self.keys is None:
            return torch.zeros(1, 0), torch.zeros(1, 0, dtype=torch.long)
        rows = self.head_rows(prefix_len)
        return torch.cat([s for s, _ in rows])[None], torch.cat([p for _, p in rows])[None]

    def keep(self, prefix_len: int, index: list[torch.Tensor] | None, scores: list[torch.Tensor] | None) -> None:
        """Keep the prefix and, of head ``h``, document entries ``index[h]`` (ascending, counted from the
        prefix's end); free the rest. ``index`` None: keep the first ``len(scores[h])`` of each head.
        ``scores`` (when given) become the kept entries' stored scores."""
        P, dev = prefix_len, self.keys.device
        if index is None:
            index = [torch.arange(int(s.numel()), device=dev) for s in scores]
        full = [torch.cat([torch.arange(P, device=dev), i + P]) for i in index]
        kept = None
        if scores is not None:
            kept = [torch.cat([s.new_zeros(P, dtype=torch.float32), s.to(torch.float32)]) for s in scores]
        self.select_heads(full, kept)


@dataclass
class ModelShape:
    """What a cache must match: layers, KV heads, head dim and the model's identity."""

    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_heads: int
    vocab_size: int
    name: str = ""
    weights: str = ""  # identity of the weights (a GGUF file's sha256, a folder's weights_id), if known

    def fingerprint(self) -> str:
        key = f"{self.model_type}/{self.num_layers}/{self.num_heads}/{self.num_kv_heads}/{self.head_dim}/{self.vocab_size}"
        if self.weights:
            key += f"/{self.weights}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]


class CompressedCache(Cache):
    """A transformers ``Cache`` whose layers each hold their own number of kept tokens.

    The engine sets ``pending_positions`` before each forward so new entries carry their original
    positions; ``next_pos`` is the position the next token will take.
    """

    def __init__(self, num_layers: int, ragged: bool = False, capacity: int | None = None, headroom: int = 0):
        """``capacity``: entries per KV head a (uniform) layer is preallocated for at its first update (the
        engine passes prefix + budget + chunk + probe); None: unknown, the buffers start at the first
        update's size and grow geometrically. ``headroom``: entries a layer needs free beyond its kept
        ones for the next pass (chunk + probe); a layer whose kept entries fall far below its buffer is
        re-allocated to them plus ``headroom`` (0: never), so memory follows what is kept."""
        layer_cls = RaggedLayer if ragged else CompressedLayer
        self.capacity = capacity
        self.headroom = headroom
        self._scratch: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        super().__init__(layers=[layer_cls(self) for _ in range(num_layers)])
        self.ragged = ragged
        self.pending_positions: torch.Tensor | None = None
        self.next_pos = 0
        self.prefix_len = 0
        self.compactions = 0
        self.loaded_low_level = None  # the low level read from a bi-level cache file (load)

    def scratch(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous temporary of ``shape``, shared by all layers (one ``select`` at a time uses it).

        ``select`` gathers kept entries here and copies them back into the layer's buffer, so a chunk's
        compression allocates nothing once the scratch has grown to the largest layer."""
        numel = 1
        for n in shape:
            numel *= n
        key = (dtype, torch.device(device))
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < numel:
            old = 0 if buf is None else buf.numel()
            buf = torch.empty(max(numel, int(old * GROWTH)), dtype=dtype, device=device)
            self._scratch[key] = buf
        return buf[:numel].view(shape)

    def new_positions(self, q: int) -> torch.Tensor:
        """Original positions of the ``q`` tokens being appended (set by the engine before a forward)."""
        pos = self.pending_positions
        if pos is None or pos.numel() != q:
            pos = torch.arange(self.next_pos, self.next_pos + q)
        return pos

    # transformers asks these; our attention masks each layer for itself.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.layers[layer_idx].length + query_length, 0

    def lengths(self) -> list:
        """Entries per layer (per KV head; a list per head for ragged layers), prefix included."""
        return [list(layer.lens) if self.ragged else layer.length for layer in self.layers]

    def kept_per_layer(self) -> list[int]:
        """Document (and suffix) entries per layer per KV head, prefix excluded (mean over heads if ragged)."""
        if self.ragged:
            return [
                round(sum(n - self.prefix_len for n in layer.lens) / max(1, len(layer.lens))) for layer in self.layers
            ]
        return [max(0, layer.length - self.prefix_len) for layer in self.layers]

    def kept_per_head(self) -> list[list[int]]:
        """Document entries of every KV head of every layer, prefix excluded."""
        out = []
        for layer in self.layers:
            if self.ragged:
                out.append([n - self.prefix_len for n in layer.lens])
            else:
                G = 0 if layer.keys is None else layer.keys.shape[1]
                out.append([max(0, layer.length - self.prefix_len)] * G)
        return out

    def bytes_used(self) -> int:
        """Bytes the cache holds now: keys, values, positions and scores of every layer."""
        return sum(layer.nbytes() for layer in self.layers)

    def fit(self, headroom: int) -> None:
        """Shrink every uniform layer's buffers to its kept entries plus ``headroom`` and drop the select
        scratch: after prefill, a document keeps room for a question and an answer, not for a chunk."""
        for layer in self.layers:
            if hasattr(layer, "fit"):
                layer.fit(headroom)
        self._scratch.clear()

    def reserved_bytes(self) -> int:
        """Bytes the cache's storage takes: every layer's buffers (valid or not) and the select scratch."""
        layers = sum(getattr(layer, "reserved_bytes", layer.nbytes)() for layer in self.layers)
        return layers + sum(t.numel() * t.element_size() for t in self._scratch.values())

    def truncate(self, lengths: list[int]) -> None:
        for layer, n in zip(self.layers, lengths):
            layer.truncate(n)

    def remap_positions(self, mapping, rotate) -> None:
        """Move every document entry to ``mapping(positions)`` and re-rotate its key by the difference.

        Args:
            mapping: function from a LongTensor of positions to new positions (monotone).
            rotate: function ``(keys [1,G,n,d], delta [G,n]) -> keys`` applying RoPE by ``delta``.
        """
        for layer in self.layers:
            if layer.keys is None:
                continue
            new = mapping(layer.positions)
            delta = new - layer.positions
            if bool((delta != 0).any()):  # written in place: a layer's preallocated buffers stay
                if self.ragged:  # [T, d] -> [1, 1, T, d]
                    layer.keys.copy_(rotate(layer.keys[None, None], delta[None])[0, 0])
                else:
                    layer.keys.copy_(rotate(layer.keys, delta))
                layer.positions.copy_(new)
        self.compactions += 1

    # ---- files -------------------------------------------------------------------------------
    def save(self, path: str | Path, header: dict, extra: dict[str, torch.Tensor] | None = None) -> None:
        """Write tensors to a safetensors file; ``header`` (JSON) names model, method, budget, document.

        The header also holds the sha256 of every tensor's bytes (``checksums``), hashed as it is written.
        ``extra``: more tensors to store, named ``low.*`` (the low level of a bi-level cache).
        """
        tensors = dict(extra or {})
        for i, layer in enumerate(self.layers):
            if layer.keys is None:
                continue
            keys, values = (layer.keys, layer.values) if self.ragged else (layer.keys[0], layer.values[0])
            tensors[f"layer.{i}.keys"] = keys.contiguous().cpu()
            tensors[f"layer.{i}.values"] = values.contiguous().cpu()
            if self.ragged:
                tensors[f"layer.{i}.lens"] = torch.tensor(layer.lens, dtype=torch.long)
            tensors[f"layer.{i}.positions"] = layer.positions.contiguous().cpu()
            tensors[f"layer.{i}.scores"] = layer.scores.contiguous().cpu()
        meta = dict(header)
        meta.update(
            format=FORMAT,
            num_layers=len(self.layers),
            ragged=self.ragged,
            next_pos=self.next_pos,
            prefix_len=self.prefix_len,
            compactions=self.compactions,
        )
        from .outputs import replacing

        with replacing(path) as tmp:  # a crash leaves the old file or the new one, never half a file
            _write_safetensors(tmp, tensors, meta)

    @staticmethod
    def read_header(path: str | Path) -> dict:
        """The JSON header of a cache file (no tensor is read). Raises :class:`CacheFileError`."""
        from safetensors import safe_open

        path = _existing(path)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = json.loads((f.metadata() or {}).get("dynkv", "{}"))
        except Exception as e:  # safetensors raises several types on a bad file
            raise CacheFileError(f"{path}: not a readable dynkv cache file ({type(e).__name__})") from e
        if not isinstance(meta, dict) or meta.get("format") not in FORMATS:
            raise CacheFileError(f"{path}: not a dynkv cache file (make one with `dynkv compress`)")
        return meta

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype=None,
        *,
        shape: ModelShape | None = None,
        on_warning: Callable[[str], None] | None = None,
    ) -> tuple[CompressedCache, dict]:
        """Read a cache file written by :meth:`save`. Returns the cache and its header.

        Before any tensor is read, the tensors' shapes and dtypes are checked against each other and,
        given ``shape``, against the model (layers, KV heads, head dim). Every tensor's sha256 is checked
        as it is read; a mismatch raises :class:`CacheFileError` naming the tensor. A file written before
        checksums (``dynkv-cache/1``) loads, and ``on_warning`` is told it cannot be verified.
        """
        with _opened(path, shape) as (path, f, meta, sums):
            if sums is None and on_warning is not None:
                on_warning(unverifiable(path))
            cache = cls(int(meta["num_layers"]), ragged=bool(meta.get("ragged", False)))
            names = set(f.keys())

            def get(name: str) -> torch.Tensor:
                t = f.get_tensor(name)
                if sums is not None and _digest(t) != sums[name]:
                    raise CacheFileError(damaged(path, name))
                return t

            for i, layer in enumerate(cache.layers):
                if f"layer.{i}.keys" not in names:
                    continue
                k = get(f"layer.{i}.keys")
                v = get(f"layer.{i}.values")
                if dtype is not None:
                    k, v = k.to(dtype), v.to(dtype)
                if cache.ragged:
                    lens = get(f"layer.{i}.lens").tolist()
                    if sum(lens) != k.shape[0] or min(lens, default=0) < 0:
                        raise CacheFileError(f"{path} is damaged: layer {i}'s head counts do not add up")
                    layer.lazy_initialization(k[None, None], v[None, None])
                    layer.keys, layer.values, layer.lens = k.to(device), v.to(device), lens
                else:
                    layer.adopt(k[None].to(device), v[None].to(device))
                layer.positions = get(f"layer.{i}.positions").to(device)
                layer.scores = get(f"layer.{i}.scores").to(device)
            if meta.get("low_level"):  # a bi-level cache: its low level stays in host memory
                from .reload import LowLevel

                cache.loaded_low_level = LowLevel.from_tensors(meta["low_level"], len(cache.layers), get, dtype)
        cache.next_pos = int(meta["next_pos"])
        cache.prefix_len = int(meta["prefix_len"])
        cache.compactions = int(meta.get("compactions", 0))
        return cache, meta


# ---- the file format: safetensors, written here so each tensor is hashed as it is serialized ---------


def _tensor_bytes(t: torch.Tensor):
    """The tensor's bytes as a flat uint8 array (no copy for a contiguous CPU tensor)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(_tensor_bytes(t)).hexdigest()


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``tensors`` as a safetensors file whose metadata ``dynkv`` is ``meta`` plus every tensor's sha256.

    The header comes first in the file, so it is written with placeholder digests of the same length,
    each tensor is hashed while it is written, and the header is written again over the first one.
    """
    entries, offset = {}, 0
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"cannot store tensor {name} of dtype {t.dtype}")
        n = t.numel() * t.element_size()
        entries[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n

    def header(sums: dict[str, str]) -> bytes:
        head = dict(entries)
        head["__metadata__"] = {"dynkv": json.dumps(dict(meta, checksum=CHECKSUM, checksums=sums))}
        raw = json.dumps(head, separators=(",", ":")).encode()
        return raw + b" " * (-len(raw) % 8)  # safetensors pads its header to 8 bytes with spaces

    first = header({name: "0" * 64 for name in tensors})
    sums = {}
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(first)))
        fh.write(first)
        for name, t in tensors.items():
            buf = _tensor_bytes(t)
            sums[name] = hashlib.sha256(buf).hexdigest()
            fh.write(buf.data)
        final = header(sums)
        assert len(final) == len(first)
        fh.seek(8)
        fh.write(final)


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise CacheFileError(f"{path} is a folder, not a cache file (make one with `dynkv compress`)")
    if not path.is_file():
        raise CacheFileError(f"{path}: no such cache file (make one with `dynkv compress`)")
    return path


def damaged(path: Path, tensor: str) -> str:
    return f"{path} is damaged: tensor {tensor} does not match its checksum; compress the document again"


def unverifiable(path: Path) -> str:
    return (
        f"{path} was written by an older dynkv ({FORMAT_V1}) without checksums, so it cannot be verified; "
        "compress the document again to get a verifiable file"
    )


def _checksums(f, meta: dict, path: Path) -> dict[str, str] | None:
    """The header's checksum of every tensor; None for a file written before checksums."""
    if meta.get("format") == FORMAT_V1:
        return None
    sums = meta.get("checksums")
    if meta.get("checksum") != CHECKSUM or not isinstance(sums, dict):
        raise CacheFileError(f"{path} is damaged: its header has no {CHECKSUM} checksums; compress the document again")
    names = set(f.keys())
    missing = sorted(names - set(sums))
    if missing:
        raise CacheFileError(f"{path} is damaged: tensor {missing[0]} has no checksum; compress the document again")
    absent = sorted(set(sums) - names)
    if absent:
        raise CacheFileError(f"{path} is damaged: tensor {absent[0]} is missing; compress the document again")
    return sums


def _check_layout(f, meta: dict, path: Path, shape: ModelShape | None) -> None:
    """Check the tensors' shapes and dtypes (safetensors header only) against each other and the model."""

    def bad(what: str) -> CacheFileError:
        return CacheFileError(f"{path} is damaged: {what}; compress the document again")

    def other(what: str) -> CacheFileError:
        model = f"model {shape.name!r}" if shape.name else "the model"
        return CacheFileError(f"{path} does not match {model}: {what}; compress the document again with this model")

    try:
        num_layers = int(meta["num_layers"])
        prefix_len = int(meta["prefix_len"])
        int(meta["next_pos"])
    except (KeyError, TypeError, ValueError):
        raise bad("its header lacks num_layers, prefix_len or next_pos") from None
    if shape is not None and num_layers != shape.num_layers:
        raise other(f"the cache holds {num_layers} layers, the model has {shape.num_layers}")
    ragged = bool(meta.get("ragged", False))
    info = {}
    for name in f.keys():
        sl = f.get_slice(name)
        info[name] = (list(sl.get_shape()), str(sl.get_dtype()))
    parts = ("keys", "values", "positions", "scores") + (("lens",) if ragged else ())
    expected = {f"layer.{i}.{p}" for i in range(num_layers) for p in parts}
    if meta.get("low_level"):  # a bi-level cache: its low level (reload.LowLevel.tensors)
        expected |= {"low.blocks", "low.sizes"} | {f"low.{i}.{p}" for i in range(num_layers) for p in ("keys", "values", "positions")}
    extra = sorted(set(info) - expected)
    if extra:
        raise bad(f"tensor {extra[0]} is not part of a {num_layers}-layer cache")
    for i in range(num_layers):
        if f"layer.{i}.keys" not in info:
            continue
        missing = [p for p in parts if f"layer.{i}.{p}" not in info]
        if missing:
            raise bad(f"layer {i} has no {missing[0]} tensor")
        (ks, kd), (vs, vd) = info[f"layer.{i}.keys"], info[f"layer.{i}.values"]
        (ps, pd), (ss, sd) = info[f"layer.{i}.positions"], info[f"layer.{i}.scores"]
        for p, d in (("keys", kd), ("values", vd), ("scores", sd)):
            if d not in _FLOAT_DTYPES:
                raise bad(f"tensor layer.{i}.{p} has dtype {d}, not a floating-point type")
        if pd != "I64":
            raise bad(f"tensor layer.{i}.positions has dtype {pd}, not I64")
        rows = 2 if ragged else 3  # ragged: [T, d]; uniform: [G, n, d]
        if len(ks) != rows or len(vs) != rows or ks[:-1] != vs[:-1] or ps != ks[:-1] or ss != ks[:-1]:
            raise bad(f"layer {i}: keys {ks}, values {vs}, positions {ps} and scores {ss} do not fit together")
        if ragged:
            ls, ld = info[f"layer.{i}.lens"]
            if ld != "I64" or len(ls) != 1:
                raise bad(f"tensor layer.{i}.lens has shape {ls} and dtype {ld}, not one I64 count per KV head")
            heads = ls[0]
        else:
            heads = ks[0]
            if ks[1] < prefix_len:
                raise bad(f"layer {i} holds {ks[1]} entries, fewer than its {prefix_len} prompt tokens")
        if shape is not None:
            if heads != shape.num_kv_heads:
                raise other(f"layer {i} has {heads} KV heads, the model has {shape.num_kv_heads}")
            if ks[-1] != shape.head_dim or vs[-1] != shape.head_dim:
                raise other(f"layer {i} has head dim {ks[-1]} (values {vs[-1]}), the model has {shape.head_dim}")


@contextlib.contextmanager
def _opened(path: str | Path, shape: ModelShape | None):
    """A cache file opened and checked: ``(path, safetensors handle, header, checksums or None)``.

    The tensors' layout is checked (against ``shape`` when given) before any tensor is read; whatever
    safetensors raises on a bad file becomes one :class:`CacheFileError`.
    """
    from safetensors import safe_open

    path = _existing(path)
    meta = CompressedCache.read_header(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            _check_layout(f, meta, path, shape)
            yield path, f, meta, _checksums(f, meta, path)
    except CacheFileError:
        raise
    except Exception as e:  # safetensors raises several types on a bad file
        raise CacheFileError(f"{path}: not a readable dynkv cache file ({type(e).__name__})") from e


def verify_file(path: str | Path) -> int:
    """Check a cache file without a model: layout, and every tensor against its checksum.

    Returns the number of tensors checked; raises :class:`CacheFileError` (one line) on the first
    problem, including a file written before checksums (it cannot be verified).
    """
    with _opened(path, None) as (path, f, meta, sums):
        if sums is None:
            raise CacheFileError(unverifiable(path))
        for name in f.keys():  # one tensor in memory at a time
            if _digest(f.get_tensor(name)) != sums[name]:
                raise CacheFileError(damaged(path, name))
        if meta.get("ragged"):
            for i in range(int(meta["num_layers"])):
                if f"layer.{i}.lens" in sums:
                    lens = f.get_tensor(f"layer.{i}.lens")
                    if int(lens.sum()) != f.get_slice(f"layer.{i}.keys").get_shape()[0] or bool((lens < 0).any()):
                        raise CacheFileError(f"{path} is damaged: layer {i}'s head counts do not add up")
        return len(sums)
