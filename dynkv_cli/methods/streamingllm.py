"""StreamingLLM (arXiv 2309.17453): the first ``sink_tokens`` document tokens plus the most recent ones."""

import torch

from .base import Method


class StreamingLLMMethod(Method):
    name = "streamingllm"
    uses_attention = False

    def score(self, c):
        s = c.positions.to(torch.float32).clone()
        s[:, : self.settings.sink_tokens] = float("inf")  # entries are sorted: the first are the sinks
        return s
