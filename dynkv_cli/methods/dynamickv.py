"""DynamicKV (arXiv 2412.14838): task-aware, layer-adaptive budgets.

Each layer first keeps its top ``r_max * B`` per KV head. Every ``m`` layers (and at the last layer)
a progressive update ranks the stored scores of layers ``0..l`` together, counts how many of the
global top ``B * G * (l + 1)`` fall in each layer, and shares the budget available to those layers
(``T = B * L`` minus what the later layers still hold) in proportion to those counts, with
largest-remainder rounding so the shares add up exactly, clamped to ``[r_min * B, current size]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UsageError
from .base import Method, ObservedSettings, ceil_int


def apportion(total: int, weights: list[float], lo: list[int], hi: list[int]) -> list[int]:
    """Integers ``x`` with ``lo <= x <= hi``, ``sum(x) == clamp(total, sum(lo), sum(hi))``, proportional to weights.

    Water-filling: find ``lam`` with ``sum(clamp(lam * w, lo, hi)) == total``; layers that hit a bound
    give their surplus to the layers that can still take it (zero-weight layers last, by their room).
    The fractional parts are rounded by largest remainder, so the sum is exact.
    """
    n = len(weights)
    assert len(lo) == len(hi) == n and all(a <= b for a, b in zip(lo, hi))
    if total >= sum(hi):
        return list(hi)
    if total <= sum(lo):
        return list(lo)
    w = [max(0.0, float(x)) for x in weights]
    if sum(w) <= 0:
        w = [float(h - l) for l, h in zip(lo, hi)]

    def fill(lam: float) -> list[float]:
        return [min(float(h), max(float(l), lam * wi)) for wi, l, h in zip(w, lo, hi)]

    cap_pos = sum(h if wi > 0 else l for wi, l, h in zip(w, lo, hi))
    if cap_pos >= total:
        a, b = 0.0, max(h / wi for wi, h in zip(w, hi) if wi > 0)
        for _ in range(200):
            mid = (a + b) / 2
            if sum(fill(mid)) < total:
                a = mid
            else:
                b = mid
        real = fill(b)
    else:  # weighted layers are full; the rest goes to zero-weight layers by their room
        real = [float(h) if wi > 0 else float(l) for wi, l, h in zip(w, lo, hi)]
        room = [(h - l) if wi <= 0 else 0 for wi, l, h in zip(w, lo, hi)]
        left = total - sum(real)
        real = [r + left * rm / sum(room) for r, rm in zip(real, room)]
    x = [min(h, max(l, math.floor(r + 1e-9))) for r, l, h in zip(real, lo, hi)]
    rest = total - sum(x)
    order = sorted(range(n), key=lambda j: (-(real[j] - x[j]), j))
    while rest > 0:
        moved = False
        for j in order:
            if rest == 0:
                break
            if x[j] < hi[j]:
                x[j] += 1
                rest -= 1
                moved = True
        if not moved:
            break
    return x


def progressive_counts(
    scores: list[torch.Tensor],
    pinned: list[int],
    available: int,
    budget: int,
    num_kv_heads: int,
    floor: int,
) -> list[int]:
    """One DynamicKV update over layers ``0..l``.

    Args:
        scores: per layer ``[G, n_j]`` stored scores of its kept entries; the ``pinned[j]`` pinned entries
            of a layer (the observation window) must already be ``-inf`` so they are not ranked.
        pinned: entries per head each layer must keep whatever happens (the window).
        available: tokens per KV head that layers ``0..l`` may hold together.
        budget: ``B``.
        floor: ``r_min * B`` (0 for none).

    Returns:
        the new count per head of each layer ``j <= l`` (pinned entries included), never above its size.
    """
    l1 = len(scores)
    sizes = [s.shape[-1] for s in scores]
    flat = torch.cat([s.reshape(-1) for s in scores])
    finite = torch.isfinite(flat) | (flat == float("inf"))
    rankable = int((flat > float("-inf")).sum())
    k = min(budget * num_kv_heads * l1, rankable)
    counts = [0.0] * l1
    if k > 0:
        top = torch.topk(flat.masked_fill(~finite, float("-inf")), k).indices
        layer_of = torch.repeat_interleave(
            torch.arange(l1, device=flat.device),
            torch.tensor([s.numel() for s in scores], device=flat.device),
        )
        counts = torch.bincount(layer_of[top], minlength=l1).tolist()
    lo = [min(sizes[j], max(pinned[j], floor)) for j in range(l1)]
    extra = apportion(
        available - sum(pinned),
        counts,
        [x - p for x, p in zip(lo, pinned)],
        [s - p for s, p in zip(sizes, pinned)],
    )
    return [p + e for p, e in zip(pinned, extra)]


@dataclass
class DynamicKVSettings(ObservedSettings):
    """DynamicKV's own knobs, besides how it observes (:class:`ObservedSettings`).

    r_max: a layer keeps at most ``r_max * B`` per KV head before the update shares the budget.
    r_min: a layer never falls below ``r_min * B`` (0: it may fall to its pinned window).
    update_interval: the progressive update runs every ``m`` layers (and at the last layer).
    normalize: divide each layer's scores by their mean before the global ranking. Attention mass is
        not comparable across layers (a layer that spreads its attention scores low everywhere and
        loses every vote); normalised, a layer competes with how much its best entries stand out.
    """

    r_max: float = 10.0
    r_min: float = 0.0
    update_interval: int = 4
    normalize: bool = False

    def validate(self):
        super().validate()
        if self.update_interval < 1:
            raise UsageError(f"update_interval must be at least 1 (got {self.update_interval})")
        if self.r_max < 1:
            raise UsageError(f"r_max must be at least 1 (got {self.r_max})")
        if not 0 <= self.r_min <= 1:
            raise UsageError(f"r_min must be between 0 and 1 (got {self.r_min})")
        return self


class DynamicKVMethod(Method):
    name = "dynamickv"
    Settings = DynamicKVSettings

    def capacity(self, layer_idx: int) -> int:
        return ceil_int(self.settings.r_max * self.budget) + self.pinned_window

    def is_update_layer(self, layer_idx: int) -> bool:
        m = self.settings.update_interval
        return (layer_idx + 1) % m == 0 or layer_idx == self.num_layers - 1

    def reallocate(self, layer_idx, sizes, scores, pinned, unit: int = 1):
        """New counts for layers ``0..l``.

        ``sizes``: kept entries of every layer (all ``L``); ``scores``: layers ``0..l``. With ``unit == 1``
        counts are per KV head (``scores`` ``[G, n]``); with ragged layers ``unit == G`` and counts are
        per layer over all heads (``scores`` ``[1, G * n]``).
        """
        if not self.is_update_layer(layer_idx):
            return None
        total = self.budget * unit * self.num_layers
        available = total - sum(sizes[layer_idx + 1 :])
        floor = ceil_int(self.settings.r_min * self.budget) * unit if self.settings.r_min > 0 else 0
        heads = self.num_kv_heads if unit == 1 else 1
        if self.settings.normalize:
            scores = [_by_mean(s) for s in scores]
        return progressive_counts(scores, pinned, available, self.budget * unit, heads, floor)


def _by_mean(scores: torch.Tensor) -> torch.Tensor:
    """Scores divided by the mean of the finite ones (pinned ``-inf`` entries stay ``-inf``)."""
    finite = torch.isfinite(scores)
    if not bool(finite.any()):
        return scores
    mean = scores[finite].mean().clamp(min=1e-12)
    return torch.where(finite, scores / mean, scores)
