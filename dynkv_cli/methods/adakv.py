"""AdaKV (arXiv 2407.11550): heads of a layer compete for the layer's budget.

The top ``G * B`` of the layer's concatenated head scores give each head its count, then a safeguard
pulls every count toward the uniform share: ``b_h = (1 - a) b_h + a B`` (``a = 0.2``). Heads then keep
different numbers of entries, which saves memory only with ragged storage and attention
(:class:`~dynkv_cli.cache.RaggedLayer` and the ragged decode kernel), not with masks.
"""

from __future__ import annotations

import torch

from .base import Method
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


class AdaKVMethod(Method):
    name = "adakv"
    head_adaptive = True
