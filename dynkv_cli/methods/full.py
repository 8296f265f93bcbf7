"""full: no compression. The reference for every accuracy figure."""

import sys

import torch

from .base import Method, NoSettings


class FullMethod(Method):
    name = "full"
    Settings = NoSettings
    keeps_all = True

    def score(self, c):
        return torch.zeros(c.positions.shape, dtype=torch.float32, device=c.positions.device)

    def capacity(self, layer_idx: int) -> int:
        return sys.maxsize
