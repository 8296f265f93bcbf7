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
"""

from __future__ import annotations

import codecs
import contextlib
import difflib
import glob
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

__all__ = [
    "ACCEPTED_SUFFIXES",
    "Document",
    "DocumentError",
    "Segment",
    "describe_skipped",
    "iter_documents",
    "open_document",
    "set_debug",
    "skipped_files",
]

# .json is read as plain text (a model reads JSON well); records to read one by one go in .jsonl.
TEXT_SUFFIXES = (".txt", ".text", ".rst", ".log", ".csv", ".json")
MARKDOWN_SUFFIXES = (".md", ".markdown")
ACCEPTED_SUFFIXES: tuple[str, ...] = (*TEXT_SUFFIXES, *MARKDOWN_SUFFIXES, ".pdf", ".jsonl")
RECORD_FIELDS = ("context", "text", "input")  # where a JSONL record keeps its document, in order
_FIELDS_WORDS = '"context", "text" or "input"'

SEGMENT_CHARS = 64 * 1024  # target size of a text segment (characters); also the read block
# A PDF page with fewer non-space characters than this has "no text" (a scan, maybe with a stray
# label or page number); a PDF none of whose pages has more is refused as image-only.
MIN_PAGE_CHARS = 20
_SNIFF_BYTES = 8192  # NUL bytes in this prefix: binary
_PASS_BYTES = 1 << 20  # block size of the validation pass over a text file

_debug = False


def set_debug(on: bool = True) -> None:
    """Let pypdf's log messages and warnings through (for `--debug`); they are silenced by default."""
    global _debug
    _debug = bool(on)


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
    kind: str  # "text" | "markdown" | "pdf" | "jsonl-record" | "stdin"
    fingerprint: str
    warnings: list[str] = field(default_factory=list)
    pages: int | None = None
    record: dict | None = None
    _reader: _Reader | None = field(default=None, repr=False, compare=False)

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
            fingerprint=_hash(text.encode("utf-8")),
            _reader=_MemoryReader(text, "line"),
        )


# ---------------------------------------------------------------- readers behind Document.segments


class _Reader:
    def segments(self, doc: Document) -> Iterator[Segment]:
        raise NotImplementedError


class _MemoryReader(_Reader):
    """Text already in memory (stdin, a JSONL record, a string)."""

    def __init__(self, text: str, unit: str):
        self.text = text
        self.unit = unit  # "line": locations are "line N"; "record 12": that fixed location

    def segments(self, doc: Document) -> Iterator[Segment]:
        if self.unit != "line":
            yield Segment(self.text, doc.source, self.unit)
            return
        chunks = (self.text[i : i + SEGMENT_CHARS] for i in range(0, len(self.text), SEGMENT_CHARS))
        yield from _line_segments(chunks, doc.source)


class _TextFileReader(_Reader):
    def __init__(self, path: Path, encoding: str):
        self.path = path
        self.encoding = encoding

    def segments(self, doc: Document) -> Iterator[Segment]:
        try:
            with open(self.path, encoding=self.encoding, newline=None) as fh:
                yield from _line_segments(iter(lambda: fh.read(SEGMENT_CHARS), ""), doc.source)
        except UnicodeDecodeError as exc:
            raise DocumentError(
                f"{doc.source} changed while it was read (no longer valid {self.encoding}): run again",
                doc.source,
            ) from exc
        except OSError as exc:
            raise _os_error(doc.source, exc) from exc


class _SpoolReader(_Reader):
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
            yield from _line_segments(iter(lambda: text.read(SEGMENT_CHARS), ""), doc.source)
        except OSError as exc:
            raise _os_error(doc.source, exc) from exc
        finally:
            text.detach()  # keep the temporary file open for the next pass


