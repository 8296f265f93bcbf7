"""How bytes become text, for text files and stdin alike: byte-order marks, UTF-8, legacy 8-bit, binary.

The rules: a byte-order mark decides (UTF-8 or UTF-16); else UTF-8 when the bytes are valid UTF-8;
else Windows-1252 or Latin-1 with a warning, unless the bytes look binary (NUL bytes in the first
SNIFF_BYTES, or mostly control bytes there), which is refused with one line saying what to do.
"""

from __future__ import annotations

import codecs
import re

from .base import PASS_BYTES, SNIFF_BYTES, DocumentError

CP1252_WARNING = "decoded as Windows-1252 (not valid UTF-8)"
LATIN1_WARNING = "decoded as Latin-1 (not valid UTF-8)"

_CONTROL = bytes(b for b in [*range(32), 127] if b not in b"\t\n\r\f\v\b\x1b")
_UNDEFINED_CP1252 = re.compile(rb"[\x81\x8d\x8f\x90\x9d]")
_SPACE_BYTES = b" \t\n\r\f\v"


def bom_encoding(head: bytes) -> str | None:
    """The encoding a byte-order mark at the start of `head` names, or None."""
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    return None


def binary_error(source: str, head: bytes) -> DocumentError:
    """The error for a binary file, with a hint when it looks like UTF-16 without a byte-order mark."""
    hint = ""
    if head[1::2].count(0) > len(head) // 4 or head[0::2].count(0) > len(head) // 4:
        hint = " (if it is UTF-16 text, save it as UTF-8 or with a byte-order mark)"
    return DocumentError(
        f"{source} looks like a binary file, not text{hint}: convert it to a .txt or .pdf first", source
    )


def _mostly_control(head: bytes) -> bool:
    """More than 1 in 20 bytes of `head` are control bytes: binary, not a legacy 8-bit text."""
    return sum(head.count(c) for c in _CONTROL) > len(head) // 20


def check_text_stream(fh, source: str, head: bytes, empty: str = "only whitespace") -> tuple[str, list[str]]:
    """One streaming pass over an open binary file, from where it is: (encoding, warnings).

    `head` is the file's first SNIFF_BYTES. Refuses binary files, invalid UTF-16 and files with
    no text (`empty` says what to do then); never holds more than PASS_BYTES in memory.
    """
    bom = bom_encoding(head)
    if bom is None and b"\0" in head:
        raise binary_error(source, head)
    decoder = codecs.getincrementaldecoder(bom or "utf-8")()
    utf_ok = True
    cp1252_ok = True
    has_text = False
    while block := fh.read(PASS_BYTES):
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
    if _mostly_control(head):
        raise binary_error(source, head)
    if cp1252_ok:
        return "cp1252", [CP1252_WARNING]
    return "latin-1", [LATIN1_WARNING]


def decode_bytes(data: bytes, source: str) -> tuple[str, list[str]]:
    """Decode bytes already in memory (stdin without a byte stream) by the same rules: (text, warnings)."""
    head = data[:SNIFF_BYTES]
    bom = bom_encoding(head)
    if bom is None and b"\0" in head:
        raise binary_error(source, head)
    try:
        text = data.decode(bom or "utf-8")
        warns: list[str] = []
    except UnicodeDecodeError as exc:
        if bom == "utf-16":
            raise DocumentError(
                f"{source} starts with a UTF-16 byte-order mark but is not valid UTF-16: send UTF-8 text",
                source,
            ) from exc
        if _mostly_control(head):
            raise binary_error(source, head) from exc
        try:
            text, warns = data.decode("cp1252"), [CP1252_WARNING]
        except UnicodeDecodeError:
            text, warns = data.decode("latin-1"), [LATIN1_WARNING]
    return text.replace("\r\n", "\n").replace("\r", "\n"), warns
