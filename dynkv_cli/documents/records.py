"""JSON Lines files: one document per record, its text in the field "context", "text" or "input".

`open_document("data.jsonl")` opens a file of one record; "data.jsonl#12" opens the record on line
12; batch and rag read every record of a .jsonl file as its own document. Records are held in
memory (one at a time); the whole record is kept in `Document.record` for tasks to take fields from.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .base import Document, DocumentError, MemoryReader, hash_bytes, os_error
from .registry import FileInput, register_reader

RECORD_FIELDS = ("context", "text", "input")  # where a JSONL record keeps its document, in order
_FIELDS_WORDS = '"context", "text" or "input"'


def _iter_records(p: Path, source: str) -> Iterator[tuple[int, dict | DocumentError]]:
    """(line number, parsed object or the error for that line) for each non-blank line."""
    try:
        with open(p, encoding="utf-8-sig") as fh:
            for n, line in enumerate(fh, start=1):
                if line.strip():
                    yield n, _parse_record(line, source, n)
    except UnicodeDecodeError as exc:
        raise DocumentError(f"{source} is not UTF-8 text: JSONL must be UTF-8; re-save it", source) from exc
    except OSError as exc:
        raise os_error(source, exc) from exc


def _parse_record(line: str, source: str, n: int) -> dict | DocumentError:
    """The JSON object on line `n`, or the error that says why it is not one."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return DocumentError(
            f"{source} line {n} is not valid JSON ({exc.msg}, column {exc.colno}): fix or remove that line",
            f"{source}#{n}",
        )
    if not isinstance(obj, dict):
        return DocumentError(
            f"{source} line {n} is a JSON {type(obj).__name__}, not an object: "
            f'write one object per line, e.g. {{"context": "..."}}',
            f"{source}#{n}",
        )
    return obj


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
        fingerprint=hash_bytes(content),
        record=obj,
        _reader=MemoryReader(text, f"record {n}"),
    )


def _no_records(source: str) -> DocumentError:
    return DocumentError(f"{source} is empty: it has no JSON records", source)


def open_record(p: Path, source: str, wanted: int) -> Document:
    """The record on line `wanted` ("data.jsonl#12")."""
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


def each_record(p: Path, source: str) -> Iterator[Document | DocumentError]:
    """Every record as a Document, or the DocumentError in its place (batch and rag go on)."""
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
            yield _no_records(source)
    except DocumentError as err:
        yield err


@register_reader(".jsonl", each=each_record, member=open_record)
def open_records_file(f: FileInput) -> Document:
    """A .jsonl file given as one document: it must hold exactly one record."""
    first: tuple[int, dict | DocumentError] | None = None
    count = 0
    for n, item in _iter_records(f.path, f.source):
        count += 1
        first = first or (n, item)
    if first is None:
        raise _no_records(f.source)
    if count > 1:
        raise DocumentError(
            f"{f.source} holds {count} records: open one as {f.source}#<line number>, "
            "or give the file to `dynkv batch` or `dynkv rag` (one document per record)",
            f.source,
        )
    n, item = first
    if isinstance(item, DocumentError):
        raise item
    return _record_document(f.path, f.source, n, item)
