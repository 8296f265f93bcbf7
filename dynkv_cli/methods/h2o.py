"""H2O (arXiv 2306.14048): heavy hitters by the attention each key received from *all* queries.

Scores accumulate chunk by chunk: every query of the chunk observes (blockwise, never ``N x N``), the
mass a key receives is added to what it had already gathered, and the most recent ``window`` tokens
are always kept.
"""

from dataclasses import dataclass

from ..errors import UsageError
from .base import Method


@dataclass
class H2OSettings:
    """``window``: the most recent tokens, always kept."""

    window: int = 8

    def validate(self):
        if self.window < 1:
            raise UsageError(f"window must be at least 1 (got {self.window})")
        return self


class H2OMethod(Method):
    name = "h2o"
    Settings = H2OSettings

    @property
    def observation(self) -> str:
        return "all"

    @property
    def pinned_window(self) -> int:
        return self.settings.window

    def score(self, c):
        return c.previous + c.attention
