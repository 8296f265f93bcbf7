"""H2O (arXiv 2306.14048): heavy hitters by the attention each key received from *all* queries.

Scores accumulate chunk by chunk: every query of the chunk observes (blockwise, never ``N x N``), the
mass a key receives is added to what it had already gathered, and the most recent ``window`` tokens
are always kept.
"""

from .base import Method


class H2OMethod(Method):
    name = "h2o"
    wants_probe = False
    observes_all_queries = True

    @property
    def pinned_window(self) -> int:
        return self.settings.window

    def score(self, c):
        return c.previous + c.attention