class _PdfReader(_Reader):
    def __init__(self, path: Path, password: str | None, n_pages: int, probed: dict[int, str | None]):
        self.path = path
        self.password = password  # the one that opened it ("" or the user's), None if not encrypted
        self.n_pages = n_pages
        self.probed = probed  # page index -> text (None: failed) extracted by open_document

    def segments(self, doc: Document) -> Iterator[Segment]:
        emitted = False
        textless = 0
        try:
            with open(self.path, "rb") as fh:
                reader = None
                for i in range(self.n_pages):
                    if i in self.probed:
                        text = self.probed[i]  # its warning, if it failed, is already in doc.warnings
                    else:
                        if reader is None:
                            reader = _open_pdf_reader(fh, self.password)
                        text, problem = _extract_page(reader, i)
                        if problem and problem not in doc.warnings:
                            doc.warnings.append(problem)
                    if text is not None and _visible_chars(text) < MIN_PAGE_CHARS:
                        textless += 1
                    if text and text.strip():
                        yield Segment(("\n\n" if emitted else "") + text, doc.source, f"page {i + 1}")
                        emitted = True
        except OSError as exc:
            raise _os_error(doc.source, exc) from exc
        except DocumentError:
            raise
        except Exception as exc:  # pypdf failing outside a page (the file changed?)
            from pypdf.errors import DependencyError

            if isinstance(exc, DependencyError):
                raise _dependency_error(doc.source, exc) from exc
            raise DocumentError(f"{doc.source} is not a readable PDF: {_reason(exc)}", doc.source) from exc
        if textless and textless * 4 >= self.n_pages:
            note = (
                f"{textless} of {self.n_pages} pages have (almost) no text (scanned pages? run OCR first to read them)"
            )
            if note not in doc.warnings:
                doc.warnings.append(note)


def _line_segments(chunks: Iterable[str], source: str) -> Iterator[Segment]:
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


# ---------------------------------------------------------------- open_document


def open_document(path: str | Path, *, password: str | None = None) -> Document:
    """Open one input: a file, "-" for stdin, or "data.jsonl#<line>" for one JSONL record.

    Checks the input up front (exists, readable, not empty, decodable, PDF not encrypted or the
    password right, PDF has text) so that errors come before any work; the text itself is read
    when `segments()` runs. `password` is only used by encrypted PDFs (ignored elsewhere).
    Raises DocumentError.
    """
    if str(path) == "-":
        return _open_stdin()
    p = Path(path)
    source = str(path)
    if not p.exists():
        m = re.fullmatch(r"(.+\.jsonl)#(\d+)", source, flags=re.IGNORECASE)
        if m and Path(m.group(1)).is_file():
            return _open_record(Path(m.group(1)), m.group(1), int(m.group(2)))
        raise DocumentError(f"{source} does not exist: check the path{_did_you_mean(p)}", source)
    if p.is_dir():
        raise DocumentError(
            f"{source} is a folder, not a file: pass a file, or give the folder to `dynkv batch` "
            "or `dynkv rag`, which read folders",
            source,
        )
    if not p.is_file():
        raise DocumentError(
            f"{source} is not a regular file (a pipe or a device?): save it to a file, "
            "or pipe it into stdin and pass '-'",
            source,
        )
    suffix = p.suffix.lower()
    if suffix not in ACCEPTED_SUFFIXES and suffix != "":
        raise DocumentError(
            f"{source} has an unsupported type '{p.suffix}': dynkv reads {' '.join(ACCEPTED_SUFFIXES)} "
            "(and text files without a suffix); convert it to PDF or plain text first, "
            "or rename it to .txt if it is plain text",
            source,
        )
    try:
        st = p.stat()
        if st.st_size == 0:
            raise DocumentError(f"{source} is empty: nothing to read", source)
        with open(p, "rb") as fh:
            head = fh.read(_SNIFF_BYTES)
    except OSError as exc:
        raise _os_error(source, exc) from exc
    fingerprint = _hash(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode())

    if suffix == ".pdf" or (suffix == "" and head.startswith(b"%PDF-")):
        return _open_pdf(p, source, head, fingerprint, password)
    if suffix == ".jsonl":
        return _open_single_record(p, source)
    encoding, warns = _check_text_file(p, source, head)
    return Document(
        source=source,
        path=p,
        kind="markdown" if suffix in MARKDOWN_SUFFIXES else "text",
        fingerprint=fingerprint,
        warnings=warns,
        _reader=_TextFileReader(p, encoding),
    )


# ---------------------------------------------------------------- text


def _bom_encoding(head: bytes) -> str | None:
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    return None


def _binary_error(source: str, head: bytes) -> DocumentError:
    hint = ""
    if head[1::2].count(0) > len(head) // 4 or head[0::2].count(0) > len(head) // 4:
        hint = " (if it is UTF-16 text, save it as UTF-8 or with a byte-order mark)"
    return DocumentError(
        f"{source} looks like a binary file, not text{hint}: convert it to a .txt or .pdf first", source
    )


_CONTROL = bytes(b for b in [*range(32), 127] if b not in b"\t\n\r\f\v\b\x1b")
_UNDEFINED_CP1252 = re.compile(rb"[\x81\x8d\x8f\x90\x9d]")
_SPACE_BYTES = b" \t\n\r\f\v"


