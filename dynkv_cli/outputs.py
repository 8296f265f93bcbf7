"""Where dynkv writes its results: checked before any work starts, and written whole.

    check_output(out, inputs, kind=...)  -> Path   (raises UsageError; call it before loading a model)
    replacing(path)                      -> a temporary path next to ``path``, renamed onto it on success
    write_text(path, text)               -> ``text`` written through :func:`replacing`

Contracts:

* An output is refused (:class:`UsageError`, one line saying what to do) when it is one of the run's
  inputs (same resolved path or same file; any path inside an input folder; a path an input glob
  matches), a folder, in a folder that does not exist (unless ``mkdir``: then the folder is made),
  or an existing file dynkv must not write over:

  - ``kind="text"`` (summarize, qa, rag): any existing file, unless ``force``;
  - ``kind="cache"`` (compress): a file that is not a dynkv cache, always; a dynkv cache unless ``force``;
  - ``kind="batch"``: a file that is not a dynkv batch results file (empty, or JSON lines whose
    records have ``source`` and ``task``). A results file is appended to: that is how a batch resumes.

* :func:`replacing` writes to a hidden temporary file in the output's folder, fsyncs it and renames it
  onto the output (``os.replace``), so a crash leaves the old file or the new one, never half a file.
  The temporary file is removed on failure. Special files (``/dev/stdout``, a pipe) are written directly.

Nothing here imports torch or transformers.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import DynkvError, UsageError

__all__ = ["check_output", "is_batch_results", "is_dynkv_cache", "replacing", "write_text"]

KINDS = ("text", "cache", "batch")
_EXAMPLE = {"text": "answer.txt", "cache": "doc.dkv", "batch": "results.jsonl"}
_GLOB_CHARS = re.compile(r"[*?\[]")
_HEAD_BYTES = 1 << 20  # how much of an existing file is read to tell whether dynkv wrote it


def check_output(
    out: str | Path,
    inputs: Sequence[str | Path] = (),
    *,
    kind: str = "text",
    force: bool = False,
    mkdir: bool = False,
    option: str = "--out",
) -> Path:
    """Refuse ``out`` if writing it could damage a user's file or lose the run's result (see module doc).

    With ``mkdir`` a missing output folder is created. Returns ``out`` as a :class:`Path`.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"{option} {out} is a folder; give a file name like {out / _EXAMPLE[kind]}")
    clash = _input_clash(out, inputs, option)
    if clash:
        raise UsageError(clash)
    if _special(out):  # /dev/stdout, a named pipe: written directly, nothing to damage
        return out
    _check_folder(out, mkdir, option)
    if _exists(out):
        _check_existing(out, kind, force, option)
    return out


def _input_clash(out: Path, inputs: Sequence[str | Path], option: str) -> str | None:
    target = _resolve(out)
    for item in inputs:
        s = str(item)
        if s == "-":
            continue
        p = Path(s)
        m = re.fullmatch(r"(.+\.jsonl)#\d+", s, flags=re.IGNORECASE)
        if m and not p.exists():
            p = Path(m.group(1))  # one record of a JSONL file: the file is the input
        if p.is_dir():
            if target.is_relative_to(_resolve(p)):
                if _exists(out):
                    return (
                        f"{option} {out} is a file in the input folder {s}: dynkv would write over a file "
                        f"it reads; choose a file outside {s}"
                    )
                return (
                    f"{option} {out} is inside the input folder {s}: the next run would read it as a document; "
                    f"choose a file outside {s}"
                )
        elif p.exists():
            if _same_file(out, p):
                return f"{option} {out} is the input {s}: dynkv would write over the document it reads; choose another file"
        elif _GLOB_CHARS.search(s):
            hits = [Path(h) for h in glob.glob(s, recursive=True)]
            if any(_same_file(out, h) for h in hits) or fnmatch.fnmatch(os.path.abspath(out), os.path.abspath(s)):
                return (
                    f"{option} {out} matches the input pattern '{s}': dynkv would read it as a document; "
                    "choose a file the pattern does not match"
                )
    return None


def _check_folder(out: Path, mkdir: bool, option: str) -> None:
    folder = out.parent
    if folder.is_dir():
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UsageError(f"{option} {out}: cannot write in the folder {folder} (permission denied)")
        return
    if _exists(folder):
        raise UsageError(f"{option} {out}: {folder} is a file, not a folder; choose another output path")
    if not mkdir:
        raise UsageError(
            f"{option} {out}: the folder {folder} does not exist; create it (mkdir -p {folder}) or pass --mkdir"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DynkvError(f"cannot create the folder {folder}: {e.strerror}") from e


def _check_existing(out: Path, kind: str, force: bool, option: str) -> None:
    if kind == "batch":
        if not is_batch_results(out):
            raise UsageError(
                f"{option} {out} exists and is not a dynkv batch results file; dynkv appends only to its own "
                "results: choose another file"
            )
    elif kind == "cache":
        if not is_dynkv_cache(out):
            raise UsageError(
                f"{option} {out} exists and is not a dynkv cache file; dynkv will not write over it: "
                "choose another file"
            )
        if not force:
            raise UsageError(f"{option} {out} already exists (a dynkv cache); pass --force to overwrite it")
    elif not force:
        raise UsageError(f"{option} {out} already exists; pass --force to overwrite it, or choose another file")


def is_dynkv_cache(path: str | Path) -> bool:
    """Whether ``path`` is a cache file written by ``dynkv compress`` (reads the safetensors header only)."""
    try:
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 2 <= size <= 100 << 20:
                return False
            header = json.loads(fh.read(size))
        meta = json.loads(header.get("__metadata__", {}).get("dynkv", "{}"))
    except (OSError, ValueError, AttributeError, TypeError):
        return False
    return isinstance(meta, dict) and str(meta.get("format", "")).startswith("dynkv-cache/")


def is_batch_results(path: str | Path) -> bool:
    """Whether ``path`` is empty or a results file of ``dynkv batch`` (its first record is looked at)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_HEAD_BYTES).lstrip()
    except OSError:
        return False
    if not head:
        return True
    end = head.find(b"\n")
    if end < 0:  # one line, torn by a crash (batch cuts it off) or longer than what was read
        return head.startswith(b'{"source": ')
    try:
        rec = json.loads(head[:end])
    except ValueError:
        return False
    return isinstance(rec, dict) and "source" in rec and "task" in rec


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success it is fsynced and renamed onto ``path``."""
    path = Path(path)
    if _special(path):  # a device or a pipe: there is nothing to replace
        yield path
        return
    mode = _mode_for(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_folder(path.parent)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` whole: a temporary file renamed into place."""
    path = Path(path)
    try:
        with replacing(path) as tmp:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text)
    except OSError as e:
        raise DynkvError(f"cannot write {path}: {e.strerror or e}") from e


# ---- helpers ---------------------------------------------------------------------------------------


def _exists(p: Path) -> bool:
    return os.path.lexists(p)


def _special(p: Path) -> bool:
    """An existing path that is not a regular file (``/dev/stdout``, a named pipe)."""
    try:
        return not stat.S_ISREG(os.stat(p).st_mode)
    except OSError:
        return False


def _resolve(p: Path) -> Path:
    return Path(os.path.realpath(os.path.abspath(p)))


def _same_file(a: Path, b: Path) -> bool:
    if _resolve(a) == _resolve(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _mode_for(path: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)  # keep an existing file's permissions
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
