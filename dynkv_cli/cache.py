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

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .errors import CacheFileError

FORMAT = "dynkv-cache/1"


class CompressedLayer(DynamicLayer):
    """One layer of the compressed cache. ``update`` appends; the engine selects and truncates."""

    def __init__(self, cache: CompressedCache):
        super().__init__()
        self._cache = cache
        self.positions: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        G, d = key_states.shape[1], key_states.shape[-1]
        self.keys = key_states.new_zeros(1, G, 0, d)
        self.values = value_states.new_zeros(1, G, 0, value_states.shape[-1])
        self.positions = torch.zeros(G, 0, dtype=torch.long, device=key_states.device)
        self.scores = torch.zeros(G, 0, dtype=torch.float32, device=key_states.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        pos = self._cache.new_positions(q)
        G = key_states.shape[1]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, pos.to(self.positions.device)[None, :].expand(G, q)], dim=1)
        self.scores = torch.cat([self.scores, self.scores.new_zeros(G, q)], dim=1)
        return self.keys, self.values

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.length

    def select(self, index: torch.Tensor, scores: torch.Tensor | None = None) -> None:
        """Keep entries ``index`` ([G, k], ascending per head) of every head; free the rest."""
        G, k = index.shape
        d_k, d_v = self.keys.shape[-1], self.values.shape[-1]
        self.keys = self.keys.gather(2, index[None, :, :, None].expand(1, G, k, d_k)).contiguous()
        self.values = self.values.gather(2, index[None, :, :, None].expand(1, G, k, d_v)).contiguous()
        self.positions = self.positions.gather(1, index)
        self.scores = scores if scores is not None else self.scores.gather(1, index)

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` entries (drops a question/answer appended after the document)."""
        if self.keys is None or n >= self.length:
            return
        self.keys = self.keys[:, :, :n].contiguous()
        self.values = self.values[:, :, :n].contiguous()
        self.positions = self.positions[:, :n].contiguous()
        self.scores = self.scores[:, :n].contiguous()

    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.positions, self.scores))


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
        off = [0]
        for n in self.lens:
            off.append(off[-1] + n)
        return torch.tensor(off, dtype=torch.long, device=self.keys.device)

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

    def __init__(self, num_layers: int, ragged: bool = False):
        layer_cls = RaggedLayer if ragged else CompressedLayer
        super().__init__(layers=[layer_cls(self) for _ in range(num_layers)])
        self.ragged = ragged
        self.pending_positions: torch.Tensor | None = None
        self.next_pos = 0
        self.prefix_len = 0
        self.compactions = 0

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
            if bool((delta != 0).any()):
                if self.ragged:  # [T, d] -> [1, 1, T, d]
                    layer.keys = rotate(layer.keys[None, None], delta[None])[0, 0]
                else:
                    layer.keys = rotate(layer.keys, delta)
                layer.positions = new
        self.compactions += 1

    # ---- files -------------------------------------------------------------------------------
    def save(self, path: str | Path, header: dict) -> None:
        """Write tensors to a safetensors file; ``header`` (JSON) names model, method, budget, document."""
        from safetensors.torch import save_file

        tensors = {}
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
            save_file(tensors, str(tmp), metadata={"dynkv": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu", dtype=None) -> tuple[CompressedCache, dict]:
        """Read a cache file written by :meth:`save`. Returns the cache and its header."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise CacheFileError(f"{path}: no such cache file")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = json.loads((f.metadata() or {}).get("dynkv", "{}"))
                if meta.get("format") != FORMAT:
                    raise CacheFileError(f"{path}: not a dynkv cache file (make one with `dynkv compress`)")
                cache = cls(int(meta["num_layers"]), ragged=bool(meta.get("ragged", False)))
                names = set(f.keys())
                for i, layer in enumerate(cache.layers):
                    if f"layer.{i}.keys" not in names:
                        continue
                    k = f.get_tensor(f"layer.{i}.keys")
                    v = f.get_tensor(f"layer.{i}.values")
                    if dtype is not None:
                        k, v = k.to(dtype), v.to(dtype)
                    if cache.ragged:
                        lens = f.get_tensor(f"layer.{i}.lens").tolist()
                        layer.lazy_initialization(k[None, None], v[None, None])
                        layer.keys, layer.values, layer.lens = k.to(device), v.to(device), lens
                    else:
                        layer.lazy_initialization(k[None], v[None])
                        layer.keys = k[None].to(device)
                        layer.values = v[None].to(device)
                    layer.positions = f.get_tensor(f"layer.{i}.positions").to(device)
                    layer.scores = f.get_tensor(f"layer.{i}.scores").to(device)
        except CacheFileError:
            raise
        except Exception as e:  # safetensors raises several types on a bad file
            raise CacheFileError(f"{path}: not a readable dynkv cache file ({type(e).__name__})") from e
        cache.next_pos = int(meta["next_pos"])
        cache.prefix_len = int(meta["prefix_len"])
        cache.compactions = int(meta.get("compactions", 0))
        return cache, meta
