"""Divide a long document into sections by its structure, then by length (DC^2's "divide", for text).

The divide-conquer-combine summary (:meth:`dynkv_cli.tasks.TaskRunner.summarize` with a profile's
``sections: auto`` or ``on``) summarizes each section in its own compressed pass and then the
section summaries in one more pass. This module does the dividing; it needs only a token counter.

How a document is cut, strongest boundary first:

1. the PDF's outline (bookmarks: a top-level entry starts a section at its page), Markdown headings
   (``#`` before ``##`` ...);
2. page breaks (PDF);
3. paragraphs (a blank line; a PDF page without blank lines is one paragraph);
4. sentences, and last of all runs of words, for a paragraph longer than a section.

:func:`divide` splits a run of blocks at its strongest boundaries, recursively, until every piece
fits ``max_tokens``; then neighbouring pieces are packed together while they fit (a chapter, an outline entry or a heading,
opens a new section unless the one before is under a quarter full), and a piece whose
text is a near-duplicate of the one before (a repeated cover page, a boilerplate notice) is folded
into it. Every section keeps where it came from (``pages 3-7``) and the first heading in it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .documents import Document

#: boundary strengths: a smaller number is a stronger cut
OUTLINE, PAGE, PARAGRAPH, SENTENCE, WORDS = 0, 7, 8, 9, 10
#: word-shingle Jaccard similarity at or above which a section is a near-duplicate of its neighbour
NEAR_DUPLICATE = 0.8

_HEADING = re.compile(r"^(#{1,6})\s+(\S.*)$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")


@dataclass
class Block:
    """A piece of text that begins after a boundary of strength ``level``."""

    text: str
    level: int
    location: str = ""  # "page 3", "" when not meaningful
    title: str | None = None  # a heading or outline entry that opens this block
    tokens: int = 0


@dataclass
class Section:
    text: str
    first: str  # the location of its first block ("page 3")
    last: str
    title: str | None
    tokens: int
    merged: int = 0  # near-duplicate neighbours folded into it
    level: int = PARAGRAPH  # the boundary it starts after

    @property
    def where(self) -> str:
        """``pages 3-7``, ``page 3``, or "" for text without pages."""
        a, b = _page(self.first), _page(self.last)
        if a is None:
            return ""
        return f"page {a}" if b in (None, a) else f"pages {a}-{b}"

    def to_dict(self) -> dict:
        return {"where": self.where, "title": self.title, "tokens": self.tokens, "merged": self.merged}


def _page(location: str) -> int | None:
    m = re.fullmatch(r"page (\d+)", location or "")
    return int(m.group(1)) if m else None


# ---- blocks from a document --------------------------------------------------------------------


def blocks_of(doc: Document, outline: dict[int, str] | None = None) -> list[Block]:
    """The document as blocks with their boundary strengths (see the module doc)."""
    if outline is None and doc.kind == "pdf":
        outline = pdf_outline(doc)
    markdown = doc.kind == "markdown"
    out: list[Block] = []
    for seg in doc.segments():
        page = _page(seg.location)
        text = seg.text
        if page is not None:  # a PDF page: a page break before it (or an outline entry there)
            title = (outline or {}).get(page)
            level = OUTLINE if title else PAGE
            paras = [p for p in re.split(r"\n\s*\n", text.strip("\n")) if p.strip()]
            for i, para in enumerate(paras or [text]):
                out.append(Block(para, level if i == 0 else PARAGRAPH, seg.location, title if i == 0 else None))
            continue
        out.extend(_text_blocks(text, seg.location, markdown))
    return [b for b in out if b.text.strip()]


def _text_blocks(text: str, location: str, markdown: bool) -> Iterable[Block]:
    para: list[str] = []
    pending_title: tuple[int, str] | None = None

    def flush(level: int = PARAGRAPH, title: str | None = None):
        if para:
            yield Block("\n".join(para), level, location, title)
            para.clear()

    for line in text.split("\n"):
        m = _HEADING.match(line) if markdown else None
        if m:
            if pending_title is not None:
                yield from flush(pending_title[0], pending_title[1])
            else:
                yield from flush()
            pending_title = (len(m.group(1)) - 1, m.group(2).strip())  # "#" is as strong as an outline entry
            para.append(line)
            continue
        if not line.strip():
            if pending_title is not None:
                if len(para) > 1:  # the heading and its first paragraph are one block
                    yield from flush(pending_title[0], pending_title[1])
                    pending_title = None
                continue
            yield from flush()
            continue
        para.append(line)
    if pending_title is not None:
        yield from flush(pending_title[0], pending_title[1])
    else:
        yield from flush()


def pdf_outline(doc: Document) -> dict[int, str]:
    """``{page number: title}`` of the PDF's top-level outline entries (empty without one)."""
    if doc.path is None:
        return {}
    try:
        from pypdf import PdfReader

        reader = PdfReader(str(doc.path))
        out: dict[int, str] = {}
        for entry in reader.outline or []:
            if isinstance(entry, list):  # children of the entry before
                continue
            try:
                page = reader.get_destination_page_number(entry) + 1
            except Exception:  # noqa: BLE001 - a broken destination: skip it
                continue
            title = str(getattr(entry, "title", "") or "").strip()
            if title and page not in out:
                out[page] = title
        return out
    except Exception:  # noqa: BLE001 - no outline is as good as a broken one
        return {}


