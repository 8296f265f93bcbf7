"""Read what a user points dynkv at (text, Markdown, PDF, stdin, JSONL records), streaming.

    open_document(path)          -> Document       (one file, "-" for stdin, "data.jsonl#12" for a record)
    iter_documents(inputs, ...)  -> Document | DocumentError, one per file or record (batch, rag)
    Document.segments()          -> Segment(text, source, location), streamed

Contracts:
- Concatenating a document's segment texts in order gives its whole text (PDF pages carry their
  own "\\n\\n" separator), so a tokenizer can consume segments one by one.
- Text files are read in blocks of about SEGMENT_CHARS characters, split at a newline; a PDF is
  extracted one page at a time. Stdin is copied (in blocks) to an unnamed temporary file as it is
  read and then read like a text file, so it can be read again; only JSONL records (and a stdin
  without a byte stream, as in some test harnesses) are held in memory.
- Bad input raises (or, in iter_documents, yields) DocumentError whose str() is one line: which
  file, what is wrong, what to do. Nothing here imports torch, transformers or the CLI.
- Problems that do not stop reading (encoding fallback, a PDF page that failed) go to
  `Document.warnings`; PDF page warnings can appear while `segments()` runs.

Layout: `base` (Document, Segment, DocumentError, readers, helpers), `registry` (suffix -> reader,
`open_document`), one module per format (`text`, `pdf`, `records`), `encoding` (bytes to text, for
text files and stdin), `stdin` ("-") and `folders` (`iter_documents`, skipped files).

Adding a format (".epub", say), in three steps:
1. `documents/epub.py`: a `base.Reader` whose `segments(doc)` yields Segments (or reuse `base.MemoryReader`).
2. There, `@register_reader(".epub") def open_epub(f: FileInput) -> Document`: check f.path, return the Document.
3. Add `epub` to `from . import text, pdf, records` below: messages, folders and ACCEPTED_SUFFIXES list it.
"""

from __future__ import annotations

# Importing a format module registers its suffixes; messages list them in this order (isort: skip keeps it).
from . import text, pdf, records  # noqa: F401  # isort: skip
from .base import Document, DocumentError, Segment
from .folders import describe_skipped, iter_documents, skipped_files
from .pdf import MIN_PAGE_CHARS, set_debug
from .records import RECORD_FIELDS
from .registry import FileInput, accepted_suffixes, open_document, register_reader, unregister_reader
from .text import MARKDOWN_SUFFIXES, TEXT_SUFFIXES

__all__ = [
    "ACCEPTED_SUFFIXES",
    "MARKDOWN_SUFFIXES",
    "MIN_PAGE_CHARS",
    "RECORD_FIELDS",
    "TEXT_SUFFIXES",
    "Document",
    "DocumentError",
    "FileInput",
    "Segment",
    "accepted_suffixes",
    "describe_skipped",
    "iter_documents",
    "open_document",
    "register_reader",
    "set_debug",
    "skipped_files",
    "unregister_reader",
]


def __getattr__(name: str):
    """ACCEPTED_SUFFIXES: the registered suffixes now (a reader registered later is in it)."""
    if name == "ACCEPTED_SUFFIXES":
        return accepted_suffixes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