def _check_text_file(p: Path, source: str, head: bytes) -> tuple[str, list[str]]:
    """One streaming pass: decide the encoding, refuse binary and whitespace-only files."""
    try:
        with open(p, "rb") as fh:
            return _check_text_stream(fh, source, head)
    except OSError as exc:
        raise _os_error(source, exc) from exc


def _check_text_stream(fh, source: str, head: bytes, empty: str = "only whitespace") -> tuple[str, list[str]]:
    """:func:`_check_text_file` over an open binary file, read from where it is."""
    bom = _bom_encoding(head)
    if bom is None and b"\0" in head:
        raise _binary_error(source, head)
    decoder = codecs.getincrementaldecoder(bom or "utf-8")()
    utf_ok = True
    cp1252_ok = True
    has_text = False
    while block := fh.read(_PASS_BYTES):
        if utf_ok:
            try:
                decoded = decoder.decode(block)
            except UnicodeDecodeError:
                utf_ok = False
            else:
                has_text = has_text or bool(decoded.strip())
        if bom is None:
            cp1252_ok = cp1252_ok and not _UNDEFINED_CP1252.search(block)
            has_text = has_text or bool(block.translate(None, _SPACE_BYTES))
    if utf_ok:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            utf_ok = False

    if bom == "utf-16" and not utf_ok:
        raise DocumentError(
            f"{source} starts with a UTF-16 byte-order mark but is not valid UTF-16: re-save it as UTF-8 text",
            source,
        )
    if not has_text:
        raise DocumentError(f"{source} is empty: nothing to read ({empty})", source)
    if utf_ok:
        return bom or "utf-8", []
    # Not UTF-8: a legacy 8-bit file, unless it is mostly control bytes (then it is binary).
    if sum(head.count(c) for c in _CONTROL) > len(head) // 20:
        raise _binary_error(source, head)
    if cp1252_ok:
        return "cp1252", ["decoded as Windows-1252 (not valid UTF-8)"]
    return "latin-1", ["decoded as Latin-1 (not valid UTF-8)"]


def _decode_bytes(data: bytes, source: str) -> tuple[str, list[str]]:
    """Decode in-memory bytes (stdin) with the same rules as a text file."""
    head = data[:_SNIFF_BYTES]
    bom = _bom_encoding(head)
    if bom is None and b"\0" in head:
        raise _binary_error(source, head)
    try:
        text = data.decode(bom or "utf-8")
        warns: list[str] = []
    except UnicodeDecodeError as exc:
        if bom == "utf-16":
            raise DocumentError(
                f"{source} starts with a UTF-16 byte-order mark but is not valid UTF-16: send UTF-8 text",
                source,
            ) from exc
        if sum(head.count(c) for c in _CONTROL) > len(head) // 20:
            raise _binary_error(source, head) from exc
        try:
            text, warns = data.decode("cp1252"), ["decoded as Windows-1252 (not valid UTF-8)"]
        except UnicodeDecodeError:
            text, warns = data.decode("latin-1"), ["decoded as Latin-1 (not valid UTF-8)"]
    return text.replace("\r\n", "\n").replace("\r", "\n"), warns


def _open_stdin() -> Document:
    source = "<stdin>"
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
    text, warns = _decode_bytes(data, source)
    if not text.strip():
        raise DocumentError(f"{source} is empty: nothing to read", source)
    return Document(
        source=source,
        path=None,
        kind="stdin",
        fingerprint=_hash(text.encode("utf-8")),  # of the text: BOM and line endings do not count
        warnings=warns,
        _reader=_MemoryReader(text, "line"),
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
        shutil.copyfileobj(buffer, fh, _PASS_BYTES)
        fh.seek(0)
        head = fh.read(_SNIFF_BYTES)
        if not head:
            raise DocumentError(f"{source} is empty: nothing to read ({empty})", source)
        fh.seek(0)
        encoding, warns = _check_text_stream(fh, source, head, empty)
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
        _reader=_SpoolReader(fh, encoding),
    )
    weakref.finalize(doc, fh.close)  # closed (and gone) with the Document, without a ResourceWarning
    return doc


# ---------------------------------------------------------------- PDF


@contextlib.contextmanager
def _quiet_pypdf() -> Iterator[None]:
    """Silence pypdf's log messages and warnings around one call (not across a yield)."""
    if _debug:
        yield
        return
    logger = logging.getLogger("pypdf")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"pypdf(\.|$)")
            yield
    finally:
        logger.setLevel(level)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _open_pdf_reader(fh, password: str | None):
    from pypdf import PdfReader

    with _quiet_pypdf():
        reader = PdfReader(fh)
        if password is not None:
            reader.decrypt(password)
    return reader


