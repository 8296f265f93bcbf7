"""PyramidKV (arXiv 2406.02069): SnapKV scores; per-layer budgets fall linearly from bottom to top.

With ``b = B - w``: ``min = b / beta``, ``max = 2b - min``, ``b_l = max - l (max - min) / (L - 1)``,
plus the window ``w`` (only when the tail window observes). Uniform when ``B <= w``.
"""

from dataclasses import dataclass

from ..errors import UsageError
from .base import Method, ObservedSettings


@dataclass
class PyramidKVSettings(ObservedSettings):
    """``beta``: ratio between the largest and the smallest layer budget."""

    beta: float = 20.0

    def validate(self):
        super().validate()
        if self.beta < 1:
            raise UsageError(f"beta must be at least 1 (got {self.beta})")
        return self


class PyramidKVMethod(Method):
    name = "pyramidkv"
    Settings = PyramidKVSettings

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        w, L, B = self.pinned_window, self.num_layers, self.budget
        b = B - w
        if b <= 0 or L == 1:
            self.schedule = [B] * L
        else:
            lo = b / self.settings.beta
            hi = 2 * b - lo
            self.schedule = [max(1, round(hi - l * (hi - lo) / (L - 1)) + w) for l in range(L)]

    def capacity(self, layer_idx: int) -> int:
        return self.schedule[layer_idx]
