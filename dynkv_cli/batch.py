"""`dynkv batch`: one task over many documents, one JSON line per document, resumable.

Contracts:

* Each record is one line written with a single ``write`` to a file opened for appending, then
  flushed to disk (``fsync``) before the next document starts: a crash loses at most the document
  being worked on, never a line already written. SIGINT/SIGTERM wait until the line is whole.
  A write that fails (disk full, file size limit) is undone (the file is cut back to its last whole
  line) and raises :class:`DynkvError` saying how many documents are saved.
* A record is identified by the document, not by how its path was spelled: ``doc_id`` is the
  resolved path (``data.jsonl#12``: the resolved file + ``#12``) and ``doc_fingerprint`` is
  :attr:`Document.fingerprint`. Records written before these fields existed are matched by
  resolving their ``source`` (relative to the current folder). When the file holds several records
  of one document, the last one counts.
* Every record carries the settings that made it: ``model``, ``model_fingerprint``, ``method``,
  ``budget``, ``profile``, ``settings`` (chunk size, generation settings, question mode, and hashes
  of the prompt, the retention settings and the ``--question`` list) and ``settings_hash``.
* Rerunning with the same ``--out`` skips every document that already has a record (done or failed),
  except:

  - a document whose content changed (same ``doc_id``, another fingerprint) is done again (a new
    record is appended, an old error record is dropped; :attr:`BatchSummary.changed`);
  - ``retry_failed`` runs the failed ones again and drops their old lines;
  - a document done with other settings: the batch is refused before any work
    (:class:`UsageError` naming the setting), unless ``redo_changed``: then it is done again
    (appended; :attr:`BatchSummary.redone`). Only answered records are compared (an error record is
    redone by ``retry_failed``); a field an old record lacks is not compared.

  A torn last line (a crash in the middle of a write) is cut off before anything is appended.
* A bad document is recorded with its error and the batch goes on. :attr:`BatchSummary.failed`
  counts the documents of this batch whose record is an error (from this run or an earlier one).
* One batch at a time per output file: :class:`BatchLock`, an exclusive ``flock`` on the hidden
  sibling ``.NAME.lock`` (it holds the pid of the batch that writes; removed at the end). A second
  batch fails at once with :class:`BatchLockedError` (exit code 1: nothing is wrong with the
  command, it can run once the other one is done).
* ``out`` must not be an input or inside an input folder, and an existing ``out`` must be a batch
  results file (or empty) and a regular file (not ``/dev/stdout`` or a pipe: it is read back to
  resume): anything else is refused before the first document.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import signal
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

from .documents import Document, DocumentError, iter_documents, skipped_files
from .errors import DynkvError, UsageError
from .outputs import check_output, replacing
from .tasks import TaskResult, TaskRunner, failed

QUESTION_FIELDS = ("question", "questions", "input")
_RECORD_SOURCE = re.compile(r"(.+\.jsonl)#(\d+)", flags=re.IGNORECASE)
_os_write = os.write  # the calls that put a line on disk (a test makes them fail like a full disk)
_os_fsync = os.fsync


@dataclass
class BatchSummary:
    out: Path
    total: int = 0  # documents in this batch
    done: int = 0  # processed now, successfully
    failed_now: int = 0  # processed now, with an error
    skipped: int = 0  # already in the output file
    failed: int = 0  # documents of this batch whose record is an error
    changed: int = 0  # processed now because the document changed since its record was written
    redone: int = 0  # processed now because its record was made with other settings (redo_changed)
    dropped_lines: int = 0  # torn or unreadable lines found in the output file
    failures: list[tuple[str, str]] = field(default_factory=list)  # (source, error) of this batch
    skipped_files: list[str] = field(default_factory=list)  # files in input folders dynkv cannot read
    changed_sources: list[str] = field(default_factory=list)  # the documents counted in ``changed``
    seconds: float = 0.0  # wall time of the documents done now (model loading and start-up not included)

    def to_dict(self) -> dict:
        return {
            "out": str(self.out),
            "total": self.total,
            "done": self.done,
            "failed_now": self.failed_now,
            "skipped": self.skipped,
            "failed": self.failed,
            "changed": self.changed,
            "redone": self.redone,
            "dropped_lines": self.dropped_lines,
            "skipped_files": self.skipped_files,
            "seconds": round(self.seconds, 2),
        }


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during a batch: ``saved`` documents of the batch have their line in ``out``."""

    def __init__(self, out: str | Path, saved: int):
        super().__init__(f"interrupted; {saved} document(s) are saved in {out}")
        self.out = out
        self.saved = saved


