"""The decode loop of :meth:`dynkv_cli.engine.Engine.ask`: pick tokens, detokenize incrementally, stop, stream.

Linear in the answer: :class:`IncrementalDetokenizer` decodes only a window of recent tokens per step
(the "prefix offset / read offset" technique), the stop-string search looks only at the new text, and
on CUDA the host looks at greedy tokens every :data:`SYNC_EVERY` tokens instead of syncing per token
(the picked id stays on the device and is fed straight back as the next input).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .config import GenerationSettings
from .repetition import find_loop, pending_repeat

#: On CUDA, greedy tokens are copied to the host (EOS, stop strings, repetition guard, streaming) in groups
#: of this many: one host sync per group instead of per token. Tokens decoded past an EOS (or a stop)
#: inside a group are dropped; the cache entries they made are removed with the question after ``ask``.
SYNC_EVERY = 8

#: The replacement character a decode ends with while a multi-byte character is still incomplete.
INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    """The text of a growing list of token ids, decoding a window of recent tokens per step (not all of them).

    ``ids[:read_offset]`` is settled: its text is :attr:`text`. ``ids[prefix_offset:read_offset]`` is a
    context window decoded again with the new tokens, so tokenizers that treat a first token specially
    (a leading-space marker) or merge bytes across tokens still give the same text as a full decode.
    Text is settled only when it grew and does not end in an incomplete character (``\\ufffd``).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # text of ids[:read_offset]
        self.prefix_offset = 0
        self.read_offset = 0
        self._prefix_text = ""  # decode(ids[prefix_offset:read_offset])
        self._tail = ""  # text of ids[read_offset:] (may end in an incomplete character)
        # settled points: read offsets, with the prefix offset and settled text length at each (for text_upto)
        self._reads: list[int] = [0]
        self._points: list[tuple[int, int]] = [(0, 0)]
        self.decoded_tokens = 0  # tokens passed to tokenizer.decode so far (tests check it stays linear)

    def _decode(self, ids: Sequence[int]) -> str:
        self.decoded_tokens += len(ids)
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one id; returns the text it settled (often ``""`` while a character is incomplete)."""
        self.ids.append(int(token_id))
        window = self._decode(self.ids[self.prefix_offset :])
        if len(window) > len(self._prefix_text) and not window.endswith(INCOMPLETE):
            new = window[len(self._prefix_text) :]
            self.text += new
            self._tail = ""
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self._prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
            self._reads.append(self.read_offset)
            self._points.append((self.prefix_offset, len(self.text)))
            return new
        self._tail = window[len(self._prefix_text) :] if window.startswith(self._prefix_text) else ""
        return ""

    def current(self) -> str:
        """The text of all ids so far, an incomplete last character included (as a full decode gives it)."""
        return self.text + self._tail

    def text_upto(self, m: int) -> str:
        """The text of ``ids[:m]`` (decodes from the last settled point at or before ``m``)."""
        if m >= len(self.ids):
            return self.current()
        i = bisect.bisect_right(self._reads, m) - 1
        r = self._reads[i]
        prefix, settled = self._points[i]
        if m == r:
            return self.text[:settled]
        base = self._decode(self.ids[prefix:r])
        window = self._decode(self.ids[prefix:m])
        return self.text[:settled] + (window[len(base) :] if window.startswith(base) else "")


def eos_ids(lm) -> set[int]:
    """Every end-of-sequence id the model's generation config, config and tokenizer name."""
    ids: set[int] = set()
    for src in (getattr(lm.model, "generation_config", None), lm.model.config, lm.tokenizer):
        e = getattr(src, "eos_token_id", None)
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    return ids


def pick(logits: torch.Tensor, gen: GenerationSettings, rng: torch.Generator) -> int | torch.Tensor:
    """The next token: greedy as a 0-dim tensor on the logits' device (no host sync), sampled as an int.

    Sampling (``temperature > 0``, ``top_p`` nucleus) runs on the host with the seeded ``rng`` so a seed
    gives the same answer on every device.
    """
    if gen.temperature <= 0:
        return torch.argmax(logits)
    probs = torch.softmax(logits.float().cpu() / gen.temperature, dim=-1)
    if gen.top_p < 1:
        sp, si = torch.sort(probs, descending=True)
        keep = torch.cumsum(sp, 0) - sp < gen.top_p
        probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=rng))


def loop_end(tokenizer, ids: list[int], start: int, period: int) -> int:
    """Where to cut a looping answer: after the repeated span said once, at the end of its sentence or line.

    The span starts where the repetition began, which may be mid-sentence; if the span does not end a
    sentence, the cut moves on (at most one span) to the next token that ends one. A loop with no
    sentence end (``... show "X" and featured on the show "X" and ...``) is cut back, inside the span,
    after its last closing quote, bracket or comma instead of after a dangling ``and``.
    """
    end = start + period

    def piece(i: int) -> str:
        return tokenizer.decode([ids[i]], skip_special_tokens=True).rstrip(" ")

    def ends_sentence(i: int) -> bool:
        return "\n" in piece(i) or piece(i).endswith((".", "!", "?"))

    if ends_sentence(end - 1):
        return end
    for i in range(end, min(end + period, len(ids))):
        if ends_sentence(i):
            return i + 1
    for i in range(end - 1, start, -1):
        if piece(i).endswith(('"', "'", ")", "]", ",", ";", ":")):
            return i + 1
    return end


def stop_at(text: str, stops: list[str], start: int = 0) -> int | None:
    """Where the first stop string begins in ``text`` (searching from ``start``), or None."""
    cuts = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(cuts) if cuts else None


