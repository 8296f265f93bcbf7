"""Bi-level cache and selective reload (after Video-X^2L, arXiv 2506.21184, for text).

While a document is read with ``low_level`` set, every chunk leaves two levels: the compressed
cache (the method's choice, on the device) and a low-compression copy of the same chunk, kept in
host memory (pinned on CUDA). The copy is made per block of ``block`` positions (128; a chunk is
several blocks): each KV head's best ``ceil(low_level x block)`` entries of the block, by the scores
the method gave them when the chunk was read (``low_level`` 1.0: the whole block).

When a question comes (:func:`reload`):

1. its prompt suffix is prefilled over the compressed cache, and every layer's attention from the
   suffix's tokens to the cached entries is summed per chunk (each layer's share normalised, so
   every layer counts the same);
2. blocks are ranked by that attention; the first and last block always come back, then the best
   others while their low-level entries fit the reload budget (entries per KV head per layer);
3. a new cache is built: per layer and head, the compressed entries plus the reloaded blocks'
   low-level entries at their original positions (a position held twice is kept once), in
   position order. Heads then hold different counts, so it is a ragged cache;
4. the answer is decoded over it (the caller asks as usual). The compressed cache itself is not
   changed: the next question starts from it again.

Not supported (refused with a clear error): a document read in compact mode (positions remapped).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .errors import UsageError

#: positions per low-level block (what is ranked and reloaded as one piece)
BLOCK = 128


@dataclass
class LowLevel:
    """The low-compression level of a document: per block and layer, host copies of its best entries.

    ``chunks[c] = (start, end)`` positions of block ``c``; ``keys[l][c]``/``values[l][c]``
    ``[G, k_c, d]``, ``positions[l][c]`` ``[G, k_c]`` (ascending per head).
    """

    fraction: float
    num_layers: int
    block: int = BLOCK
    chunks: list[tuple[int, int]] = field(default_factory=list)
    keys: list[list[torch.Tensor]] = field(default_factory=list)
    values: list[list[torch.Tensor]] = field(default_factory=list)
    positions: list[list[torch.Tensor]] = field(default_factory=list)
    pin: bool = False

    def __post_init__(self):
        if not 0.0 < self.fraction <= 1.0:
            raise UsageError(f"low level {self.fraction}: give a fraction of each chunk in (0, 1]")
        self.keys = [[] for _ in range(self.num_layers)]
        self.values = [[] for _ in range(self.num_layers)]
        self.positions = [[] for _ in range(self.num_layers)]

    def begin_chunk(self, start: int, end: int) -> None:
        """A prefill chunk at positions ``start:end`` is about to be read: its blocks."""
        for a in range(start, end, self.block):
            self.chunks.append((a, min(a + self.block, end)))

    def entries(self, n: int) -> int:
        """Low-level entries per KV head of a block of ``n`` tokens."""
        return max(1, min(n, math.ceil(self.fraction * n)))

    def _host(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu":
            return t.clone()
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin)
        out.copy_(t, non_blocking=self.pin)
        return out

    def capture(self, l: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, scores: torch.Tensor) -> None:
        """Keep layer ``l``'s best entries of the chunk just read, block by block: ``keys``/``values``
        ``[G, n, d]``, ``positions``/``scores`` ``[G, n]`` of the chunk's entries (every head holds all
        ``n``, in position order)."""
        n = positions.shape[1]
        for a in range(0, n, self.block):
            b = min(a + self.block, n)
            bk, bv, bp, bs = keys[:, a:b], values[:, a:b], positions[:, a:b], scores[:, a:b]
            k = self.entries(b - a)
            if k < b - a:
                idx = torch.topk(bs.float(), k, dim=1).indices.sort(dim=1).values
                bk = bk.gather(1, idx[:, :, None].expand(-1, -1, bk.shape[-1]))
                bv = bv.gather(1, idx[:, :, None].expand(-1, -1, bv.shape[-1]))
                bp = bp.gather(1, idx)
            self.keys[l].append(self._host(bk))
            self.values[l].append(self._host(bv))
            self.positions[l].append(self._host(bp))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for part in (self.keys, self.values, self.positions) for ts in part for t in ts)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The level as named tensors for a ``.dkv`` file: per layer the blocks' entries concatenated
        (``low.{l}.keys`` ``[G, T, d]``, values, positions ``[G, T]``), the blocks' bounds and sizes."""
        out = {
            "low.blocks": torch.tensor(self.chunks, dtype=torch.long).reshape(-1, 2),
            "low.sizes": torch.tensor([self.chunk_entries(c) for c in range(len(self.chunks))], dtype=torch.long),
        }
        for l in range(self.num_layers):
            if self.keys[l]:
                out[f"low.{l}.keys"] = torch.cat(self.keys[l], dim=1).contiguous()
                out[f"low.{l}.values"] = torch.cat(self.values[l], dim=1).contiguous()
                out[f"low.{l}.positions"] = torch.cat(self.positions[l], dim=1).contiguous()
        return out

    def header(self) -> dict:
        return {"fraction": self.fraction, "block": self.block, "blocks": len(self.chunks)}

    @classmethod
    def from_tensors(cls, header: dict, num_layers: int, get, dtype=None) -> LowLevel:
        """The level :meth:`tensors` wrote (``get(name)`` reads a checked tensor)."""
        from .errors import CacheFileError

        low = cls(float(header["fraction"]), num_layers, block=int(header.get("block", BLOCK)))
        bounds, sizes = get("low.blocks").tolist(), get("low.sizes").tolist()
        if len(bounds) != len(sizes) or any(n < 0 for n in sizes):
            raise CacheFileError("the cache file's low level is damaged: its block table does not add up")
        low.chunks = [(int(a), int(b)) for a, b in bounds]
        for l in range(num_layers):
            k, v, p = get(f"low.{l}.keys"), get(f"low.{l}.values"), get(f"low.{l}.positions")
            if k.shape[1] != sum(sizes) or p.shape[1] != sum(sizes) or v.shape[1] != sum(sizes):
                raise CacheFileError(f"the cache file's low level is damaged: layer {l} does not hold its blocks")
            if dtype is not None:
                k, v = k.to(dtype), v.to(dtype)
            low.keys[l] = list(k.split(sizes, dim=1))
            low.values[l] = list(v.split(sizes, dim=1))
            low.positions[l] = list(p.split(sizes, dim=1))
        return low

    def chunk_entries(self, c: int) -> int:
        """Low-level entries per KV head of block ``c`` (the same in every layer)."""
        return int(self.positions[0][c].shape[1]) if self.positions and self.positions[0] else 0