def _extract_page(reader, i: int) -> tuple[str | None, str | None]:
    """(text, None), or (None, warning) when the page cannot be extracted."""
    try:
        with _quiet_pypdf():
            return reader.pages[i].extract_text() or "", None
    except Exception as exc:
        from pypdf.errors import DependencyError

        if isinstance(exc, DependencyError):
            raise
        return None, f"page {i + 1} skipped: {_reason(exc)}"


def _dependency_error(source: str, exc: Exception) -> DocumentError:
    return DocumentError(
        f"{source} needs an extra package to decrypt ({_reason(exc)}): pip install cryptography", source
    )


def _open_pdf(p: Path, source: str, head: bytes, fingerprint: str, password: str | None) -> Document:
    from pypdf import PasswordType
    from pypdf.errors import DependencyError

    if b"%PDF-" not in head[:1024]:
        raise DocumentError(f"{source} is not a readable PDF: no %PDF- header (is it really a PDF?)", source)
    warns: list[str] = []
    probed: dict[int, str | None] = {}
    try:
        with open(p, "rb") as fh:
            try:
                reader = _open_pdf_reader(fh, None)  # pypdf tries the empty password itself
                used: str | None = None
                if reader.is_encrypted:
                    with _quiet_pypdf():
                        empty_ok = reader.decrypt("") != PasswordType.NOT_DECRYPTED
                        given_ok = bool(password) and reader.decrypt(password) != PasswordType.NOT_DECRYPTED
                    if given_ok:
                        used = password
                    elif empty_ok:
                        used = ""  # opens without a password; one given for a whole batch is fine
                    elif password:
                        raise DocumentError(
                            f"{source} is encrypted and the password is wrong: check --password", source
                        )
                    else:
                        raise DocumentError(f"{source} is encrypted: pass --password", source)
                with _quiet_pypdf():
                    n_pages = len(reader.pages)
            except (DocumentError, DependencyError):
                raise
            except Exception as exc:
                raise DocumentError(f"{source} is not a readable PDF: {_reason(exc)}", source) from exc
            if n_pages == 0:
                raise DocumentError(f"{source} is empty: nothing to read (the PDF has no pages)", source)

            # Probe pages until one has text (page 1, usually); an image-only PDF reads to the end,
            # which is cheap as its pages have no text operators. The probed texts are kept.
            has_text = False
            for i in range(n_pages):
                text, problem = _extract_page(reader, i)
                probed[i] = text
                if problem:
                    warns.append(problem)
                elif _visible_chars(text) >= MIN_PAGE_CHARS:
                    has_text = True
                    break
    except DependencyError as exc:
        raise _dependency_error(source, exc) from exc
    except OSError as exc:
        raise _os_error(source, exc) from exc

    if len(probed) == n_pages and all(t is None for t in probed.values()):
        raise DocumentError(
            f"{source} is not a readable PDF: no page could be extracted ({warns[0].split(': ', 1)[1]})",
            source,
        )
    if not has_text:
        raise DocumentError(
            f"{source} has no extractable text (scanned? run OCR first, e.g. `ocrmypdf in.pdf out.pdf`)",
            source,
        )
    return Document(
        source=source,
        path=p,
        kind="pdf",
        fingerprint=fingerprint,
        warnings=warns,
        pages=n_pages,
        _reader=_PdfReader(p, used, n_pages, probed),
    )


# ---------------------------------------------------------------- JSONL records


def _iter_records(p: Path, source: str) -> Iterator[tuple[int, dict | DocumentError]]:
    """(line number, parsed object or the error for that line) for each non-blank line."""
    try:
        with open(p, encoding="utf-8-sig") as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield (
                        n,
                        DocumentError(
                            f"{source} line {n} is not valid JSON ({exc.msg}, column {exc.colno}): "
                            "fix or remove that line",
                            f"{source}#{n}",
                        ),
                    )
                    continue
                if not isinstance(obj, dict):
                    yield (
                        n,
                        DocumentError(
                            f"{source} line {n} is a JSON {type(obj).__name__}, not an object: "
                            f'write one object per line, e.g. {{"context": "..."}}',
                            f"{source}#{n}",
                        ),
                    )
                    continue
                yield n, obj
    except UnicodeDecodeError as exc:
        raise DocumentError(f"{source} is not UTF-8 text: JSONL must be UTF-8; re-save it", source) from exc
    except OSError as exc:
        raise _os_error(source, exc) from exc