# ---- dividing ------------------------------------------------------------------------------------


def divide(blocks: Sequence[Block], count: Callable[[str], int], max_tokens: int) -> list[Section]:
    """Sections of at most ``max_tokens`` (by ``count``) from ``blocks``; see the module doc."""
    if max_tokens < 16:
        raise ValueError("max_tokens must be at least 16")
    for b in blocks:
        if not b.tokens:
            b.tokens = count(b.text)
    pieces = _fold_duplicates([_section(run) for run in _split(list(blocks), count, max_tokens)])
    return _fold_duplicates(_pack(pieces, max_tokens))


def _split(blocks: list[Block], count, max_tokens: int) -> list[list[Block]]:
    """Runs of blocks of at most ``max_tokens``, cut at the strongest boundaries first."""
    if not blocks:
        return []
    if sum(b.tokens for b in blocks) <= max_tokens:
        return [blocks]
    if len(blocks) == 1:
        return [[b] for b in _finer(blocks[0], count, max_tokens)]
    strongest = min(b.level for b in blocks[1:])
    groups: list[list[Block]] = [[]]
    for i, b in enumerate(blocks):
        if i and b.level == strongest:
            groups.append([])
        groups[-1].append(b)
    out: list[list[Block]] = []
    for g in groups:
        out.extend(_split(g, count, max_tokens))
    return out


def _finer(block: Block, count, max_tokens: int) -> list[Block]:
    """One block too long for a section, as sentence blocks (or word runs) that fit."""
    sentences = [s for s in _SENTENCE_END.split(block.text) if s.strip()]
    if len(sentences) > 1:
        parts = [Block(s, SENTENCE, block.location) for s in sentences]
        parts[0].level, parts[0].title = block.level, block.title
        for p in parts:
            p.tokens = count(p.text)
        out: list[Block] = []
        for run in _split(parts, count, max_tokens):
            out.extend(run)
        return out
    words = block.text.split(" ")
    per = max(1, int(len(words) * max_tokens / max(block.tokens, 1) * 0.9))
    out = []
    for i in range(0, len(words), per):
        text = " ".join(words[i : i + per])
        out.append(Block(text, block.level if i == 0 else WORDS, block.location, block.title if i == 0 else None))
        out[-1].tokens = count(text)
    return out


def _joined(run: Sequence[Block]) -> str:
    parts = []
    for i, b in enumerate(run):
        sep = "" if i == 0 else (" " if b.level >= SENTENCE else "\n\n")
        parts.append(sep + b.text)
    return "".join(parts)


def _pack(pieces: list[Section], max_tokens: int) -> list[Section]:
    """Neighbouring pieces joined while they fit (a section is one compressed pass)."""
    out: list[Section] = []
    for piece in pieces:
        last = out[-1] if out else None
        opens = piece.level < PAGE and last is not None and last.tokens >= max_tokens // 4  # a chapter opens here
        if last is not None and not opens and last.tokens + piece.tokens <= max_tokens:
            last.text = f"{last.text}\n\n{piece.text}"
            last.last, last.tokens = piece.last, last.tokens + piece.tokens
            last.title = last.title or piece.title
            last.merged += piece.merged
            continue
        out.append(Section(piece.text, piece.first, piece.last, piece.title, piece.tokens, piece.merged, piece.level))
    return out


def _section(run: Sequence[Block]) -> Section:
    title = next((b.title for b in run if b.title), None)
    return Section(_joined(run), run[0].location, run[-1].location, title, sum(b.tokens for b in run), 0, run[0].level)


def _shingles(text: str, n: int = 3) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1))} if words else set()


def similarity(a: str, b: str) -> float:
    """Jaccard similarity of the two texts' word 3-grams (1.0: the same words in the same order)."""
    sa, sb = _shingles(a), _shingles(b)
    if not sa or not sb:
        return 0.0
    return len(sa & sb) / len(sa | sb)


def _fold_duplicates(sections: list[Section]) -> list[Section]:
    out: list[Section] = []
    for s in sections:
        if out and similarity(out[-1].text, s.text) >= NEAR_DUPLICATE:
            out[-1].last = s.last
            out[-1].merged += 1 + s.merged
            continue
        out.append(s)
    return out
