"""Settings for the engine: what to compress with (method, budget, chunk) and how to generate."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .budget import Budget, parse_budget
from .errors import UsageError
from .methods import MethodSpec, parse_method


@dataclass
class GenerationSettings:
    """Decoding: greedy when ``temperature == 0``; stop on EOS, a stop string or ``max_new_tokens``.

    ``repetition_guard``: ``{ngram: N, repeats: R}`` stops an answer whose tail is ``R`` back-to-back
    copies of a span of ``N`` or more tokens (stop reason ``repetition``; the answer keeps the span
    once), see :mod:`dynkv_cli.repetition`. None: off. A mapping may leave keys out (defaults 8, 3).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    repetition_guard: dict | None = None

    def validate(self) -> GenerationSettings:
        if self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be at least 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise UsageError(f"temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1] (got {self.top_p})")
        from .repetition import guard_settings

        self.repetition_guard = guard_settings(self.repetition_guard)
        return self


#: retention keys of caches and profiles written before methods owned their settings -> today's names
_LEGACY_NAMES = {"pyramid_beta": "beta", "adakv_alpha": "alpha"}


@dataclass
class CompressionSettings:
    """What to compress with: a method word, a budget, a chunk size and the method's own settings.

    method: ``dynamickv``, ``snapkv+mix``, ``dynamickv+adakv``... (:func:`~dynkv_cli.methods.parse_method`).
    budget: a :class:`~dynkv_cli.budget.Budget`; a word (``1.7%``, ``128``, ``512MiB``) or an int is
        parsed here, once, and the rest of the library passes the value on.
    chunk_size: tokens per prefill chunk (None: 1024 on CPU, 4096 on GPU).
    retention: the method's settings by name (``r_min``, ``window``, ``alpha``...); names of other
        methods are ignored, unknown names are an error. ``spec`` holds them parsed, per part.
    """

    method: str = "dynamickv"
    budget: Budget | str | int = "1.7%"
    chunk_size: int | None = None
    retention: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> CompressionSettings:
        """Parse the budget word (once) and the method with its settings; raise :class:`UsageError` if wrong."""
        if not isinstance(self.budget, Budget):
            self.budget = parse_budget(self.budget)
        self.spec: MethodSpec = parse_method(self.method, self.retention)
        self.retention = self.spec.retention()  # every setting of this method, defaults filled in
        if self.chunk_size is not None and self.chunk_size < 1:
            raise UsageError(f"chunk size must be at least 1 (got {self.chunk_size})")
        return self

    def to_dict(self) -> dict:
        """JSON-ready: the budget as its word, the retention as every part's settings."""
        return {
            "method": self.method,
            "budget": str(self.budget),
            "chunk_size": self.chunk_size,
            "retention": self.spec.retention(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> CompressionSettings:
        """Read :meth:`to_dict`'s mapping back (also the one caches written before today's names hold)."""
        d = dict(data)
        ret = {_LEGACY_NAMES.get(k, k): v for k, v in dict(d.pop("retention", None) or {}).items()}
        method = str(d.get("method", "dynamickv"))
        for flag, part in (("head_adaptive", "adakv"), ("mix", "mix")):
            if ret.pop(flag, False) and part not in method.split("+"):
                method += f"+{part}"
        d["method"] = method
        return dataclass_from_dict(cls, {**d, "retention": ret}, "settings")


def dataclass_from_dict(cls, data: dict, what: str):
    """Build a settings dataclass from a mapping; unknown keys are an error naming the valid ones."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UsageError(f"unknown {what} key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}")
    return cls(**data)
