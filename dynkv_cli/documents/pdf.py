"""PDF files, through pypdf: one page at a time, encrypted files opened with --password.

Opening checks the file (a %PDF- header, readable, decryptable, pages) and extracts pages until one
has text, so that an image-only PDF is refused before any work; the probed pages are kept and the
rest are extracted while `segments()` runs. A page that fails is skipped with a warning. pypdf's
log messages and warnings are silenced unless `set_debug(True)`.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

from .base import Document, DocumentError, Reader, Segment, os_error, reason, visible_chars
from .registry import FileInput, register_reader

# A PDF page with fewer non-space characters than this has "no text" (a scan, maybe with a stray
# label or page number); a PDF none of whose pages has more is refused as image-only.
MIN_PAGE_CHARS = 20
MAGIC = b"%PDF-"

_debug = False


def set_debug(on: bool = True) -> None:
    """Let pypdf's log messages and warnings through (for `--debug`); they are silenced by default."""
    global _debug
    _debug = bool(on)


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
        return None, f"page {i + 1} skipped: {reason(exc)}"


def _dependency_error(source: str, exc: Exception) -> DocumentError:
    return DocumentError(
        f"{source} needs an extra package to decrypt ({reason(exc)}): pip install cryptography", source
    )


def _unreadable(source: str, why: str) -> DocumentError:
    return DocumentError(f"{source} is not a readable PDF: {why}", source)


class PdfReader(Reader):
    """Pages in order, each a segment; pages after the first start with "\\n\\n"."""

    def __init__(self, path: Path, password: str | None, n_pages: int, probed: dict[int, str | None]):
        self.path = path
        self.password = password  # the one that opened it ("" or the user's), None if not encrypted
        self.n_pages = n_pages
        self.probed = probed  # page index -> text (None: failed) extracted by open_pdf

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
                    if text is not None and visible_chars(text) < MIN_PAGE_CHARS:
                        textless += 1
                    if text and text.strip():
                        yield Segment(("\n\n" if emitted else "") + text, doc.source, f"page {i + 1}")
                        emitted = True
        except OSError as exc:
            raise os_error(doc.source, exc) from exc
        except DocumentError:
            raise
        except Exception as exc:  # pypdf failing outside a page (the file changed?)
            from pypdf.errors import DependencyError

            if isinstance(exc, DependencyError):
                raise _dependency_error(doc.source, exc) from exc
            raise _unreadable(doc.source, reason(exc)) from exc
        if textless and textless * 4 >= self.n_pages:
            note = (
                f"{textless} of {self.n_pages} pages have (almost) no text (scanned pages? run OCR first to read them)"
            )
            if note not in doc.warnings:
                doc.warnings.append(note)


@register_reader(".pdf", magic=MAGIC)
def open_pdf(f: FileInput) -> Document:
    """A PDF with text (kind "pdf", `pages` set); refuses encrypted ones without the right password."""
    from pypdf import PasswordType
    from pypdf.errors import DependencyError

    source, password = f.source, f.password
    if MAGIC not in f.head[:1024]:
        raise _unreadable(source, "no %PDF- header (is it really a PDF?)")
    warns: list[str] = []
    probed: dict[int, str | None] = {}
    try:
        with open(f.path, "rb") as fh:
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
                raise _unreadable(source, reason(exc)) from exc
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
                elif visible_chars(text) >= MIN_PAGE_CHARS:
                    has_text = True
                    break
    except DependencyError as exc:
        raise _dependency_error(source, exc) from exc
    except OSError as exc:
        raise os_error(source, exc) from exc

    if len(probed) == n_pages and all(t is None for t in probed.values()):
        raise _unreadable(source, f"no page could be extracted ({warns[0].split(': ', 1)[1]})")
    if not has_text:
        raise DocumentError(
            f"{source} has no extractable text (scanned? run OCR first, e.g. `ocrmypdf in.pdf out.pdf`)",
            source,
        )
    return Document(
        source=source,
        path=f.path,
        kind="pdf",
        fingerprint=f.fingerprint,
        warnings=warns,
        pages=n_pages,
        _reader=PdfReader(f.path, used, n_pages, probed),
    )
