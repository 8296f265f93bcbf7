"""Many inputs at once (batch, rag): files, folders walked recursively, globs and "-" for stdin.

A folder yields the files whose suffix has a registered reader (or that match --pattern), in natural
order; a file whose format has documents in it (a .jsonl file's records) yields each of them.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

from .base import Document, DocumentError, not_found
from .registry import accepted_suffixes, format_for, open_document, split_member
from .stdin import SOURCE as STDIN_SOURCE

_GLOB_CHARS = re.compile(r"[*?\[]")


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
        fmt = None if p is None else format_for(p.suffix)
        if fmt is not None and fmt.each is not None and p.is_file():
            yield from fmt.each(p, source)
            continue
        try:
            yield open_document("-" if p is None else source, password=password)
        except DocumentError as err:
            yield err


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
            add(STDIN_SOURCE, None)
        elif p.is_dir():
            matches = _walk_folder(p, pattern)
            if not matches:
                what = f"matching '{pattern}'" if pattern else f"dynkv can read ({' '.join(accepted_suffixes())})"
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
        elif split_member(s):
            add(s, Path(s))  # one record: open_document reads it
        else:
            raise not_found(s)
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
    accepted = accepted_suffixes()
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
                ok = Path(name).suffix.lower() in accepted
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
