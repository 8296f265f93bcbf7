"""The method interface: what a compression method decides, and nothing else.

The engine owns the loop, the cache owns memory, the attention function owns masks. A method is one
object built for one document (its budget and the model's shape known) that answers:

* :attr:`Method.observation` -- which queries observe the candidates: ``none`` (the method scores
  without attention), ``probe`` (the question/instruction appended after each chunk), ``tail`` (the
  chunk's last ``window`` tokens, kept while their chunk is cut) or ``all`` (every chunk query);
* :meth:`Method.score` -- one score per candidate entry of a layer and KV head (higher is kept);
* :meth:`Method.capacity` -- how many entries per KV head a layer keeps right after scoring;
* :meth:`Method.head_counts` -- how a layer's entries are shared between its KV heads (equal shares
  here; AdaKV lets heads compete);
* :meth:`Method.reallocate` -- optionally, new per-layer counts for layers ``0..l`` after layer ``l``
  (DynamicKV's progressive update). Layers only shrink.

A method owns its settings: ``Settings`` is its own dataclass (what a profile's ``retention:`` holds
for it). Wrappers (:class:`Wrapper`) change one answer of any method they wrap: MixKV its scores,
AdaKV its head shares. See ``docs/methods.md`` for how to add one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UsageError
from ..kernels import pool_scores
from ..spans import SPANS, span_max

POOLINGS = ("max", "avg", "none")
OBSERVATIONS = ("probe", "tail")


@dataclass
class NoSettings:
    """A method without settings."""

    def validate(self) -> NoSettings:
        return self


@dataclass
class ObservedSettings:
    """Settings of a method that scores entries by the attention of observation queries (SnapKV's way).

    observation: ``probe`` (the task's question/instruction observes each chunk; its keys never stay)
        or ``tail`` (the chunk's last ``window`` tokens observe and are kept with their chunk).
    window: the tail window ``w`` (with ``observation: tail``).
    pooling / kernel: scores pooled over neighbours in the original document (``max``, ``avg``, ``none``;
        an odd kernel), so a kept token brings its neighbours.
    span: ``none``, ``digits`` or ``word``: the chunk's tokens of one number (or one word) share the
        highest pooled score among them, so they are kept or dropped together (:mod:`dynkv_cli.spans`).
    probe_window: with a probe, its last ``probe_window`` tokens observe a second time on their own
        (0: not): an entry scores the larger of the whole probe's and the last tokens' mean attention.
        The last tokens sit where the answer begins (the chat template's assistant turn), whose
        attention finds the answer's own tokens; the whole probe finds the question's words.
    """

    observation: str = "probe"
    window: int = 8
    pooling: str = "max"
    kernel: int = 7
    span: str = "none"
    probe_window: int = 0

    def validate(self):
        if self.pooling not in POOLINGS:
            raise UsageError(f"pooling {self.pooling!r} is not one of {', '.join(POOLINGS)}")
        if self.observation not in OBSERVATIONS:
            raise UsageError(f"observation {self.observation!r} is not one of {', '.join(OBSERVATIONS)}")
        if self.window < 1:
            raise UsageError(f"window must be at least 1 (got {self.window})")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise UsageError(f"pooling kernel must be an odd number >= 1 (got {self.kernel})")
        if self.probe_window < 0:
            raise UsageError(f"probe_window must be >= 0 (got {self.probe_window})")
        if self.span not in SPANS:
            raise UsageError(f"span {self.span!r} is not one of {', '.join(SPANS)}")
        return self


@dataclass
class Candidates:
    """What a method sees of one layer's candidates (kept entries + the chunk just read), per KV head.

    attention: ``[G, n]`` fp32 observation attention mass (None when ``observation`` is ``none``).
    positions: ``[G, n]`` original positions, ascending per head.
    previous: ``[G, n]`` the scores stored with the entries (zeros for the ``n_new`` new ones, last).
    keys, values: ``[G, n, d]`` the candidates' keys (after RoPE) and values.
    spans: ``[G, n]`` span ids (entries of one span share a score, :mod:`dynkv_cli.spans`), or None.
    """

    layer_idx: int
    attention: torch.Tensor | None
    positions: torch.Tensor
    previous: torch.Tensor
    n_new: int
    keys: torch.Tensor
    values: torch.Tensor
    spans: torch.Tensor | None = None


class Method:
    """A compression method. Subclasses set ``name`` and ``Settings`` and override what they decide."""

    name = "base"
    Settings: type = ObservedSettings
    #: heads of a layer keep different numbers of entries (ragged storage); set by AdaKV's wrapper
    ragged = False
    #: keeps every entry whatever the budget (the ``full`` reference)
    keeps_all = False

    def __init__(self, settings=None, budget: int = 0, num_layers: int = 1, num_kv_heads: int = 1):
        """``budget``: average document tokens kept per layer per KV head (``B``)."""
        self.settings = (settings if settings is not None else self.Settings()).validate()
        self.budget = int(budget)
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads

    @property
    def observation(self) -> str:
        """``none``, ``probe``, ``tail`` or ``all`` (see the module docstring)."""
        return getattr(self.settings, "observation", "none")

    @property
    def pinned_window(self) -> int:
        """Entries at the end of the current chunk that stay whatever their score (tail observation)."""
        return self.settings.window if self.observation == "tail" else 0

    def score(self, c: Candidates) -> torch.Tensor:
        """Scores ``[G, n]`` fp32 of the candidates of one layer; higher = more worth keeping.

        Default: the observation attention pooled over neighbours in the original document, then
        shared within spans when the settings ask for it.
        """
        scores = pool_scores(c.attention, c.positions, self.settings.kernel, self.settings.pooling)
        if c.spans is not None and self.settings.span != "none":
            scores = span_max(scores, c.spans)
        return scores

    @property
    def span_mode(self) -> str:
        """How the engine should mark the chunk's spans for :meth:`score` (``none``: it need not)."""
        return getattr(self.settings, "span", "none")

    @property
    def probe_window(self) -> int:
        """How many of the probe's last tokens observe (0: all)."""
        return getattr(self.settings, "probe_window", 0)

    def capacity(self, layer_idx: int) -> int:
        """Entries per KV head the layer keeps right after scoring (pinned window included)."""
        return self.budget

    def head_counts(self, scores: list[torch.Tensor], pinned: list[int], total: int) -> list[int]:
        """How many of the layer's ``total`` entries each KV head keeps (default: equal shares).

        ``scores[h]``: head ``h``'s candidate scores (pinned entries ``-inf``); ``pinned[h]``: its entries
        that stay whatever happens. Without ragged storage every head must get the same count.
        """
        share = total // max(1, len(scores))
        return [min(share, int(s.numel())) for s in scores]

    def is_update_layer(self, layer_idx: int) -> bool:
        """True when :meth:`reallocate` may move budget after this layer (the engine skips the work otherwise)."""
        return False

    def reallocate(
        self, layer_idx: int, sizes: list[int], scores: list[torch.Tensor], pinned: list[int], unit: int = 1
    ) -> list[int] | None:
        """New counts for layers ``0..layer_idx`` or None (default: no cross-layer update).

        Counts are per KV head (``unit == 1``) or, for ragged layers, per layer over all heads (``unit == G``).
        """
        return None


class Wrapper(Method):
    """A method around another one: every answer is the inner method's unless the wrapper overrides it.

    ``Settings`` of a wrapper holds only its own knobs; the inner method keeps its own.
    """

    Settings: type = NoSettings
    #: the inner method must score with attention (``observation`` not ``none``)
    needs_attention = False

    def __init__(self, inner: Method, settings=None):
        self.inner = inner
        self.settings = (settings if settings is not None else self.Settings()).validate()
        self.budget, self.num_layers, self.num_kv_heads = inner.budget, inner.num_layers, inner.num_kv_heads
        self.ragged = inner.ragged
        self.keeps_all = inner.keeps_all

    @property
    def observation(self) -> str:
        return self.inner.observation

    @property
    def pinned_window(self) -> int:
        return self.inner.pinned_window

    @property
    def span_mode(self) -> str:
        return self.inner.span_mode

    @property
    def probe_window(self) -> int:
        return self.inner.probe_window

    def score(self, c: Candidates) -> torch.Tensor:
        return self.inner.score(c)

    def capacity(self, layer_idx: int) -> int:
        return self.inner.capacity(layer_idx)

    def head_counts(self, scores, pinned, total):
        return self.inner.head_counts(scores, pinned, total)

    def is_update_layer(self, layer_idx: int) -> bool:
        return self.inner.is_update_layer(layer_idx)

    def reallocate(self, layer_idx, sizes, scores, pinned, unit: int = 1):
        return self.inner.reallocate(layer_idx, sizes, scores, pinned, unit)


def ceil_int(x: float) -> int:
    return int(math.ceil(x - 1e-9))
