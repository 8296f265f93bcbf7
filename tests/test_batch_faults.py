"""`dynkv batch` under faults: killed (SIGKILL), interrupted (SIGINT), a full disk, a file size limit.

A batch of 100 short documents, 10 of them bad, with the tiny random model on CPU. The process tests
run `dynkv batch` as a subprocess and are marked ``slow`` (one to two minutes each on two slow cores;
deselect them with ``-m "not slow"``). In every case the end state is the same: one whole line per document, none twice.
"""

from __future__ import annotations

import errno
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import invoke, jsonl, one_error_line, write_docs

FAST = ["--max-new-tokens", "2", "--chunk-size", "128"]
N_DOCS, N_BAD = 100, 10
BAD = [
    ("empty.txt", b""),
    ("blank.txt", b"   \n\n  \n"),
    ("binary.txt", b"\x00\x01\x02binary\x00" * 20),
    ("image.txt", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64),
    ("report.docx", b"PK\x03\x04 not a format dynkv reads"),
    ("table.xlsx", b"PK\x03\x04 nor this"),
    ("notes.rtf", b"{\\rtf1 nor this}"),
    ("broken.pdf", b"%PDF-1.4\n garbage, no objects\n"),
    ("bad-utf16.txt", b"\xff\xfe\x00\xd8"),
    ("empty.md", b""),
]


def make_inputs(root: Path) -> Path:
    """``root/in``: 90 text documents and 10 bad files, interleaved (positions fixed by a seed)."""
    folder = root / "in"
    folder.mkdir()
    rnd = random.Random(1234)
    bad_at = set(rnd.sample(range(N_DOCS), N_BAD))
    bad = iter(BAD)
    for i in range(N_DOCS):
        if i in bad_at:
            name, data = next(bad)
            (folder / f"f{i:03d}-{name}").write_bytes(data)
        else:
            (folder / f"f{i:03d}.txt").write_text(f"Note {i}: the river is long and the pass key is {i}.\n")
    return folder


def cli_cmd(model: Path, *extra: str) -> list[str]:
    """`dynkv batch 'in/*' ...` as a subprocess (run in the folder above ``in``)."""
    code = "from dynkv_cli.cli import main; main()"
    return [sys.executable, "-c", code, "batch", "in/*", "--out", "results.jsonl", "--model", str(model),
            "--quiet", *FAST, *extra]  # fmt: skip


