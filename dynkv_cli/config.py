"""Settings for the engine: retention preset, compression and generation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .errors import UsageError

POOLINGS = ("max", "avg", "none")
OBSERVATIONS = ("probe", "tail")


@dataclass
class RetentionSettings:
    """How tokens are scored and how budgets move between layers (ALGORITHMS.md sections 1-3).

    window: observation window ``w`` for ``observation="tail"`` (the last ``w`` chunk tokens observe and
        are kept while their chunk is compressed); with a probe, the probe observes.
    pooling / kernel: pooling of scores over neighbours in the original document.
    r_max / r_min: per-layer cap and floor as multiples of the average budget ``B`` (DynamicKV).
    update_interval: DynamicKV's progressive update every ``m`` layers (the last layer always updates).
    observation: ``probe`` (the task's question/instruction after each chunk; its keys never stay)
        or ``tail`` (SnapKV-style window).
    sink_tokens: StreamingLLM's attention sinks (first document tokens always kept).
    pyramid_beta: PyramidKV's ratio between the largest and smallest layer budget.
    mix: MixKV mixing of importance and diversity (any method that scores with attention).
    head_adaptive: DynamicKV heads of a layer compete for the layer's budget (AdaKV-style, ragged storage).
    adakv_alpha: AdaKV's safeguard toward the uniform share per head.
    """

    window: int = 8
    pooling: str = "max"
    kernel: int = 7
    r_max: float = 10.0
    r_min: float = 0.0
    update_interval: int = 4
    observation: str = "probe"
    sink_tokens: int = 4
    pyramid_beta: float = 20.0
    mix: bool = False
    head_adaptive: bool = False
    adakv_alpha: float = 0.2

    def validate(self) -> RetentionSettings:
        if self.pooling not in POOLINGS:
            raise UsageError(f"pooling {self.pooling!r} is not one of {', '.join(POOLINGS)}")
        if self.observation not in OBSERVATIONS:
            raise UsageError(f"observation {self.observation!r} is not one of {', '.join(OBSERVATIONS)}")
        if self.window < 1:
            raise UsageError(f"window must be at least 1 (got {self.window})")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise UsageError(f"pooling kernel must be an odd number >= 1 (got {self.kernel})")
        if self.update_interval < 1:
            raise UsageError(f"update_interval must be at least 1 (got {self.update_interval})")
        if self.r_max < 1:
            raise UsageError(f"r_max must be at least 1 (got {self.r_max})")
        if not 0 <= self.r_min <= 1:
            raise UsageError(f"r_min must be between 0 and 1 (got {self.r_min})")
        if not 0 <= self.adakv_alpha <= 1:
            raise UsageError(f"adakv_alpha must be between 0 and 1 (got {self.adakv_alpha})")
        if self.sink_tokens < 0:
            raise UsageError(f"sink_tokens must be >= 0 (got {self.sink_tokens})")
        return self


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


@dataclass
class CompressionSettings:
    """What to compress with: method name, budget word, chunk size (None: 1024 on CPU, 4096 on GPU)."""

    method: str = "dynamickv"
    budget: str = "1.7%"
    chunk_size: int | None = None
    retention: RetentionSettings = field(default_factory=RetentionSettings)

    def validate(self) -> CompressionSettings:
        from .budget import parse_budget
        from .methods import METHODS

        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}; choose one of {', '.join(sorted(METHODS))}")
        parse_budget(self.budget)
        if self.chunk_size is not None and self.chunk_size < 1:
            raise UsageError(f"chunk size must be at least 1 (got {self.chunk_size})")
        self.retention.validate()
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def dataclass_from_dict(cls, data: dict, what: str):
    """Build a settings dataclass from a mapping; unknown keys are an error naming the valid ones."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UsageError(f"unknown {what} key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}")
    return cls(**data)
