"""Plain text and Markdown files (and files without a suffix that are not PDFs), read in blocks.

.json is read as plain text (a model reads JSON well); records to read one by one go in .jsonl.
Opening makes one validation pass (encoding, binary, only whitespace); `segments()` reads again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from .base import Document, DocumentError, Reader, Segment, os_error, stream_segments
from .encoding import check_text_stream
from .registry import FileInput, register_reader

TEXT_SUFFIXES = (".txt", ".text", ".rst", ".log", ".csv", ".json")
MARKDOWN_SUFFIXES = (".md", ".markdown")


class TextFileReader(Reader):
    """A text file in a known encoding, read again from disk on every pass."""

    def __init__(self, path: Path, encoding: str):
        self.path = path
        self.encoding = encoding

    def segments(self, doc: Document) -> Iterator[Segment]:
        try:
            with open(self.path, encoding=self.encoding, newline=None) as fh:
                yield from stream_segments(fh, doc.source)
        except UnicodeDecodeError as exc:
            raise DocumentError(
                f"{doc.source} changed while it was read (no longer valid {self.encoding}): run again",
                doc.source,
            ) from exc
        except OSError as exc:
            raise os_error(doc.source, exc) from exc


def check_text_file(p: Path, source: str, head: bytes) -> tuple[str, list[str]]:
    """One streaming pass: decide the encoding, refuse binary and whitespace-only files."""
    try:
        with open(p, "rb") as fh:
            return check_text_stream(fh, source, head)
    except OSError as exc:
        raise os_error(source, exc) from exc


@register_reader(*TEXT_SUFFIXES, *MARKDOWN_SUFFIXES, "")
def open_text(f: FileInput) -> Document:
    """A text or Markdown document (kind "markdown" for .md and .markdown, else "text")."""
    encoding, warns = check_text_file(f.path, f.source, f.head)
    return Document(
        source=f.source,
        path=f.path,
        kind="markdown" if f.path.suffix.lower() in MARKDOWN_SUFFIXES else "text",
        fingerprint=f.fingerprint,
        warnings=warns,
        _reader=TextFileReader(f.path, encoding),
    )
