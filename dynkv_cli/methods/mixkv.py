"""MixKV mixing (arXiv 2510.20707): importance and diversity, weighted by the head's redundancy.

Per KV head over the candidates:

* importance ``a_j``: the method's score;
* diversity ``div_j = -khat_j . mu`` with ``khat`` the unit keys and ``mu`` their mean, min-max scaled and
  rescaled so its mean equals the mean of ``a``;
* redundancy ``r = (N |mu|^2 - 1) / (N - 1)``: the mean pairwise cosine of the head's keys, computed
  online from the current candidates (not a table measured on another model);
* mixed score ``r * div + (1 - r) * a``.

It changes which tokens a head keeps, not how many. Infinite scores (pinned, sinks) stay infinite.
"""

from __future__ import annotations

import torch

from .base import Wrapper


def head_redundancy(keys: torch.Tensor) -> torch.Tensor:
    """``[G, n, d]`` keys -> ``[G]`` mean pairwise cosine similarity (0 for a single key)."""
    n = keys.shape[1]
    if n < 2:
        return keys.new_zeros(keys.shape[0], dtype=torch.float32)
    khat = torch.nn.functional.normalize(keys.float(), dim=-1)
    mu = khat.mean(dim=1)
    return ((n * (mu * mu).sum(-1) - 1) / (n - 1)).clamp(0.0, 1.0)


def mix_scores(scores: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Mix importance ``scores`` ``[G, n]`` with key diversity; ``keys`` ``[G, n, d]``."""
    if scores.shape[1] < 2:
        return scores
    finite = torch.isfinite(scores)
    a = torch.where(finite, scores, torch.zeros_like(scores))
    count = finite.sum(1, keepdim=True).clamp(min=1)
    a_mean = a.sum(1, keepdim=True) / count
    khat = torch.nn.functional.normalize(keys.float(), dim=-1)
    mu = khat.mean(dim=1, keepdim=True)  # [G, 1, d]
    div = -(khat * mu).sum(-1)  # [G, n]
    lo, hi = div.min(1, keepdim=True).values, div.max(1, keepdim=True).values
    div = (div - lo) / (hi - lo).clamp(min=1e-12)
    div = div * a_mean / div.mean(1, keepdim=True).clamp(min=1e-12)
    r = head_redundancy(keys)[:, None]
    mixed = r * div + (1 - r) * a
    return torch.where(finite, mixed, scores)


class Mix(Wrapper):
    """``+mix``: the inner method's scores mixed with key diversity (any method that scores with attention)."""

    name = "mix"
    needs_attention = True

    def score(self, c):
        return mix_scores(self.inner.score(c), c.keys)
