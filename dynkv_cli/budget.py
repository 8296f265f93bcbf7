"""Budget words: ``1.7%`` of the document's tokens, ``128`` tokens per layer per KV head, ``512MiB`` of cache.

All three resolve to ``B``, the average number of document tokens each layer keeps per KV head.
Memory words (``--max-cache 2GiB``) are read by :func:`parse_memory`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import BudgetError

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
#: A percentage budget that resolves to more tokens per layer than this is warned about: the cache is
#: no longer small (1.7% reaches it at about 480k document tokens, about 2 MB of text).
PERCENT_WARN_TOKENS = 8192
_HELP = "use a percentage of the document (1.7%), tokens per layer (128) or cache bytes (512MiB, 2GB)"


@dataclass(frozen=True)
class Budget:
    kind: str  # "percent" | "tokens" | "bytes" | "full"
    value: float

    def __str__(self) -> str:
        if self.kind == "percent":
            return f"{self.value:g}%"
        if self.kind == "bytes":
            return f"{int(self.value)}B"
        if self.kind == "full":
            return "full"
        return str(int(self.value))

    def resolve(self, doc_tokens: int | None, bytes_per_token: int | None = None) -> int | None:
        """Tokens per layer per KV head. ``None`` means keep everything.

        Args:
            doc_tokens: tokens in the document (needed for a percentage).
            bytes_per_token: cache bytes one document token costs across all layers and KV heads
                (keys, values and bookkeeping); needed for a byte budget.
        """
        if self.kind == "full":
            return None
        if self.kind == "tokens":
            b = int(self.value)
        elif self.kind == "percent":
            if doc_tokens is None:
                raise BudgetError("a percentage budget needs the document length; give tokens or bytes instead")
            b = math.ceil(doc_tokens * self.value / 100.0)
        else:
            if not bytes_per_token:
                raise BudgetError("a byte budget needs the model's shape")
            b = int(self.value // bytes_per_token)
            if b < 1:
                raise BudgetError(
                    f"budget {self} is smaller than one token of cache ({bytes_per_token} bytes); give more"
                )
        b = max(1, b)
        if doc_tokens is not None and b >= doc_tokens:
            return None
        return b


def parse_budget(word: str | int | float) -> Budget:
    """Read a budget word. Raises :class:`BudgetError` with what to write instead."""
    if isinstance(word, bool):
        raise BudgetError(f"budget {word!r} is not a budget; {_HELP}")
    if isinstance(word, (int, float)):
        if word <= 0:
            raise BudgetError(f"budget must be positive (got {word}); {_HELP}")
        return Budget("tokens", int(word))
    text = str(word).strip().lower().replace(" ", "")
    if text in ("full", "all", "none", "100%"):
        return Budget("full", 0)
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)%", text)
    if m:
        v = float(m.group(1))
        if not 0 < v <= 100:
            raise BudgetError(f"budget {word!r}: a percentage must be above 0 and at most 100; {_HELP}")
        return Budget("full", 0) if v == 100 else Budget("percent", v)
    m = re.fullmatch(r"(\d+(?:\.\d*)?)(b|kb|mb|gb|kib|mib|gib)", text)
    if m:
        v = float(m.group(1)) * _UNITS[m.group(2)]
        if v <= 0:
            raise BudgetError(f"budget {word!r} must be positive; {_HELP}")
        return Budget("bytes", v)
    if re.fullmatch(r"\d+", text):
        v = int(text)
        if v <= 0:
            raise BudgetError(f"budget {word!r} must be positive; {_HELP}")
        return Budget("tokens", v)
    raise BudgetError(f"budget {word!r} is not a budget; {_HELP}")


_MEMORY_HELP = "give bytes like 2GiB, 512MiB or 4GB (or off for no limit)"


def parse_memory(word: str | int, what: str = "--max-cache") -> int | None:
    """Read a memory size (``2GiB``, ``512MB``, ``1000000``) in bytes; ``off``/``none`` is no limit (None)."""
    if isinstance(word, bool):
        raise BudgetError(f"{what} {word!r} is not a size; {_MEMORY_HELP}")
    if isinstance(word, (int, float)):
        if word <= 0:
            raise BudgetError(f"{what} must be positive (got {word}); {_MEMORY_HELP}")
        return int(word)
    text = str(word).strip().lower().replace(" ", "")
    if text in ("off", "none", "unlimited"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)(b|kb|mb|gb|kib|mib|gib|tb|tib)?", text)
    if not m:
        raise BudgetError(f"{what} {word!r} is not a size; {_MEMORY_HELP}")
    units = {**_UNITS, "tb": 10**12, "tib": 2**40}
    v = int(float(m.group(1)) * units[m.group(2) or "b"])
    if v <= 0:
        raise BudgetError(f"{what} {word!r} must be positive; {_MEMORY_HELP}")
    return v


def format_bytes(n: float) -> str:
    """``9.1 GiB``, ``512.0 MiB``, ``300 B``: binary units, one decimal."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def fitting_budget(limit_bytes: int, bytes_per_token: int, overhead_tokens: int = 0) -> int:
    """The largest power-of-two tokens-per-layer budget whose cache (plus ``overhead_tokens``) fits; 0 if none."""
    b = limit_bytes // max(1, bytes_per_token) - overhead_tokens
    if b < 1:
        return 0
    return 1 << (int(b).bit_length() - 1)