@dataclass
class ReloadStats:
    chunks: list[int]  # the blocks reloaded, in document order
    scores: list[float]  # every block's share of the question's attention
    entries_per_head: int  # low-level entries brought back per KV head per layer
    bytes_moved: int  # host -> device
    seconds: float  # the listening pass, the ranking and the merge

    def to_dict(self) -> dict:
        return {
            "blocks": self.chunks,
            "entries_per_head": self.entries_per_head,
            "bytes_moved": self.bytes_moved,
            "seconds": round(self.seconds, 4),
        }


class Listen:
    """A pass state that cuts nothing: it sums each layer's attention from the last ``n_query`` tokens
    (the question) to the cached entries, per chunk of ``low``."""

    def __init__(self, cache, low: LowLevel, n_query: int):
        self.cache, self.low, self.n_query = cache, low, n_query
        self.starts = torch.tensor([a for a, _ in low.chunks], dtype=torch.long)
        self.ends = torch.tensor([b for _, b in low.chunks], dtype=torch.long)
        self.totals = torch.zeros(len(low.chunks), dtype=torch.float64)

    def after_attention(self, l: int, query: torch.Tensor, scaling: float) -> None:
        from .kernels import observation_scores

        layer = self.cache.layers[l]
        g = query.shape[1] // layer.num_kv_heads
        mass = torch.zeros(len(self.low.chunks), dtype=torch.float64)
        for group in layer.head_groups():
            n = group.keys.shape[1] - self.n_query
            q = query[0, group.start * g : group.stop * g]
            att = observation_scores(q, group.keys, scaling, n).double().cpu()  # [g, n]
            pos = group.positions[:, :n].cpu()
            c = torch.searchsorted(self.starts, pos.reshape(-1), right=True) - 1
            inside = (c >= 0) & (pos.reshape(-1) < self.ends[c.clamp(min=0)])
            mass.index_add_(0, c[inside], att.reshape(-1)[inside])
        total = float(mass.sum())
        if total > 0:
            self.totals += mass / total


def reload_entries(word: str, doc_tokens: int) -> int:
    """A reload budget word (``8%``, ``256``, ``full``) as low-level entries per KV head for a document of
    ``doc_tokens`` (as much as the document, or more, is all of it)."""
    from .budget import parse_budget

    n = parse_budget(word).resolve(doc_tokens)
    return doc_tokens if n is None else n