def lines_in(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def run_until(cmd: list[str], cwd: Path, out: Path, lines: int, sig: int, delay: float) -> tuple[int, int, str]:
    """Start ``cmd``; once ``out`` has ``lines`` lines wait ``delay`` s and send ``sig``.

    Returns (exit code, lines when the signal was sent, stderr).
    """
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    try:
        while lines_in(out) < lines:
            assert proc.poll() is None, f"the batch ended before line {lines}: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "the batch is too slow"
            time.sleep(0.02)
        time.sleep(delay)
        sent_at = lines_in(out)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, sent_at, err


def check_final(out: Path, folder: Path) -> None:
    """90 answers, 10 errors, each document exactly once, every line whole."""
    data = out.read_bytes()
    assert data.endswith(b"\n")
    recs = jsonl(out)  # every line parses
    sources = [rec["source"] for rec in recs]
    assert len(sources) == len(set(sources)) == N_DOCS
    assert {Path(s).name for s in sources} == {p.name for p in folder.iterdir()}
    ok = [rec for rec in recs if rec["error"] is None]
    bad = [rec for rec in recs if rec["error"]]
    assert len(ok) == N_DOCS - N_BAD and len(bad) == N_BAD
    assert all(rec["answer"] is not None for rec in ok)
    assert all(rec["error_type"] == "DocumentError" for rec in bad)


@pytest.mark.slow
def test_killed_three_times_and_resumed(model, tmp_path):
    folder = make_inputs(tmp_path)
    out = tmp_path / "results.jsonl"
    rnd = random.Random(20261201)
    points = sorted(rnd.sample(range(5, N_DOCS - 5), 3))
    for point in points:
        before = lines_in(out)
        code, sent_at, err = run_until(cli_cmd(model), tmp_path, out, max(point, before + 1), signal.SIGKILL,
                                       rnd.uniform(0, 0.3))  # fmt: skip
        assert code == -signal.SIGKILL, err
        assert lines_in(out) >= sent_at  # nothing already written is lost
        recs = jsonl(out)  # no torn line (a kill between two lines, or cut by the next run)
        assert len({r["source"] for r in recs}) == len(recs)
    done = subprocess.run(cli_cmd(model), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr  # the 10 bad documents
    check_final(out, folder)
    again = subprocess.run(cli_cmd(model, "--json"), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    summary = json.loads(again.stdout)
    assert (summary["skipped"], summary["done"], summary["failed"]) == (N_DOCS, 0, N_BAD)


@pytest.mark.slow
def test_interrupted_twice_and_resumed(model, tmp_path):
    folder = make_inputs(tmp_path)
    out = tmp_path / "results.jsonl"
    rnd = random.Random(7)
    for point in sorted(rnd.sample(range(5, N_DOCS - 5), 2)):
        code, sent_at, err = run_until(cli_cmd(model), tmp_path, out, max(point, lines_in(out) + 1), signal.SIGINT,
                                       rnd.uniform(0, 0.3))  # fmt: skip
        assert code == 130, err
        saved = lines_in(out)
        assert err.strip().splitlines()[-1] == (
            f"error: interrupted; {saved} document(s) are saved in results.jsonl, run the same command again to resume"
        )
        assert saved >= sent_at  # no finished line lost
        assert out.read_bytes().endswith(b"\n")  # the line being written when SIGINT came is whole
        jsonl(out)
    done = subprocess.run(cli_cmd(model), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    check_final(out, folder)


@pytest.mark.slow
def test_file_size_limit_mid_batch(model, tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse the write (EFBIG) mid-batch: the whole lines stay, the rest resumes."""
    folder = make_inputs(tmp_path)
    out = tmp_path / "results.jsonl"
    limit = 12_000  # a few records (about 1.5 kB each)

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run(cli_cmd(model), cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       preexec_fn=small_files)  # fmt: skip
    assert r.returncode == 1, r.stderr
    err = r.stderr.strip().splitlines()[-1]
    saved = lines_in(out)
    assert 0 < saved < N_DOCS
    assert err == (
        f"error: cannot write results.jsonl: File too large; {saved} document(s) are saved, "
        "raise the file size limit (ulimit -f) and run the same command again to resume"
    )
    assert out.read_bytes().endswith(b"\n") and len(jsonl(out)) == saved  # the failed line was cut back
    done = subprocess.run(cli_cmd(model), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    check_final(out, folder)


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_disk_full_mid_batch(model, tmp_path, monkeypatch, where):
    """ENOSPC after 4 records (the 5th half written, or written but not flushed): 4 whole lines, then resume."""
    from dynkv_cli import batch as batch_mod

    folder = tmp_path / "in"
    write_docs(folder, n=6, words=30)
    (folder / "empty.txt").write_bytes(b"")
    out = tmp_path / "results.jsonl"
    calls = {"n": 0}
    real_write, real_fsync = batch_mod._os_write, batch_mod._os_fsync

    def full_write(fd, data):
        calls["n"] += 1
        if calls["n"] == 5:
            return real_write(fd, bytes(data[: len(data) // 2]))  # a short write, then the disk is full
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    def full_fsync(fd):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    if where == "write":
        monkeypatch.setattr(batch_mod, "_os_write", full_write)
    else:
        monkeypatch.setattr(batch_mod, "_os_fsync", full_fsync)
    args = ["batch", folder, "--task", "summarize", "--out", out, "--model", model, "--quiet", *FAST]
    r = invoke(args)
    assert r.exit_code == 1
    assert one_error_line(r) == (
        f"error: cannot write {out}: No space left on device; 4 document(s) are saved, "
        "free space and run the same command again to resume"
    )
    first = out.read_bytes()
    assert first.endswith(b"\n") and len(jsonl(out)) == 4  # the fifth line is not half there
    monkeypatch.setattr(batch_mod, "_os_write", real_write)
    monkeypatch.setattr(batch_mod, "_os_fsync", real_fsync)
    r = invoke(args)
    assert r.exit_code == 1  # empty.txt
    recs = jsonl(out)
    assert out.read_bytes().startswith(first)
    assert sorted(rec["source"] for rec in recs) == sorted(str(p) for p in folder.iterdir())
    assert sum(1 for rec in recs if rec["error"]) == 1


@pytest.mark.slow
def test_two_batches_on_one_out(model, tmp_path):
    """A second `dynkv batch` on the --out a running one writes fails at once, naming the first one's pid."""
    folder = make_inputs(tmp_path)
    out = tmp_path / "results.jsonl"
    slow = ("--max-new-tokens", "400")  # long answers keep the first batch busy while the second starts
    first = subprocess.Popen(cli_cmd(model, *slow), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while lines_in(out) < 1:
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        t0 = time.monotonic()
        second = subprocess.run(cli_cmd(model, *slow), cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1, second.stderr
        assert second.stderr.strip() == (
            f"error: results.jsonl is being written by another dynkv batch (pid {first.pid}); "
            "wait for it or choose another --out"
        )
        assert first.poll() is None, "the second batch waited for the first one"
        took = time.monotonic() - t0
    finally:
        first.kill()
        first.wait()
    assert took < 60
    recs = jsonl(out)
    assert recs and len({rec["source"] for rec in recs}) == len(recs)  # nothing written twice
    assert {Path(rec["source"]).name for rec in recs} <= {p.name for p in folder.iterdir()}