def _record_document(p: Path, source: str, n: int, obj: dict) -> Document:
    name = f"{source}#{n}"
    key = next((k for k in RECORD_FIELDS if k in obj), None)
    if key is None:
        found = ", ".join(f'"{k}"' for k in list(obj)[:8]) or "none"
        raise DocumentError(
            f"{name} has no document text: expected a field named {_FIELDS_WORDS} "
            f"(found: {found}); rename the field that holds the document",
            name,
        )
    text = obj[key]
    if not isinstance(text, str):
        raise DocumentError(
            f'{name}: field "{key}" is a {type(text).__name__}, not a string: store the document as text',
            name,
        )
    if not text.strip():
        raise DocumentError(f'{name} is empty: its "{key}" field has no text', name)
    content = json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return Document(
        source=name,
        path=p,
        kind="jsonl-record",
        fingerprint=_hash(content),
        record=obj,
        _reader=_MemoryReader(text, f"record {n}"),
    )


def _open_single_record(p: Path, source: str) -> Document:
    first: tuple[int, dict | DocumentError] | None = None
    count = 0
    for n, item in _iter_records(p, source):
        count += 1
        first = first or (n, item)
    if first is None:
        raise DocumentError(f"{source} is empty: it has no JSON records", source)
    if count > 1:
        raise DocumentError(
            f"{source} holds {count} records: open one as {source}#<line number>, "
            "or give the file to `dynkv batch` or `dynkv rag` (one document per record)",
            source,
        )
    n, item = first
    if isinstance(item, DocumentError):
        raise item
    return _record_document(p, source, n, item)


def _open_record(p: Path, source: str, wanted: int) -> Document:
    for n, item in _iter_records(p, source):
        if n == wanted:
            if isinstance(item, DocumentError):
                raise item
            return _record_document(p, source, n, item)
        if n > wanted:
            break
    raise DocumentError(
        f"{source}#{wanted} does not exist: line {wanted} of {source} is blank or past the end "
        "(records are numbered by line, from 1)",
        f"{source}#{wanted}",
    )


# ---------------------------------------------------------------- iter_documents


def iter_documents(
    inputs: Sequence[str | Path],
    *,
    pattern: str | None = None,
    password: str | None = None,
) -> Iterator[Document | DocumentError]:
    """Documents for batch and rag: one per file, and one per record of a .jsonl file.

    `inputs` are files, folders (read recursively, hidden entries skipped, in natural order:
    "2.txt" before "10.txt"), glob strings ("reports/*.pdf", "**" allowed) and "-" for stdin.
    In a folder, files match `pattern` (a glob matched case-insensitively against the path
    relative to the folder, from the right: "*.pdf", "2023/*.md"), by default any accepted suffix.
    A file given by name or by glob is always opened. A file reached twice is read once.

    Raises DocumentError at once, before anything is read, for: no inputs, an input that does not
    exist, a folder with no matching files, a glob that matches no files. A file (or record) that
    fails to open is yielded as a DocumentError in its place, so a batch can record it and go on.
    """
    files = _expand_inputs(inputs, pattern)
    return _generate(files, password)


def _generate(files: list[tuple[str, Path | None]], password: str | None) -> Iterator[Document | DocumentError]:
    for source, p in files:
        if p is not None and p.suffix.lower() == ".jsonl" and p.is_file():
            try:
                any_record = False
                for n, item in _iter_records(p, source):
                    any_record = True
                    if isinstance(item, DocumentError):
                        yield item
                        continue
                    try:
                        yield _record_document(p, source, n, item)
                    except DocumentError as err:
                        yield err
                if not any_record:
                    yield DocumentError(f"{source} is empty: it has no JSON records", source)
            except DocumentError as err:
                yield err
            continue
        try:
            yield open_document("-" if p is None else source, password=password)
        except DocumentError as err:
            yield err


_GLOB_CHARS = re.compile(r"[*?\[]")


