"""Tiny PDF writer for tests: hand-written PDF syntax, no files from outside the repo.

`text_pdf` writes one page per string (Helvetica, WinAnsi, one line of the page per line of the
string); `drawing_pdf` writes pages with only path operators (what a scan looks like to a text
extractor); `encrypted_copy` re-saves a PDF with pypdf's writer under a user password;
`corrupt_pdf` writes a PDF header followed by garbage.
"""

from __future__ import annotations

from pathlib import Path


def _pdf_string(line: str) -> bytes:
    raw = line.encode("cp1252")
    return b"(" + raw.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)") + b")"


def _text_stream(text: str) -> bytes:
    ops = [b"BT /F1 12 Tf 14 TL 72 720 Td"]
    for line in text.split("\n"):
        ops.append(_pdf_string(line) + b" Tj T*")
    ops.append(b"ET")
    return b"\n".join(ops)


def _drawing_stream(i: int) -> bytes:
    # A filled rectangle and a stroked line: content, but not a single character of text.
    return f"0.5 g {72 + i} 500 200 100 re f 0 G 2 w 72 400 m 400 {400 + i} l S".encode()


def _write_pdf(path: Path, streams: list[bytes]) -> Path:
    """Write a PDF with one page per content stream; returns `path`."""
    n = len(streams)
    # Object numbers: 1 catalog, 2 pages, 3 font, then (page, content) pairs.
    page_ids = [4 + 2 * i for i in range(n)]
    objects: list[bytes] = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [" + b" ".join(f"{p} 0 R".encode() for p in page_ids) + f"] /Count {n} >>".encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    ]
    for p, stream in zip(page_ids, streams):
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            + f"/Resources << /Font << /F1 3 0 R >> >> /Contents {p + 1} 0 R >>".encode()
        )
        objects.append(f"<< /Length {len(stream)} >>\nstream\n".encode() + stream + b"\nendstream")

    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref_at = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for off in offsets:
        out += f"{off:010d} 00000 n \n".encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref_at}\n%%EOF\n".encode()
    path.write_bytes(bytes(out))
    return path


def text_pdf(path: Path, pages: list[str]) -> Path:
    """A PDF whose page i shows `pages[i]` (newlines start new lines on the page)."""
    return _write_pdf(path, [_text_stream(t) for t in pages])


def drawing_pdf(path: Path, n_pages: int = 2) -> Path:
    """A PDF with pages that only draw shapes: no extractable text (like a scan)."""
    return _write_pdf(path, [_drawing_stream(i) for i in range(n_pages)])


def encrypted_copy(src: Path, dst: Path, user_password: str, algorithm: str = "AES-128") -> Path:
    """Re-save `src` encrypted (AES needs `cryptography`); the owner password is "owner-pw"."""
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(src))
    writer.encrypt(user_password=user_password, owner_password="owner-pw", algorithm=algorithm)
    with open(dst, "wb") as fh:
        writer.write(fh)
    return dst


def corrupt_pdf(path: Path) -> Path:
    """A file that starts like a PDF and then is garbage (no objects, no xref, no %%EOF)."""
    path.write_bytes(b"%PDF-1.4\n" + bytes(range(256)) * 4 + b"\x00garbage, not a pdf body")
    return path
