"""The method interface: score these candidates, and how many each layer keeps.

The engine owns the loop, the cache owns memory, the attention function owns masks. A method answers:

* :meth:`Method.score` -- one score per candidate entry of a layer and KV head (higher is kept);
* :meth:`Method.capacity` -- how many entries per KV head the layer keeps right after scoring;
* :meth:`Method.reallocate` -- optionally, new per-layer counts for layers ``0..l`` after layer ``l``
  (DynamicKV's progressive update). Layers only shrink.
"""

from __future__ import annotations

import math

import torch

from ..config import RetentionSettings
from ..kernels import pool_scores


class Method:
    name = "base"
    #: False: keep everything (no scoring, no selection).
    compresses = True
    #: True: the engine computes observation-window attention scores for :meth:`score`.
    uses_attention = True

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

    def score(
        self,
        layer_idx: int,
        attention: torch.Tensor | None,
        positions: torch.Tensor,
        previous: torch.Tensor,
        n_new: int,
    ) -> torch.Tensor:
        """Scores of the candidates of one layer.

        Args:
            attention: ``[G, n]`` fp32 observation-window attention mass (None if ``uses_attention`` is False).
            positions: ``[G, n]`` original positions, ascending per head.
            previous: ``[G, n]`` the scores stored with the entries (zeros for the ``n_new`` new ones, last).
            n_new: how many candidates (the last ones) are the chunk just read.

        Returns:
            ``[G, n]`` fp32, higher = more worth keeping. Default: the attention pooled over neighbours.
        """
        return pool_scores(attention, positions, self.settings.kernel, self.settings.pooling)

    def capacity(self, layer_idx: int) -> int:
        """Entries per KV head the layer keeps right after scoring (pinned window included)."""
        return self.budget

    def reallocate(self, layer_idx: int, sizes: list[int], scores: list[torch.Tensor], pinned: list[int]):
        """New per-head counts for layers ``0..layer_idx`` or None (default: no cross-layer update)."""
        return None


def ceil_int(x: float) -> int:
    return int(math.ceil(x - 1e-9))
