"""The table from file suffix to reader, and `open_document`, which checks a path and hands it to one.

A format module registers its opener for its suffixes with :func:`register_reader`; `open_document`
does the checks every file needs (exists, a regular file, a registered suffix, not empty, first bytes
readable), builds a :class:`FileInput` and calls the opener. The suffix list in messages and the
files folder walking picks come from this table, so a new registration shows up everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .base import SNIFF_BYTES, Document, DocumentError, hash_bytes, not_found, os_error
from .stdin import open_stdin


@dataclass(frozen=True)
class FileInput:
    """A file `open_document` has checked (regular, not empty, first bytes read), given to its reader."""

    path: Path
    source: str  # display name, as the user gave it
    head: bytes  # the first SNIFF_BYTES bytes
    fingerprint: str  # of path + size + mtime
    password: str | None = None  # for encrypted formats (PDF); others ignore it


Opener = Callable[[FileInput], Document]
# All documents in one file (batch and rag read a .jsonl file as one document per record).
EachOpener = Callable[[Path, str], Iterator[Document | DocumentError]]
# One part of a file, addressed as "<file>#<n>" ("data.jsonl#12").
MemberOpener = Callable[[Path, str, int], Document]


@dataclass(frozen=True)
class Format:
    """How the files of one or more suffixes are read; see :func:`register_reader`."""

    open: Opener  # FileInput -> the Document
    magic: bytes | None = None  # first bytes that make a file without a suffix this format
    each: EachOpener | None = None  # the documents in one file, for folders and batches
    member: MemberOpener | None = None  # "<file>#<n>" -> that one document


_FORMATS: dict[str, Format] = {}  # suffix (lower case, "" for files without one) -> format, in registration order
_MEMBER = re.compile(r"(.+)#(\d+)")


def register_reader(
    *suffixes: str,
    magic: bytes | None = None,
    each: EachOpener | None = None,
    member: MemberOpener | None = None,
) -> Callable[[Opener], Opener]:
    """Decorator: `opener(FileInput) -> Document` reads files with these suffixes (".pdf"; "" for none).

    `magic`: a file without a suffix whose first bytes are these is read by this opener, not by the
    one registered for "". `each`: (path, source) -> the documents in the file, one by one, for
    folders and batches (default: the one `open_document` gives). `member`: (path, source, n) -> the
    document "<file>#<n>". A suffix registered again gets the new reader.
    """
    for suffix in suffixes:
        if suffix != suffix.lower() or not (suffix == "" or (suffix.startswith(".") and len(suffix) > 1)):
            raise ValueError(f"a suffix is '' or '.' and lower-case letters, like '.pdf': got {suffix!r}")

    def decorator(opener: Opener) -> Opener:
        fmt = Format(opener, magic, each, member)
        for suffix in suffixes:
            _FORMATS[suffix] = fmt
        return opener

    return decorator


def unregister_reader(*suffixes: str) -> None:
    """Forget the readers of these suffixes (tests that registered one clean up with this)."""
    for suffix in suffixes:
        _FORMATS.pop(suffix, None)


def accepted_suffixes() -> tuple[str, ...]:
    """The registered suffixes, in registration order ("" left out: files without one are sniffed)."""
    return tuple(s for s in _FORMATS if s)


def format_for(suffix: str) -> Format | None:
    """The format registered for `suffix` (any case), or None."""
    return _FORMATS.get(suffix.lower())


def split_member(source: str) -> tuple[Format, str, int] | None:
    """(format, file, n) when `source` is "<file>#<n>", the file exists and its format has members."""
    m = _MEMBER.fullmatch(source)
    if not m:
        return None
    fmt = format_for(Path(m.group(1)).suffix)
    if fmt is None or fmt.member is None or not Path(m.group(1)).is_file():
        return None
    return fmt, m.group(1), int(m.group(2))


def _unsupported(source: str, suffix: str) -> DocumentError:
    return DocumentError(
        f"{source} has an unsupported type '{suffix}': dynkv reads {' '.join(accepted_suffixes())} "
        "(and text files without a suffix); convert it to PDF or plain text first, "
        "or rename it to .txt if it is plain text",
        source,
    )


def open_document(path: str | Path, *, password: str | None = None) -> Document:
    """Open one input: a file, "-" for stdin, or "data.jsonl#<line>" for one JSONL record.

    Checks the input up front (exists, readable, not empty, decodable, PDF not encrypted or the
    password right, PDF has text) so that errors come before any work; the text itself is read
    when `segments()` runs. `password` is only used by encrypted PDFs (ignored elsewhere).
    Raises DocumentError.
    """
    if str(path) == "-":
        return open_stdin()
    p = Path(path)
    source = str(path)
    if not p.exists():
        address = split_member(source)
        if address:
            fmt, container, n = address
            return fmt.member(Path(container), container, n)
        raise not_found(source)
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
    if suffix and suffix not in _FORMATS:
        raise _unsupported(source, p.suffix)
    try:
        st = p.stat()
        if st.st_size == 0:
            raise DocumentError(f"{source} is empty: nothing to read", source)
        with open(p, "rb") as fh:
            head = fh.read(SNIFF_BYTES)
    except OSError as exc:
        raise os_error(source, exc) from exc
    fingerprint = hash_bytes(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode())

    fmt = _FORMATS.get(suffix)
    if not suffix:  # no suffix: a format whose first bytes these are, else the one for ""
        fmt = next((f for f in _FORMATS.values() if f.magic and head.startswith(f.magic)), fmt)
    if fmt is None:
        raise _unsupported(source, p.suffix)
    return fmt.open(FileInput(p, source, head, fingerprint, password))
