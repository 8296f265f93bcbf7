"""Spans: runs of tokens that are kept or dropped together (a number's digits, a word's pieces).

Tokenizers cut a number into several tokens (Qwen and SmolLM2 give every digit its own), and a
question's attention lands on the words around a fact rather than on the fact's own tokens. Scores
pooled over a fixed window of neighbours then keep the first few digits of a key and lose the rest
("6729078" comes back as "672"). A method with ``span: digits`` or ``span: word`` gives every token
of a span the highest score of the span, so a span is ranked as one piece.

``span_starts`` marks, for token ids, where a new span begins:

* ``digits``: a token continues the span when it and the token before are both all digits;
* ``word``: also when it has no leading space marker and both it and the token before are letters or
  digits (the pieces of one word);
* ``none``: every token is its own span.
"""

from __future__ import annotations

import torch

SPANS = ("none", "digits", "word")
#: characters byte-level BPE and SentencePiece tokenizers put in front of a token that starts a word
_SPACE_MARKERS = ("Ġ", "▁", " ", "Ċ", "\n", "\t")


def span_starts(tokenizer, ids: list[int], mode: str) -> list[bool]:
    """One flag per id: True where a new span begins (the first id always begins one)."""
    if mode == "none" or not ids:
        return [True] * len(ids)
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    out, prev = [], ""
    for piece in pieces:
        piece = piece or ""
        bare = piece.lstrip("".join(_SPACE_MARKERS))
        spaced = len(bare) != len(piece)
        cont = bool(bare) and bool(prev) and not spaced and bare.isdigit() and prev.isdigit()
        if mode == "word" and not cont:
            cont = bool(bare) and bool(prev) and not spaced and bare.isalnum() and prev[-1:].isalnum()
        out.append(not cont)
        prev = bare
    out[0] = True
    return out


def span_max(scores: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """``scores`` ``[G, n]`` with every entry raised to the highest score of its span (``spans``: ``[n]`` or
    ``[G, n]`` ids, ascending along a row)."""
    if scores.shape[-1] == 0:
        return scores
    G, n = scores.shape
    idx = spans.to(scores.device).long().expand(G, n)
    top = torch.full((G, int(idx.max()) + 1), float("-inf"), dtype=scores.dtype, device=scores.device)
    top = top.scatter_reduce(1, idx, scores, reduce="amax", include_self=True)
    return top.gather(1, idx)


def candidate_spans(
    positions: torch.Tensor, previous: torch.Tensor, new_starts: torch.Tensor | None
) -> torch.Tensor | None:
    """Span ids ``[G, n]`` of a layer's candidates whose last ``len(new_starts)`` are the chunk just read.

    The chunk's spans come from its tokens (``new_starts``). Entries kept from earlier chunks carry no
    token text any more; what was ranked as one span then shares one stored score, so neighbouring
    positions with an equal stored score stay one span. None when there are no chunk flags.
    """
    if new_starts is None:
        return None
    G, n = positions.shape
    n_new = int(new_starts.numel())
    n_old = n - n_new
    starts = torch.ones(G, n, dtype=torch.bool, device=positions.device)
    if n_old > 1:
        p, s = positions[:, :n_old], previous[:, :n_old]
        starts[:, 1:n_old] = ~((p[:, 1:] == p[:, :-1] + 1) & (s[:, 1:] == s[:, :-1]))
    starts[:, n_old:] = new_starts.to(positions.device)[None, :]
    return torch.cumsum(starts.long(), 1) - 1
