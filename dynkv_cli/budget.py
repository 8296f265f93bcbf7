"""Budget words: ``1.7%`` of the document's tokens, ``128`` tokens per layer per KV head, ``512MiB`` of cache.

All three resolve to ``B``, the average number of document tokens each layer keeps per KV head.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import BudgetError

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
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
