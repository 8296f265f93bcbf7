"""`dynkv batch`: one task over many documents, one JSON line per document, resumable.

Contracts:

* Each record is one line written with a single ``write`` to a file opened for appending, then
  flushed to disk (``fsync``) before the next document starts: a crash loses at most the document
  being worked on, never a line already written.
* Rerunning with the same ``--out`` skips every source that already has a record (done or failed;
  ``retry_failed`` runs the failed ones again and drops their old lines). A torn last line (a crash
  in the middle of a write) is cut off before anything is appended.
* A bad document is recorded with its error and the batch goes on. :attr:`BatchSummary.failed`
  counts the documents of this batch whose record is an error (from this run or an earlier one).
* One batch at a time per output file (an exclusive lock on it).
* ``out`` must not be an input or inside an input folder, and an existing ``out`` must be a batch
  results file (or empty): anything else is refused before the first document.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .documents import Document, DocumentError, iter_documents, skipped_files
from .errors import DynkvError, UsageError
from .outputs import check_output, replacing
from .tasks import TaskResult, TaskRunner, failed

QUESTION_FIELDS = ("question", "questions", "input")


@dataclass
class BatchSummary:
    out: Path
    total: int = 0  # documents in this batch
    done: int = 0  # processed now, successfully
    failed_now: int = 0  # processed now, with an error
    skipped: int = 0  # already in the output file
    failed: int = 0  # documents of this batch whose record is an error
    dropped_lines: int = 0  # torn or unreadable lines found in the output file
    failures: list[tuple[str, str]] = field(default_factory=list)  # (source, error) of this batch
    skipped_files: list[str] = field(default_factory=list)  # files in input folders dynkv cannot read

    def to_dict(self) -> dict:
        return {
            "out": str(self.out),
            "total": self.total,
            "done": self.done,
            "failed_now": self.failed_now,
            "skipped": self.skipped,
            "failed": self.failed,
            "dropped_lines": self.dropped_lines,
            "skipped_files": self.skipped_files,
        }


class ResultsFile:
    """The JSONL output: read what is there, repair a torn tail, append whole lines durably."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fd: int | None = None
        self.records: dict[str, dict] = {}
        self.dropped = 0

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
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as e:
            raise DynkvError(f"cannot open {self.path} for writing: {e.strerror}") from e
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise DynkvError(
                f"{self.path} is in use by another dynkv batch; wait for it or use another --out"
            ) from None
        self._load()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _load(self) -> None:
        with open(self.path, "rb") as fh:
            data = fh.read()
        end = len(data)
        if data and not data.endswith(b"\n"):
            end = data.rfind(b"\n") + 1  # a torn last line: cut it off
            os.ftruncate(self.fd, end)
            os.fsync(self.fd)
            self.dropped += 1
        for raw in data[:end].splitlines():
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                source = rec["source"]
            except (ValueError, KeyError, TypeError):
                self.dropped += 1
                continue
            self.records[source] = rec

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(line)
        while view:  # one write for a line in practice; loop only on a short write
            n = os.write(self.fd, view)
            view = view[n:]
        os.fsync(self.fd)
        self.records[record["source"]] = record

    def drop(self, sources: set[str]) -> None:
        """Rewrite the file without the records of ``sources`` (atomically: temp file, fsync, rename)."""
        old = self.fd
        with replacing(self.path) as tmp, open(self.path, "rb") as fh, open(tmp, "wb") as out:
            for raw in fh:
                try:
                    if json.loads(raw).get("source") in sources:
                        continue
                except ValueError:
                    continue
                out.write(raw)
        self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(old)
        for s in sources:
            self.records.pop(s, None)


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
    runner: TaskRunner,
    inputs: Sequence[str],
    task: str,
    out: str | Path,
    *,
    questions: Sequence[str] = (),
    pattern: str | None = None,
    password: str | None = None,
    retry_failed: bool = False,
    debug: bool = False,
    on_start: Callable[[int, int, str], None] | None = None,
    on_done: Callable[[int, int, TaskResult], None] | None = None,
    on_skipped: Callable[[str, list[str]], None] | None = None,
) -> BatchSummary:
    """Run ``task`` over every document of ``inputs`` into ``out`` (JSONL). See the module docstring.

    ``out`` is checked first (:func:`~dynkv_cli.outputs.check_output`, kind "batch"): not an input,
    not inside an input folder, empty or a batch results file. ``on_skipped(folder, files)`` is called
    for each input folder with files dynkv cannot read (they are also in ``summary.skipped_files``).
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
    with ResultsFile(out) as results:
        summary.dropped_lines = results.dropped
        other = {r.get("task") for r in results.records.values()} - {task}
        if other:
            raise UsageError(
                f"{out} already holds {', '.join(sorted(map(str, other)))} results; use another --out for --task {task}"
            )
        sources = [_source(item) for item in items]
        if retry_failed:
            redo = {s for s in sources if s in results.records and results.records[s].get("error")}
            if redo:
                results.drop(redo)
        for i, (item, source) in enumerate(zip(items, sources), start=1):
            if source in results.records:
                summary.skipped += 1
                continue
            if on_start:
                on_start(i, len(items), source)
            result = _run_one(runner, item, task, questions, debug)
            results.append(result.to_dict())
            if result.ok:
                summary.done += 1
            else:
                summary.failed_now += 1
            if on_done:
                on_done(i, len(items), result)
        for s in sources:
            rec = results.records.get(s)
            if rec is not None and rec.get("error"):
                summary.failed += 1
                summary.failures.append((s, rec["error"]))
    return summary


def _source(item: Document | DocumentError) -> str:
    if isinstance(item, Document):
        return item.source
    return item.source or str(item)


def _run_one(runner: TaskRunner, item, task: str, questions: Sequence[str], debug: bool) -> TaskResult:
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
