"""Stdin ("-"): copied to an unnamed temporary file as it is read, then read like a text file.

The copy lets a task read the document more than once (a percentage budget counts tokens first)
without holding it in memory; a stdin without a byte stream (some test harnesses) is read into
memory instead. Either way the encoding rules are those of text files (see `encoding`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
import sys
import tempfile
import weakref
from collections.abc import Iterator

from .base import (
    PASS_BYTES,
    SEGMENT_CHARS,
    SNIFF_BYTES,
    Document,
    DocumentError,
    MemoryReader,
    Reader,
    Segment,
    hash_bytes,
    os_error,
    stream_segments,
)
from .encoding import check_text_stream, decode_bytes

SOURCE = "<stdin>"


class SpoolReader(Reader):
    """Bytes in an open temporary file (stdin spooled): read again from the start on every call.

    One pass at a time (the passes of a task are sequential); the file goes when the Document does.
    """

    def __init__(self, fh, encoding: str):
        self.fh = fh
        self.encoding = encoding

    def segments(self, doc: Document) -> Iterator[Segment]:
        self.fh.seek(0)
        text = io.TextIOWrapper(self.fh, encoding=self.encoding, newline=None)
        try:
            yield from stream_segments(text, doc.source)
        except OSError as exc:
            raise os_error(doc.source, exc) from exc
        finally:
            text.detach()  # keep the temporary file open for the next pass


def open_stdin() -> Document:
    """The Document for "-": refuses a closed stdin, a terminal and an empty or binary stream."""
    source = SOURCE
    stdin = sys.stdin
    if stdin is None:
        raise DocumentError(f"{source} is closed: pipe a document in, or pass a file", source)
    with contextlib.suppress(AttributeError, ValueError, OSError):
        if stdin.isatty():
            raise DocumentError(
                f"{source} is a terminal, not a document: pipe one in "
                "(e.g. `cat report.txt | dynkv ... -`) or pass a file",
                source,
            )
    buffer = getattr(stdin, "buffer", None)
    if buffer is not None:
        return _spool_stdin(buffer, source)
    data = stdin.read().encode("utf-8")
    if not data.strip():
        raise DocumentError(f"{source} is empty: nothing to read (pipe a document in, or pass a file)", source)
    text, warns = decode_bytes(data, source)
    if not text.strip():
        raise DocumentError(f"{source} is empty: nothing to read", source)
    return Document(
        source=source,
        path=None,
        kind="stdin",
        fingerprint=hash_bytes(text.encode("utf-8")),  # of the text: BOM and line endings do not count
        warnings=warns,
        _reader=MemoryReader(text, "line"),
    )


def _spool_stdin(buffer, source: str) -> Document:
    """Copy stdin's bytes to an unnamed temporary file (never all in memory), check and fingerprint it
    like a text file; the Document reads it again from there (a percentage budget may count first)."""
    empty = "pipe a document in, or pass a file"
    try:
        fh = tempfile.TemporaryFile(prefix="dynkv-stdin-")
    except OSError as exc:
        raise DocumentError(f"{source}: cannot create a temporary file to hold it ({exc.strerror})", source) from exc
    try:
        shutil.copyfileobj(buffer, fh, PASS_BYTES)
        fh.seek(0)
        head = fh.read(SNIFF_BYTES)
        if not head:
            raise DocumentError(f"{source} is empty: nothing to read ({empty})", source)
        fh.seek(0)
        encoding, warns = check_text_stream(fh, source, head, empty)
        digest = hashlib.sha256()  # of the text: BOM and line endings do not count
        fh.seek(0)
        text = io.TextIOWrapper(fh, encoding=encoding, newline=None)
        while block := text.read(SEGMENT_CHARS):
            digest.update(block.encode("utf-8"))
        text.detach()
    except OSError as exc:
        fh.close()
        raise DocumentError(f"{source}: cannot copy it to a temporary file ({exc.strerror})", source) from exc
    except BaseException:
        fh.close()
        raise
    doc = Document(
        source=source,
        path=None,
        kind="stdin",
        fingerprint=digest.hexdigest()[:16],
        warnings=warns,
        _reader=SpoolReader(fh, encoding),
    )
    weakref.finalize(doc, fh.close)  # closed (and gone) with the Document, without a ResourceWarning
    return doc
