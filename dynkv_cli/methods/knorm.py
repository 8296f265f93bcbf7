"""KNorm (arXiv 2406.11430): every head keeps its keys with the smallest L2 norm.

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression": keys with a
small norm tend to draw much attention. No attention is computed and no probe observes: the score
is ``-||k||``.
"""

from .base import Method, NoSettings


class KNormMethod(Method):
    name = "knorm"
    Settings = NoSettings

    @property
    def observation(self) -> str:
        return "none"

    def score(self, c):
        return -c.keys.float().norm(dim=-1)