def _expand_inputs(inputs: Sequence[str | Path], pattern: str | None) -> list[tuple[str, Path | None]]:
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if not inputs:
        raise DocumentError("no input given: pass a file, a folder, a glob like 'docs/*.pdf', or '-'")
    out: list[tuple[str, Path | None]] = []
    seen: set[Path | None] = set()

    def add(source: str, p: Path | None) -> None:
        key = None if p is None else p.resolve()
        if key not in seen:
            seen.add(key)
            out.append((source, p))

    for item in inputs:
        s = str(item)
        p = Path(item)
        if s == "-":
            add("<stdin>", None)
        elif p.is_dir():
            matches = _walk_folder(p, pattern)
            if not matches:
                what = f"matching '{pattern}'" if pattern else f"dynkv can read ({' '.join(ACCEPTED_SUFFIXES)})"
                todo = "check --pattern" if pattern else "check the folder, or pass --pattern"
                raise DocumentError(f"{s} has no files {what}: {todo}", s)
            for rel in matches:
                add(str(p / rel), p / rel)
        elif p.exists():
            add(s, p)
        elif _GLOB_CHARS.search(s):
            hits = [h for h in glob.glob(s, recursive=True) if os.path.isfile(h)]
            if not hits:
                raise DocumentError(f"'{s}' matches no files: check the pattern and the folder", s)
            for h in sorted(hits, key=_natural_key):
                add(h, Path(h))
        else:
            m = re.fullmatch(r"(.+\.jsonl)#(\d+)", s, flags=re.IGNORECASE)
            if m and Path(m.group(1)).is_file():
                add(s, Path(s))  # one record: open_document reads it
                continue
            raise DocumentError(f"{s} does not exist: check the path{_did_you_mean(p)}", s)
    return out


def skipped_files(
    inputs: Sequence[str | Path], *, pattern: str | None = None, ignore: Sequence[str | Path] = ()
) -> dict[str, list[str]]:
    """Files in the folder inputs that :func:`iter_documents` passes over because dynkv cannot read them.

    Maps each folder (as given) to its skipped files (paths under it, natural order); folders with
    none are left out. Hidden entries and the paths in ``ignore`` (e.g. the run's own output) are not
    counted. With a ``pattern`` the user chose the files, so nothing is reported.
    """
    if pattern:
        return {}
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    ignored = {os.path.realpath(p) for p in ignore}
    seen: set[str] = set()
    out: dict[str, list[str]] = {}
    for item in inputs:
        root = Path(item)
        if str(item) == "-" or not root.is_dir():
            continue
        passed: list[str] = []
        _walk_folder(root, None, skipped=passed)
        for rel in passed:
            real = os.path.realpath(root / rel)
            if real in ignored or real in seen:
                continue
            seen.add(real)
            out.setdefault(str(item), []).append(str(root / rel))
    return out


def describe_skipped(folder: str, files: Sequence[str]) -> str:
    """One line: how many files of ``folder`` were skipped, by kind ("2 .docx, 1 without a suffix")."""
    kinds: dict[str, int] = {}
    for f in files:
        suffix = Path(f).suffix.lower()
        kinds[suffix] = kinds.get(suffix, 0) + 1
    parts = [
        f"{n} {suffix or 'without a suffix'}"
        for suffix, n in sorted(kinds.items(), key=lambda kv: (-kv[1], not kv[0], kv[0]))
    ]
    return (
        f"skipped {len(files)} file(s) in {folder} that dynkv cannot read: {', '.join(parts)} "
        "(convert them to PDF or plain text, or choose files with --pattern)"
    )


def _walk_folder(root: Path, pattern: str | None, skipped: list[str] | None = None) -> list[str]:
    """Relative posix paths of matching files under root, natural order, hidden entries skipped.

    Files passed over for their suffix (no pattern given) are appended to ``skipped`` when given.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if name.startswith("."):
                continue
            rel = (rel_dir / name).as_posix()
            if pattern:
                ok = PurePosixPath(rel.lower()).match(pattern.lower())
            else:
                ok = Path(name).suffix.lower() in ACCEPTED_SUFFIXES
            if os.path.isfile(os.path.join(dirpath, name)):
                if ok:
                    found.append(rel)
                elif skipped is not None and not pattern:
                    skipped.append(rel)
    if skipped is not None:
        skipped.sort(key=_natural_key)
    return sorted(found, key=_natural_key)


def _natural_key(s: str) -> list:
    return [(0, int(t), t) if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", s) if t]


# ---------------------------------------------------------------- helpers


def _visible_chars(text: str) -> int:
    return len("".join(text.split()))


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _os_error(source: str, exc: OSError) -> DocumentError:
    if isinstance(exc, PermissionError):
        return DocumentError(f"cannot read {source}: permission denied (check the file's permissions)", source)
    return DocumentError(f"cannot read {source}: {exc.strerror or _reason(exc)}", source)


def _did_you_mean(p: Path) -> str:
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
