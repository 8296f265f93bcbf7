"""Stop an answer that loops: the same span of tokens over and over until ``max_new_tokens``.

A loop is the tail of the answer made of ``repeats`` back-to-back copies of one span of ``p`` tokens,
``p >= ngram``, where the span is not itself a run of a shorter unit (``p' < ngram``)::

    ... Katrina will hit Florida. Katrina will hit Florida. Katrina will hit Florida.
        '-------- span --------''-------- copy --------''-------- copy --------'

The defaults (``ngram`` 8, ``repeats`` 3) are chosen so that:

* repeated digits or separators (``1000000``, ``-----``, ``| --- | --- |``) never count: their unit is
  one to a few tokens, shorter than ``ngram``, and a run of a short unit is never a loop however long;
* a list never counts: its items differ somewhere (a number, a name), so no span repeats exactly;
* a phrase said twice on purpose does not count: three exact back-to-back copies of 8+ tokens are
  needed, which a summary or an answer has no reason to write;
* a loop is still stopped early: after ``3 * p`` tokens of it (24 for the shortest span) instead of
  running to ``max_new_tokens``.

:func:`find_loop` works on token ids only (no tokenizer), so it is cheap to call after every token.
"""

from __future__ import annotations

from collections.abc import Sequence

NGRAM = 8
REPEATS = 3
KEYS = ("ngram", "repeats")


def guard_settings(value: dict | None) -> dict | None:
    """A checked ``repetition_guard`` mapping (missing keys take the defaults), or None (off)."""
    from .errors import UsageError

    if value is None:
        return None
    if not isinstance(value, dict):
        raise UsageError(f"repetition_guard must be a mapping like {{ngram: {NGRAM}, repeats: {REPEATS}}} or null")
    unknown = sorted(str(k) for k in value if k not in KEYS)
    if unknown:
        raise UsageError(
            f"unknown repetition_guard key(s) {', '.join(unknown)}; valid keys: {', '.join(KEYS)} (or null: off)"
        )
    out = {"ngram": value.get("ngram", NGRAM), "repeats": value.get("repeats", REPEATS)}
    for key, low in (("ngram", 2), ("repeats", 2)):
        v = out[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise UsageError(f"repetition_guard.{key} must be an integer >= {low} (got {v!r})")
    return out


def _has_period(ids: Sequence[int], start: int, period: int) -> bool:
    """True when ``ids[start:]`` repeats with this period (``ids[i] == ids[i - period]``)."""
    return all(ids[i] == ids[i - period] for i in range(len(ids) - 1, start + period - 1, -1))


def find_loop(ids: Sequence[int], ngram: int = NGRAM, repeats: int = REPEATS) -> tuple[int, int] | None:
    """Where the tail of ``ids`` loops: ``(start, period)`` or None.

    ``ids[start:]`` consists of at least ``repeats`` copies of the span ``ids[start:start + period]``
    (the last copy may be cut short), ``period >= ngram``, and no shorter unit (``< ngram``) explains
    it. An answer trimmed to ``ids[:start + period]`` says the span once.
    """
    n = len(ids)
    for p in range(ngram, n // repeats + 1):
        a = n - p * repeats
        if not _has_period(ids, a, p):
            continue
        if any(_has_period(ids, a, q) for q in range(1, ngram)):
            return None  # a run of a short unit (digits, separators): never a loop
        while a > 0 and ids[a - 1] == ids[a - 1 + p]:  # where the repetition really began
            a -= 1
        return a, p
    return None


def pending_repeat(ids: Sequence[int], ngram: int = NGRAM) -> int:
    """How many trailing tokens repeat the tokens one span (``>= ngram``) before them: maybe a loop starting.

    A front end that streams can hold these back until the repetition breaks off (then they are shown)
    or becomes a loop (then they are cut).
    """
    n, best = len(ids), 0
    for p in range(ngram, n):
        m = 0
        while m < n - p and ids[n - 1 - m] == ids[n - 1 - m - p]:
            m += 1
        best = max(best, m)
    return best
