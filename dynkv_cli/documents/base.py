"""What every reader shares: Document, Segment, DocumentError, the Reader protocol and small helpers.

A format module builds a :class:`Document` whose ``_reader`` streams its text as :class:`Segment`
objects; the helpers here cut text into segments of about SEGMENT_CHARS that end at a newline and
turn OS errors into one-line :class:`DocumentError` messages, so that every format says them alike.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

SEGMENT_CHARS = 64 * 1024  # target size of a text segment (characters); also the read block
SNIFF_BYTES = 8192  # the first bytes of a file, read up front: NUL bytes there mean binary
PASS_BYTES = 1 << 20  # block size of the validation pass over a text file (and of spooling stdin)


class DocumentError(Exception):
    """Bad input. str(err) is ONE line: what is wrong, with which file, and what to do.

    `source` is the display name of the file or record ("report.pdf", "data.jsonl#12") when known.
    """

    def __init__(self, message: str, source: str | None = None):
        super().__init__(" ".join(message.split()))
        self.source = source


@dataclass
class Segment:
    text: str
    source: str  # display name of the file ("report.pdf", "<stdin>", "data.jsonl#12")
    location: str  # "page 3", "line 1", "record 12", "" when not meaningful


@dataclass
class Document:
    """One document to read. `segments()` streams its text; `text()` joins it (small inputs, tests).

    `fingerprint` is a stable 16-hex-digit hash: of path + size + mtime for files (changes when the
    file does), of the content for stdin and JSONL records. `record` is the whole JSONL record for
    kind "jsonl-record" (tasks may take a question or an id from it), else None. `pages` is the PDF's
    page count, else None.
    """

    source: str
    path: Path | None
    kind: str  # "text" | "markdown" | "pdf" | "jsonl-record" | "stdin", or a registered reader's kind
    fingerprint: str
    warnings: list[str] = field(default_factory=list)
    pages: int | None = None
    record: dict | None = None
    _reader: Reader | None = field(default=None, repr=False, compare=False)

    def segments(self) -> Iterator[Segment]:
        """Yield the text in order, a block (text) or a page (PDF) at a time."""
        if self._reader is None:
            return iter(())
        return self._reader.segments(self)

    def text(self) -> str:
        return "".join(s.text for s in self.segments())

    @classmethod
    def from_text(cls, text: str, source: str = "<text>") -> Document:
        """A document from a string already in memory (Python API callers, tests)."""
        return cls(
            source=source,
            path=None,
            kind="text",
            fingerprint=hash_bytes(text.encode("utf-8")),
            _reader=MemoryReader(text, "line"),
        )


# ---------------------------------------------------------------- readers behind Document.segments


class Reader:
    """Streams one document's text; a new pass starts on every call (a task may read twice)."""

    def segments(self, doc: Document) -> Iterator[Segment]:
        raise NotImplementedError


class MemoryReader(Reader):
    """Text already in memory (stdin without a byte stream, a JSONL record, a string)."""

    def __init__(self, text: str, unit: str):
        self.text = text
        self.unit = unit  # "line": locations are "line N"; "record 12": that fixed location

    def segments(self, doc: Document) -> Iterator[Segment]:
        if self.unit != "line":
            yield Segment(self.text, doc.source, self.unit)
            return
        chunks = (self.text[i : i + SEGMENT_CHARS] for i in range(0, len(self.text), SEGMENT_CHARS))
        yield from line_segments(chunks, doc.source)


def stream_segments(fh, source: str) -> Iterator[Segment]:
    """Segments of an open text stream, read in blocks of SEGMENT_CHARS (a file, spooled stdin)."""
    return line_segments(iter(lambda: fh.read(SEGMENT_CHARS), ""), source)


def line_segments(chunks: Iterable[str], source: str) -> Iterator[Segment]:
    """Regroup text chunks into segments of about SEGMENT_CHARS that end at a newline."""
    buf = ""
    line = 1
    for chunk in chunks:
        buf += chunk
        if len(buf) < SEGMENT_CHARS:
            continue
        cut = buf.rfind("\n") + 1
        if cut == 0:  # one very long line: wait for its end, up to a limit
            if len(buf) < 4 * SEGMENT_CHARS:
                continue
            cut = len(buf)
        yield Segment(buf[:cut], source, f"line {line}")
        line += buf.count("\n", 0, cut)
        buf = buf[cut:]
    if buf:
        yield Segment(buf, source, f"line {line}")


# ---------------------------------------------------------------- helpers


def visible_chars(text: str) -> int:
    """How many non-space characters `text` has."""
    return len("".join(text.split()))


def hash_bytes(data: bytes) -> str:
    """The 16-hex-digit fingerprint of `data`."""
    return hashlib.sha256(data).hexdigest()[:16]


def reason(exc: BaseException) -> str:
    """The first line of an exception's message (its type when it has none), at most 120 characters."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def os_error(source: str, exc: OSError) -> DocumentError:
    """The one-line error for an OSError while reading `source`."""
    if isinstance(exc, PermissionError):
        return DocumentError(f"cannot read {source}: permission denied (check the file's permissions)", source)
    return DocumentError(f"cannot read {source}: {exc.strerror or reason(exc)}", source)


def not_found(source: str) -> DocumentError:
    """The error for an input that does not exist, naming a close file of its folder when there is one."""
    return DocumentError(f"{source} does not exist: check the path{_did_you_mean(Path(source))}", source)


def _did_you_mean(p: Path) -> str:
    """' (did you mean <close name>?)' for a missing path whose folder has a close name, else ''."""
    parent = p.parent
    try:
        names = []
        with os.scandir(parent) as it:
            for entry in it:
                names.append(entry.name)
                if len(names) >= 2000:
                    break
    except OSError:
        return ""
    close = difflib.get_close_matches(p.name, names, n=1, cutoff=0.75)
    return f" (did you mean {p.with_name(close[0])}?)" if close else ""
