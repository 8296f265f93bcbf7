"""AdaKV (arXiv 2407.11550): heads of a layer compete for the layer's budget.

The top ``G * B`` of the layer's concatenated head scores give each head its count, then a safeguard
pulls every count toward the uniform share: ``b_h = (1 - a) b_h + a B`` (``a = 0.2``). Heads then keep
different numbers of entries, which saves memory only with ragged storage and attention
(:class:`~dynkv_cli.cache.RaggedLayer` and the ragged decode kernel), not with masks.

It wraps any scoring method (``snapkv+adakv``, ``dynamickv+adakv``); ``adakv`` alone is ``snapkv+adakv``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UsageError
from .base import Wrapper
from .dynamickv import apportion


def head_counts(scores: list[torch.Tensor], pinned: list[int], total: int, alpha: float) -> list[int]:
    """How many entries each head keeps when the heads of a layer share ``total``.

    Args:
        scores: per head ``[n_h]`` scores; pinned entries already ``-inf`` (they are not ranked).
        pinned: per head, entries kept whatever happens.
        total: entries the layer keeps over all heads (pinned included).
        alpha: safeguard weight toward the uniform share.
    """
    sizes = [int(s.numel()) for s in scores]
    if total >= sum(sizes):
        return sizes
    G = len(scores)
    free = max(0, total - sum(pinned))
    flat = torch.cat(scores)
    k = min(free, int((flat > float("-inf")).sum()))
    votes = [0.0] * G
    if k > 0:
        head_of = torch.repeat_interleave(torch.arange(G, device=flat.device), torch.tensor(sizes, device=flat.device))
        votes = torch.bincount(head_of[torch.topk(flat, k).indices], minlength=G).tolist()
    share = free / G
    weights = [(1 - alpha) * v + alpha * share for v in votes]
    extra = apportion(free, weights, [0] * G, [n - p for n, p in zip(sizes, pinned)])
    return [p + e for p, e in zip(pinned, extra)]


@dataclass
class AdaKVSettings:
    """``alpha``: the safeguard's weight toward the uniform share per head (0: pure competition)."""

    alpha: float = 0.2

    def validate(self):
        if not 0 <= self.alpha <= 1:
            raise UsageError(f"alpha must be between 0 and 1 (got {self.alpha})")
        return self


class HeadAdaptive(Wrapper):
    """``+adakv``: the heads of every layer compete for the layer's entries (any scoring method)."""

    name = "adakv"
    Settings = AdaKVSettings
    needs_attention = True

    def __init__(self, inner, settings=None):
        super().__init__(inner, settings)
        self.ragged = True

    def head_counts(self, scores, pinned, total):
        return head_counts(scores, pinned, total, self.settings.alpha)
