"""StreamingLLM (arXiv 2309.17453): the first ``sink_tokens`` document tokens plus the most recent ones."""

from dataclasses import dataclass

import torch

from ..errors import UsageError
from .base import Method


@dataclass
class StreamingLLMSettings:
    """``sink_tokens``: the first document tokens, always kept (attention sinks)."""

    sink_tokens: int = 4

    def validate(self):
        if self.sink_tokens < 0:
            raise UsageError(f"sink_tokens must be >= 0 (got {self.sink_tokens})")
        return self


class StreamingLLMMethod(Method):
    name = "streamingllm"
    Settings = StreamingLLMSettings

    def score(self, c):
        s = c.positions.to(torch.float32).clone()
        s[:, : self.settings.sink_tokens] = float("inf")  # entries are sorted: the first are the sinks
        return s