class BatchLockedError(DynkvError):
    """Another ``dynkv batch`` is writing the same results file (exit code 1: try again later)."""


class BatchLock:
    """An exclusive advisory lock for one results file: ``flock`` on ``.NAME.lock`` next to it.

    The lock file holds the pid of the process that has the lock. :meth:`release` removes it; a
    process that locked a lock file just removed by its previous holder notices (another inode at
    the path) and locks the new one, so two processes never both hold the lock.
    """

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.path = self.out.parent / f".{self.out.name}.lock"
        self.fd: int | None = None

    def __enter__(self) -> BatchLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> BatchLock:
        if self.fd is not None:
            return self
        require_regular(self.out)
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise DynkvError(f"cannot create the lock file {self.path}: {e.strerror}") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                pid = _read_pid(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise locked_error(self.out, pid) from None
                raise DynkvError(f"cannot lock {self.path}: {e.strerror}") from e
            try:
                st = os.stat(self.path)
                mine = os.fstat(fd)
                same = (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed it as it let go: lock the file that is there now
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self.fd = fd
            return self
        raise DynkvError(f"cannot lock {self.path}: it keeps being replaced; is another program writing there?")

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still locked: nobody can hold a lock on the removed file
        os.close(self.fd)
        self.fd = None


def require_regular(out: str | Path) -> None:
    """Refuse an ``out`` that exists and is not a regular file (``/dev/stdout``, a pipe): it cannot be read back."""
    try:
        st = os.stat(out)
    except OSError:
        return
    if not stat.S_ISREG(st.st_mode) and not stat.S_ISDIR(st.st_mode):
        raise UsageError(
            f"--out {out} is not a regular file: a batch appends to its results file and reads it back to "
            "resume; give a file name like results.jsonl"
        )


def locked_error(out: str | Path, pid: int | None) -> BatchLockedError:
    who = f"pid {pid}" if pid else "pid unknown"
    return BatchLockedError(
        f"{out} is being written by another dynkv batch ({who}); wait for it or choose another --out"
    )


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


class ResultsFile:
    """The JSONL output: read what is there, repair a torn tail, append whole lines durably.

    ``records`` maps each document's identity (:func:`record_key`) to its last record. Without a
    ``lock`` the file takes its own :class:`BatchLock` (and lets it go on close).
    """

    def __init__(self, path: str | Path, lock: BatchLock | None = None):
        self.path = Path(path)
        self.fd: int | None = None
        self.records: dict[str, dict] = {}
        self.dropped = 0
        self._lock = lock
        self._own_lock: BatchLock | None = None

    def __enter__(self) -> ResultsFile:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        if self.path.is_dir():
            raise UsageError(f"--out {self.path} is a folder; give a file name like results.jsonl")
        if self.path.parent and not self.path.parent.exists():
            raise UsageError(f"--out {self.path}: folder {self.path.parent} does not exist")
        require_regular(self.path)
        if self._lock is None:
            self._own_lock = BatchLock(self.path).acquire()
        try:
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            except OSError as e:
                raise DynkvError(f"cannot open {self.path} for writing: {e.strerror}") from e
            try:  # the results file itself too: earlier dynkv versions locked only that
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise locked_error(self.path, None) from None
            self._load()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self._own_lock is not None:
            self._own_lock.release()
            self._own_lock = None

    def _load(self) -> None:
        with open(self.path, "rb") as fh:
            data = fh.read()
        end = len(data)
        if data and not data.endswith(b"\n"):
            end = data.rfind(b"\n") + 1  # a torn last line: cut it off
            try:
                os.ftruncate(self.fd, end)
                os.fsync(self.fd)
            except OSError as e:
                raise DynkvError(f"cannot repair the torn last line of {self.path}: {e.strerror}") from e
            self.dropped += 1
        for raw in data[:end].splitlines():
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                key = record_key(rec)
            except (ValueError, KeyError, TypeError, AttributeError):
                self.dropped += 1
                continue
            self.records[key] = rec  # the last record of a document wins

    def append(self, record: dict) -> None:
        """Write ``record`` as one whole line and fsync it; on failure the file is cut back and OSError raised."""
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with _signals_held():
            start = os.fstat(self.fd).st_size
            try:
                view = memoryview(line)
                while view:  # one write for a line in practice; loop only on a short write
                    n = _os_write(self.fd, view)
                    view = view[n:]
                _os_fsync(self.fd)
            except OSError:
                with contextlib.suppress(OSError):  # no half line left behind (a rerun would cut it anyway)
                    os.ftruncate(self.fd, start)
                    os.fsync(self.fd)
                raise
            self.records[record_key(record)] = record  # before an interrupt held meanwhile lands

    def drop(self, keys: set[str]) -> None:
        """Rewrite the file without the records of ``keys`` (atomically: temp file, fsync, rename)."""
        old = self.fd
        try:
            with replacing(self.path) as tmp, open(self.path, "rb") as fh, open(tmp, "wb") as out:
                for raw in fh:
                    try:
                        if record_key(json.loads(raw)) in keys:
                            continue
                    except (ValueError, KeyError, TypeError, AttributeError):
                        continue
                    out.write(raw)
        except OSError as e:
            raise DynkvError(f"cannot rewrite {self.path} without the failed records: {e.strerror or e}") from e
        self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        with contextlib.suppress(OSError):
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(old)
        for k in keys:
            self.records.pop(k, None)


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT and SIGTERM while a line is written: it is whole when the interrupt lands."""
    held = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (AttributeError, OSError, ValueError):  # pragma: no cover - platforms without it
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# ---- identity and settings -------------------------------------------------------------------------


def _real(path: str | Path) -> str:
    return os.path.realpath(os.path.abspath(path))


def source_key(source: str) -> str:
    """The identity of a document named ``source``: its resolved path (a JSONL record: file + ``#n``)."""
    if not source or source.startswith("<"):  # <stdin>, <text>
        return source
    m = _RECORD_SOURCE.fullmatch(source)
    if m and not os.path.exists(source):
        return f"{_real(m.group(1))}#{m.group(2)}"
    return _real(source)


def item_key(item: Document | DocumentError) -> str:
    """The identity of a batch item (see the module doc)."""
    if isinstance(item, Document) and item.path is not None:
        if item.kind == "jsonl-record":
            m = re.search(r"#(\d+)$", item.source)
            if m:
                return f"{_real(item.path)}#{m.group(1)}"
        return _real(item.path)
    return source_key(_source(item))


def record_key(rec: dict) -> str:
    """The identity of a record: ``doc_id``, or for records without one, its resolved ``source``."""
    key = rec.get("doc_id")
    if isinstance(key, str) and key:
        return key
    source = rec["source"]
    if not isinstance(source, str):
        raise TypeError("source is not a string")
    return source_key(source)


def item_fingerprint(item: Document | DocumentError) -> str | None:
    """:attr:`Document.fingerprint`; for a file that failed to open, the same hash of its path, size and mtime."""
    if isinstance(item, Document):
        return item.fingerprint
    source = _source(item)
    if not source or source.startswith("<") or (_RECORD_SOURCE.fullmatch(source) and not os.path.exists(source)):
        return None  # stdin, a bad JSONL record: no content to tell a change by (--retry-failed redoes it)
    try:
        p = Path(source)
        st = p.stat()
        return hashlib.sha256(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    except OSError:
        return None


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _non_default(obj, skip: Sequence[str] = ()) -> dict:
    """The fields of a settings dataclass that differ from its defaults (a field added later does not count)."""
    if not is_dataclass(obj):
        return {"value": str(obj)}
    values = asdict(obj)
    try:
        defaults = asdict(type(obj)())
    except TypeError:  # pragma: no cover - a class without defaults
        defaults = {}
    return {k: v for k, v in values.items() if k not in skip and (k not in defaults or defaults[k] != v)}


_GENERATION_SHOWN = ("max_new_tokens", "temperature", "top_p", "stop", "seed")


def profile_settings(profile, task: str, questions: Sequence[str] = (), chunk_size: int | None = None) -> dict:
    """The settings of a record that the profile decides (no model needed); ``chunk_size`` None: not known yet."""
    p = profile
    gen = p.generation
    prompt = {"prompt": _non_default(p.prompt)}
    if task == "summarize":
        prompt["instruction"] = p.instruction
    else:
        prompt["probe"] = p.probe
    if task == "rag":
        prompt["passage_header"] = p.passage_header
    settings = {
        "chunk_size": chunk_size or p.chunk_size,
        **{k: getattr(gen, k, None) for k in _GENERATION_SHOWN},
        "generation": _digest(_non_default(gen, skip=_GENERATION_SHOWN)),
        "questions_mode": p.questions if task != "summarize" else None,
        "questions": _digest(list(questions)) if questions else None,
        "prompt": _digest(prompt),
        "retention": _digest({k: v for part in p.compression.spec.settings for k, v in _non_default(part).items()}),
    }
    if isinstance(settings["stop"], tuple):
        settings["stop"] = list(settings["stop"])
    return {"method": p.method, "budget": str(p.budget), "profile": p.name, "settings": settings}


def batch_settings(runner: TaskRunner, task: str, questions: Sequence[str] = ()) -> dict:
    """The settings that make a record's answer: stored in every record, compared on a rerun."""
    lm = getattr(runner, "lm", None)
    shape = getattr(lm, "shape", None)
    chunk_size = getattr(getattr(runner, "engine", None), "chunk_size", None)
    part = profile_settings(runner.profile, task, questions, chunk_size if isinstance(chunk_size, int) else None)
    return {
        "model": getattr(lm, "name", "") or "",
        "model_fingerprint": shape.fingerprint() if shape is not None else None,
        "method": part["method"],
        "budget": part["budget"],
        "profile": part["profile"],
        "settings_hash": _digest(part["settings"]),
        "settings": part["settings"],
    }


_FIELD_LABELS = {"method": "method", "budget": "budget", "profile": "profile"}
_SETTING_LABELS = {
    "chunk_size": "chunk size",
    "max_new_tokens": "max new tokens",
    "temperature": "temperature",
    "top_p": "top-p",
    "stop": "stop strings",
    "seed": "seed",
    "questions_mode": "questions mode",
}
_HASHED_LABELS = {
    "generation": "other generation settings (the profile's)",
    "questions": "other --question questions",
    "prompt": "another prompt (the profile's prompt, instruction or probe)",
    "retention": "other retention settings (the profile's)",
}


def _model_name(name) -> str:
    return os.path.basename(str(name or "").rstrip("/\\")) or str(name or "")


def differences(rec: dict, now: dict) -> list[tuple[str, object, object]]:
    """(what, the record's value, this run's value) for each setting that differs; fields ``rec`` lacks are not compared.

    For hashed settings ``what`` is the whole phrase and the values are None.
    """
    out: list[tuple[str, object, object]] = []
    old_fp = rec.get("model_fingerprint")
    if "model" not in now:  # checked before the model is loaded
        pass
    elif old_fp and now.get("model_fingerprint"):
        if old_fp != now["model_fingerprint"]:
            if _model_name(rec.get("model")) != _model_name(now["model"]):
                out.append(("model", rec.get("model"), now["model"]))
            else:
                out.append(("model weights (fingerprint)", old_fp, now["model_fingerprint"]))
    elif rec.get("model") and now.get("model") and _model_name(rec["model"]) != _model_name(now["model"]):
        out.append(("model", rec["model"], now["model"]))
    for key, label in _FIELD_LABELS.items():
        if rec.get(key) not in (None, "") and str(rec[key]) != str(now[key]):
            out.append((label, rec[key], now[key]))
    old_settings = rec.get("settings")
    if isinstance(old_settings, dict):
        for key, label in _SETTING_LABELS.items():
            if key == "chunk_size" and now["settings"].get(key) is None:
                continue  # not known before the model is loaded
            if key in old_settings and old_settings[key] != now["settings"].get(key):
                out.append((label, old_settings[key], now["settings"].get(key)))
        for key, phrase in _HASHED_LABELS.items():
            if key in old_settings and old_settings[key] != now["settings"].get(key):
                out.append((phrase, None, None))
    elif rec.get("settings_hash") and now.get("settings_hash") and rec["settings_hash"] != now["settings_hash"]:
        out.append(("other prompt or generation settings", None, None))
    return out


def _show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def mismatch_message(out: str | Path, diffs: dict[str, list[tuple[str, object, object]]]) -> str:
    """One line: which settings of ``out``'s records differ from this run's, for how many documents."""
    olds: dict[str, list[str]] = {}
    news: dict[str, str] = {}
    for found in diffs.values():
        for what, old, new in found:
            shown = olds.setdefault(what, [])
            if old is not None or new is not None:
                if _show(old) not in shown:
                    shown.append(_show(old))
                news[what] = _show(new)
    parts = []
    for what, shown in olds.items():
        parts.append(f"{what} {', '.join(shown)} (this run: {news[what]})" if what in news else what)
    return (
        f"{out} was made with {' and '.join(parts)} for {len(diffs)} document(s); "
        "start a new --out file, or pass --redo-changed to redo them"
    )


def questions_for(doc: Document, questions: Sequence[str]) -> list[str]:
    """The questions for one document: the ones given, else the record's ``question``/``input`` field."""
    if questions:
        return list(questions)
    rec = doc.record or {}
    for key in QUESTION_FIELDS:
        if key == "input" and "context" not in rec:
            continue  # "input" is the document itself unless the record has a "context"
        value = rec.get(key)
        if isinstance(value, str) and value.strip():
            return [value]
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return list(value)
    return []


def run_batch(
    runner: TaskRunner | Callable[[], TaskRunner],
    inputs: Sequence[str],
    task: str,
    out: str | Path,
    *,
    questions: Sequence[str] = (),
    pattern: str | None = None,
    password: str | None = None,
    retry_failed: bool = False,
    redo_changed: bool = False,
    lock: BatchLock | None = None,
    profile=None,
    debug: bool = False,
    on_start: Callable[[int, int, str], None] | None = None,
    on_done: Callable[[int, int, TaskResult], None] | None = None,
    on_skipped: Callable[[str, list[str]], None] | None = None,
    pool=None,
) -> BatchSummary:
    """Run ``task`` over every document of ``inputs`` into ``out`` (JSONL). See the module docstring.

    ``out`` is checked first (:func:`~dynkv_cli.outputs.check_output`, kind "batch"): not an input,
    not inside an input folder, empty or a batch results file. ``on_skipped(folder, files)`` is called
    for each input folder with files dynkv cannot read (they are also in ``summary.skipped_files``).
    ``lock``: a :class:`BatchLock` of ``out`` the caller already holds (e.g. taken before loading
    the model); without it the batch takes one itself. ``runner`` may be a function that makes the
    runner (loads the model): it is called after ``out`` is locked and read, and with ``profile``
    (the runner's profile) the settings the profile decides are compared before that, so a rerun
    with another budget is refused without loading the model.

    ``pool``: a :class:`~dynkv_cli.raybatch.RayPool` (not started; ``runner`` is then unused) whose
    workers do the documents; this process still writes every line. It is started after the early
    settings check; the caller closes it. Lines are written in the order documents finish.
    """
    if task not in ("summarize", "qa", "rag"):
        raise UsageError(f"task {task!r} is not one of summarize, qa, rag")
    check_output(out, inputs, kind="batch")
    items = list(iter_documents(list(inputs), pattern=pattern, password=password))
    summary = BatchSummary(Path(out), total=len(items))
    for folder, files in skipped_files(list(inputs), pattern=pattern, ignore=[out]).items():
        summary.skipped_files.extend(files)
        if on_skipped:
            on_skipped(folder, files)
    with ResultsFile(out, lock=lock) as results:
        summary.dropped_lines = results.dropped
        other = {r.get("task") for r in results.records.values()} - {task}
        if other:
            raise UsageError(
                f"{out} already holds {', '.join(sorted(map(str, other)))} results; use another --out for --task {task}"
            )
        keys = [item_key(item) for item in items]
        prints = [item_fingerprint(item) for item in items]
        lazy = pool is not None or (callable(runner) and not hasattr(runner, "run"))
        if lazy and profile is not None and not redo_changed:  # refused before a model loads
            early = profile_settings(profile, task, questions)
            _, mismatched = _plan(results.records, items, keys, prints, early, retry_failed, [])
            if mismatched:
                raise UsageError(mismatch_message(out, mismatched))
        if pool is not None:
            now = pool.settings(task, questions)  # starts the workers
        else:
            if lazy:
                runner = runner()
            now = batch_settings(runner, task, questions)
        todo, mismatched = _plan(results.records, items, keys, prints, now, retry_failed, summary.changed_sources)
        if mismatched and not redo_changed:
            raise UsageError(mismatch_message(out, mismatched))
        redo = {
            k for k, why in todo.items() if why == "retry" or (why == "changed" and results.records[k].get("error"))
        }
        if redo:
            results.drop(redo)
        batch_keys = set(keys)
        jobs: list[_Job] = []
        for i, (item, key, fp) in enumerate(zip(items, keys, prints), start=1):
            why = todo.pop(key, None)  # a document reached twice in one batch is done once
            if why is None:
                summary.skipped += 1
            else:
                jobs.append(_Job(i, item, key, fp, why))
        n = len(items)

        def started(job: _Job) -> None:
            if on_start:
                on_start(job.index, n, _source(job.item))

        if pool is not None:
            finished = pool.run(jobs, task, questions, debug, item_of=lambda job: job.item, started=started)
        else:
            finished = _in_process(runner, jobs, task, questions, debug, started)
        t0 = time.perf_counter()
        try:
            for job, result in finished:
                record = result.to_dict()
                record.update(now)
                record["doc_id"] = job.key
                record["doc_fingerprint"] = job.fingerprint
                try:
                    results.append(record)
                except OSError as e:
                    raise DynkvError(_write_failed(out, e, len(batch_keys & results.records.keys()))) from e
                summary.changed += job.why == "changed"
                summary.redone += job.why == "settings"
                if result.ok:
                    summary.done += 1
                else:
                    summary.failed_now += 1
                if on_done:
                    on_done(job.index, n, result)
                summary.seconds = time.perf_counter() - t0
        except KeyboardInterrupt:
            raise BatchInterrupted(out, len(batch_keys & results.records.keys())) from None
        seen: set[str] = set()
        for item, key in zip(items, keys):
            rec = results.records.get(key)
            if key not in seen and rec is not None and rec.get("error"):
                seen.add(key)
                summary.failed += 1
                summary.failures.append((_source(item), rec["error"]))
    return summary


@dataclass
class _Job:
    """One document to do: its place in the batch (1-based), the item, its identity and why it is done."""

    index: int
    item: Document | DocumentError
    key: str
    fingerprint: str | None
    why: str


def _in_process(runner: TaskRunner, jobs: Sequence[_Job], task, questions, debug, started):
    """The documents one after another in this process: yields ``(job, result)``."""
    for job in jobs:
        started(job)
        yield job, run_one(runner, job.item, task, questions, debug)


def _plan(records, items, keys, prints, now, retry_failed, changed_sources):
    """What to do with each document: ``todo`` (key -> "new", "changed", "retry" or "settings") and the
    differing settings of each answered record (key -> :func:`differences`)."""
    todo: dict[str, str] = {}
    mismatched: dict[str, list] = {}
    for item, key, fp in zip(items, keys, prints):
        rec = records.get(key)
        if rec is None:
            todo[key] = "new"
        elif fp and rec.get("doc_fingerprint") and rec["doc_fingerprint"] != fp:
            todo[key] = "changed"
            changed_sources.append(_source(item))
        elif rec.get("error"):
            if retry_failed:
                todo[key] = "retry"
        else:
            diffs = differences(rec, now)
            if diffs:
                mismatched[key] = diffs
                todo[key] = "settings"
    return todo, mismatched


def _write_failed(out: str | Path, e: OSError, saved: int) -> str:
    reason = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        fix = "free space"
    elif e.errno == errno.EFBIG:
        fix = "raise the file size limit (ulimit -f)"
    else:
        fix = "fix that"
    return (
        f"cannot write {out}: {reason}; {saved} document(s) are saved, {fix} and run the same command again to resume"
    )


def _source(item: Document | DocumentError) -> str:
    if isinstance(item, Document):
        return item.source
    return item.source or str(item)


def run_one(runner: TaskRunner, item, task: str, questions: Sequence[str], debug: bool) -> TaskResult:
    """One document's result; a failure of the document (or, without ``debug``, a bug) is an error result."""
    profile = runner.profile.name
    source = _source(item)
    if isinstance(item, DocumentError):
        return failed(source, task, profile, item)
    try:
        qs = questions_for(item, questions) if task != "summarize" else []
        if task != "summarize" and not qs:
            raise UsageError(
                f'{source}: no question for --task {task}: pass -q, or give JSONL records a "question" field'
            )
        return runner.run(task, item, qs)
    except (DynkvError, DocumentError) as e:
        return failed(source, task, profile, e)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # a bug or a model failure on this document: record it, go on
        if debug:
            raise
        return failed(source, task, profile, e)