def choose_chunks(scores: list[float], sizes: list[int], budget: int) -> list[int]:
    """The chunks to reload: the first and the last always, then by score while ``sizes`` fit ``budget``."""
    n = len(scores)
    if n == 0:
        return []
    chosen = {0, n - 1}
    used = sum(sizes[c] for c in chosen)
    for c in sorted(range(n), key=lambda i: (-scores[i], i)):
        if c in chosen:
            continue
        if used + sizes[c] > budget:
            continue
        chosen.add(c)
        used += sizes[c]
    return sorted(chosen)


def _heads(layer):
    """Per KV head: (keys [n, d], values [n, d], positions [n], scores [n]) of a layer, either layout."""
    if getattr(layer, "ragged", False):
        return [layer.head(h) for h in range(layer.num_kv_heads)]
    return [(layer.keys[0, h], layer.values[0, h], layer.positions[h], layer.scores[h]) for h in range(layer.num_kv_heads)]


def merged_cache(cache, low: LowLevel, chunks: list[int]):
    """A ragged :class:`~dynkv_cli.cache.CompressedCache`: ``cache``'s entries plus the low level of ``chunks``
    (see the module doc). Returns ``(cache, bytes moved to the device)``."""
    from .cache import CompressedCache

    out = CompressedCache(len(cache.layers), ragged=True)
    out.prefix_len, out.next_pos, out.compactions = cache.prefix_len, cache.next_pos, cache.compactions
    moved = 0
    for l, (layer, new) in enumerate(zip(cache.layers, out.layers)):
        ks, vs, ps, ss, lens = [], [], [], [], []
        for h, (k, v, p, s) in enumerate(_heads(layer)):
            dev = k.device
            add_k = [low.keys[l][c][h].to(dev, non_blocking=True) for c in chunks]
            add_v = [low.values[l][c][h].to(dev, non_blocking=True) for c in chunks]
            add_p = [low.positions[l][c][h].to(dev, non_blocking=True) for c in chunks]
            moved += sum(t.numel() * t.element_size() for t in (*add_k, *add_v, *add_p))
            all_p = torch.cat([p, *add_p])
            order = torch.argsort(all_p, stable=True)  # the compressed entry first where a position is in both
            sorted_p = all_p[order]
            first = torch.ones_like(sorted_p, dtype=torch.bool)
            first[1:] = sorted_p[1:] != sorted_p[:-1]
            take = order[first]
            ks.append(torch.cat([k, *add_k])[take])
            vs.append(torch.cat([v, *add_v])[take])
            ps.append(sorted_p[first])
            ss.append(torch.cat([s.float(), *(torch.zeros(t.numel(), device=dev) for t in add_p)])[take])
            lens.append(int(take.numel()))
        new.keys, new.values = torch.cat(ks), torch.cat(vs)
        new.positions, new.scores, new.lens = torch.cat(ps), torch.cat(ss), lens
        new.is_initialized, new.device = True, new.keys.device
        new.dtype = new.keys.dtype
    return out, moved


def reload(engine, doc, question: str, budget: int):
    """``doc`` with the low level of the chunks the question attends to most brought back (a new
    :class:`~dynkv_cli.engine.CompressedDocument`; ``doc`` itself is unchanged) and the
    :class:`ReloadStats`. ``budget``: low-level entries per KV head per layer to bring back."""
    from dataclasses import replace

    from .prompt import prompt_ids

    low = doc.low_level
    if doc.cache.compactions:  # positions were remapped: the low level's no longer match
        raise UsageError(
            "selective reload does not work on a document read in compact mode (longer than the model's "
            "positions); ask without --reload"
        )
    if low is None:
        raise UsageError("this document was read without a low level: compress it with a reload budget")
    t0 = time.perf_counter()
    cache = doc.cache
    suffix = prompt_ids(engine.lm.tokenizer, doc.prompt, question).suffix
    lengths, pos0 = cache.lengths(), cache.next_pos
    listen = Listen(cache, low, len(suffix))
    try:
        with torch.inference_mode():
            engine._forward(suffix, cache, listen)
    finally:
        cache.truncate(lengths)
        cache.next_pos = pos0
    scores = [float(x) for x in listen.totals]
    sizes = [low.chunk_entries(c) for c in range(len(low.chunks))]
    chosen = choose_chunks(scores, sizes, budget)
    with torch.inference_mode():
        merged, moved = merged_cache(cache, low, chosen)
    stats = ReloadStats(chosen, scores, sum(sizes[c] for c in chosen), moved, time.perf_counter() - t0)
    new_stats = replace(doc.stats, kept_per_layer=merged.kept_per_layer(), bytes_used=merged.bytes_used())
    return replace(doc, cache=merged, stats=new_stats), stats