def _stop_prefix(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` could begin a stop string (held back from the stream)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


@dataclass
class Decoded:
    """What :func:`decode` produced: the answer's ids and text, why it stopped, when its first token came."""

    token_ids: list[int]
    text: str
    stop_reason: str  # "eos" | "stop_string" | "repetition" | "max_new_tokens"
    first_token_seconds: float


class _Answer:
    """The host-side state of one answer: ids, text, stop checks and the ``on_token`` stream."""

    def __init__(self, tokenizer, gen: GenerationSettings, eos: set[int], on_token: Callable[[str], None] | None):
        self.tokenizer, self.gen, self.eos, self.on_token = tokenizer, gen, eos, on_token
        self.guard = gen.repetition_guard
        self.detok = IncrementalDetokenizer(tokenizer)
        self.ids = self.detok.ids
        self.stop_reason = "max_new_tokens"
        self.text: str | None = None  # set when a stop string cuts it
        self._searched = 0  # settled text searched for stop strings so far (its length)
        self._longest_stop = max((len(s) for s in gen.stop if s), default=0)
        self.shown = ""  # text given to on_token so far
        self._held_at: tuple[int, str] | None = None  # (m, text of ids[:m]) last computed for a held-back tail

    def accept(self, tok: int) -> bool:
        """Take one picked id; True when the answer ends (EOS, a loop, a stop string, max_new_tokens)."""
        if tok in self.eos:
            self.stop_reason = "eos"
            return True
        self.detok.add(tok)
        guard = self.guard
        loop = find_loop(self.ids, guard["ngram"], guard["repeats"]) if guard else None
        if loop is not None:
            del self.ids[loop_end(self.tokenizer, self.ids, *loop) :]
            self.stop_reason = "repetition"
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.gen.stop:
            self._check_stop()
        self._stream()
        return self.stop_reason != "max_new_tokens" or len(self.ids) >= self.gen.max_new_tokens

    def _check_stop(self) -> None:
        """Cut at the first stop string; only text a new stop string could overlap is searched again."""
        text = self.text if self.text is not None else self.detok.current()
        start = max(0, self._searched - self._longest_stop + 1)
        cut = stop_at(text, self.gen.stop, start)
        # settled text never changes; the unsettled tail (incomplete characters) may, so it is searched again
        self._searched = len(self.detok.text)
        if cut is not None:
            self.text, self.stop_reason = text[:cut], "stop_string"

    def _visible(self) -> str:
        """The text that may be shown now: settled, minus a repetition that may become a loop or a stop's start."""
        if self.text is not None:  # the answer ended: a cut text
            return self.text
        held = pending_repeat(self.ids, self.guard["ngram"]) if self.guard else 0
        if not held:
            visible = self.detok.text
        else:
            m = len(self.ids) - held
            if self._held_at is None or self._held_at[0] != m:
                self._held_at = (m, self.detok.text_upto(m).rstrip(INCOMPLETE))
            visible = self._held_at[1]
        hold = _stop_prefix(visible, self.gen.stop) if self.gen.stop else 0
        return visible[: len(visible) - hold]

    def _stream(self) -> None:
        if not self.on_token:
            return
        visible = self._visible()
        if len(visible) > len(self.shown) and visible.startswith(self.shown):
            self.on_token(visible[len(self.shown) :])
            self.shown = visible

    def finish(self) -> str:
        """The final text (a full decode, once) and the rest of the stream (what was held back)."""
        text = self.text if self.text is not None else self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.on_token and text.startswith(self.shown) and len(text) > len(self.shown):
            self.on_token(text[len(self.shown) :])
        return text


def decode(
    step: Callable[[int | torch.Tensor], torch.Tensor],
    logits: torch.Tensor,
    tokenizer,
    gen: GenerationSettings,
    eos: set[int],
    *,
    pick_fn: Callable = pick,
    rng: torch.Generator | None = None,
    t0: float | None = None,
    on_token: Callable[[str], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    every: int | None = None,
) -> Decoded:
    """Decode an answer from the suffix's ``logits``; ``step(token)`` runs the model on one token (an int or a
    device tensor) and returns the next logits.

    On CUDA with greedy picks, up to :data:`SYNC_EVERY` tokens are decoded before the host looks at them
    (the first token alone, so its time is exact); elsewhere every token is looked at as it comes.
    Either way the answer, its ``stop_reason`` and its stream are the same. ``every``: that group size
    instead (tests use it to run the CUDA schedule on the CPU).
    """
    t0 = time.perf_counter() if t0 is None else t0
    state = _Answer(tokenizer, gen, eos, on_token)
    if every is None:
        every = SYNC_EVERY if logits.device.type == "cuda" and gen.temperature <= 0 else 1
    t_first: float | None = None
    done = False
    while not done:
        size = every if t_first is not None else 1
        group = []
        for j in range(size):
            group.append(pick_fn(logits, gen, rng))
            if j == size - 1 or len(state.ids) + len(group) >= gen.max_new_tokens:
                break
            logits = step(group[-1])
        ids = [int(t) for t in (torch.stack(group).tolist() if isinstance(group[0], torch.Tensor) else group)]
        if t_first is None:
            t_first = time.perf_counter() - t0
        for tok in ids:
            done = state.accept(tok)
            if on_progress and state.stop_reason != "eos":
                on_progress(len(state.ids))
            if done:
                break
        if not done:
            logits = step(group[-1])
    return Decoded(state.ids, state.finish(), state.stop_reason, t_first or 0.0)
