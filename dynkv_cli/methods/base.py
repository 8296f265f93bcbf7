"""The method interface: score these candidates, and how many each layer keeps.

The engine owns the loop, the cache owns memory, the attention function owns masks. A method answers:

* :meth:`Method.score` -- one score per candidate entry of a layer and KV head (higher is kept);
* :meth:`Method.capacity` -- how many entries per KV head the layer keeps right after scoring;
* :meth:`Method.reallocate` -- optionally, new per-layer counts for layers ``0..l`` after layer ``l``
  (DynamicKV's progressive update). Layers only shrink.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import RetentionSettings
from ..kernels import pool_scores


@dataclass
class Candidates:
    """What a method sees of one layer's candidates (kept entries + the chunk just read), per KV head.

    attention: ``[G, n]`` fp32 observation attention mass (None if the method does not use attention).
    positions: ``[G, n]`` original positions, ascending per head.
    previous: ``[G, n]`` the scores stored with the entries (zeros for the ``n_new`` new ones, last).
    keys, values: ``[G, n, d]`` the candidates' keys (after RoPE) and values.
    """

    layer_idx: int
    attention: torch.Tensor | None
    positions: torch.Tensor
    previous: torch.Tensor
    n_new: int
    keys: torch.Tensor
    values: torch.Tensor


class Method:
    name = "base"
    #: False: keep everything (no scoring, no selection).
    compresses = True
    #: True: the engine computes observation-window attention scores for :meth:`score`.
    uses_attention = True
    #: True: the question/instruction probe observes (when ``observation: probe``).
    wants_probe = True
    #: True: every query of the chunk observes (H2O), instead of the probe or the tail window.
    observes_all_queries = False
    #: True: heads of a layer keep different numbers of entries (ragged storage, AdaKV-style).
    head_adaptive = False

    def __init__(self, settings: RetentionSettings, budget: int, num_layers: int, num_kv_heads: int):
        """``budget``: average document tokens kept per layer per KV head (``B``)."""
        self.settings = settings
        self.budget = int(budget)
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads

    @property
    def pinned_window(self) -> int:
        """Entries of the current chunk that observe and stay (tail observation only)."""
        return self.settings.window if self.settings.observation == "tail" else 0

    def score(self, c: Candidates) -> torch.Tensor:
        """Scores ``[G, n]`` fp32 of the candidates of one layer; higher = more worth keeping.

        Default: the observation attention pooled over neighbours in the original document.
        """
        return pool_scores(c.attention, c.positions, self.settings.kernel, self.settings.pooling)

    def capacity(self, layer_idx: int) -> int:
        """Entries per KV head the layer keeps right after scoring (pinned window included)."""
        return self.budget

    def is_update_layer(self, layer_idx: int) -> bool:
        """True when :meth:`reallocate` may move budget after this layer (the engine skips the work otherwise)."""
        return False

    def reallocate(
        self, layer_idx: int, sizes: list[int], scores: list[torch.Tensor], pinned: list[int], unit: int = 1
    ):
        """New counts for layers ``0..layer_idx`` or None (default: no cross-layer update).

        Counts are per KV head (``unit == 1``) or, for ragged layers, per layer over all heads (``unit == G``).
        """
        return None


def ceil_int(x: float) -> int:
    return int(math.ceil(x - 1e-9))
