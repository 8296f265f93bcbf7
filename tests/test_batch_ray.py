"""`dynkv batch --workers N` on a local Ray instance, with the real model (SmolLM2-135M-Instruct).

Skipped only where Ray is not installed (``pip install 'dynkv[ray]'``; the dev extra has it, so CI
runs these). A folder of 8 small documents, 2 of them bad, done by 2 workers of one CPU each:
the same records as the in-process batch, a killed worker replaced and its document retried, a
worker that dies twice on a document recorded as a failure, and a driver killed with SIGKILL
that loses and duplicates nothing when rerun.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import jsonl
from dynkv_cli.profiles import load_profile
from real_model import PARAGRAPHS

from dynkv_cli.batch import run_batch
from dynkv_cli.raybatch import RayPool, WorkerSpec

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'dynkv[ray]'")

N_GOOD = 6
MAX_NEW = 12


def make_docs(root: Path) -> Path:
    """``root/in``: 6 short real-text documents and 2 bad files (an empty one, a broken PDF)."""
    folder = root / "in"
    folder.mkdir()
    for i in range(N_GOOD):
        (folder / f"doc{i}.txt").write_text(PARAGRAPHS[i] + "\n")
    (folder / "empty.txt").write_bytes(b"")
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4\n garbage, no objects\n")
    return folder


def profile():
    return load_profile("summarize").with_overrides(max_new_tokens=MAX_NEW, budget="25%")


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    return make_docs(tmp_path_factory.mktemp("raydocs"))


@pytest.fixture(scope="module")
def pool(smollm2_gguf):
    """Two workers of one CPU each on a local Ray instance, shared by the tests of this file."""
    events: list[tuple[str, int, str]] = []
    p = RayPool(
        WorkerSpec(model=str(smollm2_gguf), profile=profile()),
        2,
        cpus_per_worker=1,
        on_event=lambda kind, info, text: events.append((kind, info.index, text)),
    )
    p.events = events
    try:
        p.start()
        yield p
    finally:
        p.close()


def answers(path: Path) -> dict[str, object]:
    out = {}
    for rec in jsonl(path):
        name = Path(rec["source"]).name
        out[name] = rec["error_type"] if rec["error"] else rec["answers"][0]["answer"]
    return out


def test_two_workers_match_the_in_process_batch(pool, docs, tmp_path, smollm2_gguf):
    import torch

    from dynkv_cli.model import load_model
    from dynkv_cli.tasks import TaskRunner

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker (cpus_per_worker=1): the same arithmetic, the same tokens
    try:
        runner = TaskRunner(load_model(str(smollm2_gguf)), profile())
        here = run_batch(runner, [str(docs)], "summarize", tmp_path / "here.jsonl")
    finally:
        torch.set_num_threads(threads)
    started: list[str] = []
    there = run_batch(
        None,
        [str(docs)],
        "summarize",
        tmp_path / "ray.jsonl",
        pool=pool,
        profile=profile(),
        on_start=lambda i, n, source: started.append(source),
    )
    assert (here.total, here.done, here.failed) == (8, N_GOOD, 2)
    assert (there.total, there.done, there.failed) == (8, N_GOOD, 2)
    a, b = answers(tmp_path / "here.jsonl"), answers(tmp_path / "ray.jsonl")
    assert a == b
    assert sum(isinstance(v, str) and v.strip() != "" for k, v in b.items() if k.startswith("doc")) == N_GOOD
    assert b["empty.txt"] == "DocumentError" and b["broken.pdf"] == "DocumentError"
    recs = {Path(r["source"]).name: r for r in jsonl(tmp_path / "ray.jsonl")}
    mine = {Path(r["source"]).name: r for r in jsonl(tmp_path / "here.jsonl")}
    for name in recs:  # the records carry the same settings, so either file resumes the other
        assert recs[name]["settings_hash"] == mine[name]["settings_hash"]
        assert recs[name]["model_fingerprint"] == mine[name]["model_fingerprint"]
    assert len(started) == N_GOOD  # bad documents never reach a worker
    workers_used = {w for kind, w, _ in pool.events if kind == "start"}
    assert workers_used == {0, 1}
    # a rerun skips everything, with the pool's settings matching the file's
    again = run_batch(None, [str(docs)], "summarize", tmp_path / "ray.jsonl", pool=pool, profile=profile())
    assert (again.skipped, again.done) == (8, 0)
    # the in-process file resumes under the pool too: same settings, nothing redone
    again = run_batch(None, [str(docs)], "summarize", tmp_path / "here.jsonl", pool=pool, profile=profile())
    assert (again.skipped, again.done) == (8, 0)


def _killer(pool, victim: str, times: int):
    """An on_start hook that SIGKILLs the worker given ``victim`` (the first ``times`` times it is given out)."""
    hits = []

    def on_start(i, n, source):
        if Path(source).name != victim or len(hits) >= times:
            return
        w = next(info for info in pool.info if info.current == source)
        hits.append(w.pid)
        os.kill(w.pid, signal.SIGKILL)

    return on_start, hits


def test_a_killed_worker_is_replaced_and_its_document_retried(pool, docs, tmp_path):
    restarts = pool.stats.restarts
    on_start, hits = _killer(pool, "doc2.txt", times=1)
    s = run_batch(None, [str(docs)], "summarize", tmp_path / "r.jsonl", pool=pool, profile=profile(), on_start=on_start)
    assert len(hits) == 1
    assert (s.done, s.failed) == (N_GOOD, 2)
    assert pool.stats.restarts == restarts + 1
    got = answers(tmp_path / "r.jsonl")
    assert isinstance(got["doc2.txt"], str) and got["doc2.txt"] not in ("WorkerDiedError", "DocumentError")
    assert len(jsonl(tmp_path / "r.jsonl")) == 8  # one line per document, the retried one included
    pids = {info.pid for info in pool.info}
    assert hits[0] not in pids  # the dead worker was replaced by a new process


def test_a_document_that_kills_its_worker_twice_is_a_failure(pool, docs, tmp_path):
    on_start, hits = _killer(pool, "doc4.txt", times=2)
    s = run_batch(None, [str(docs)], "summarize", tmp_path / "r.jsonl", pool=pool, profile=profile(), on_start=on_start)
    assert len(hits) == 2
    assert (s.done, s.failed) == (N_GOOD - 1, 3)
    recs = {Path(r["source"]).name: r for r in jsonl(tmp_path / "r.jsonl")}
    assert recs["doc4.txt"]["error_type"] == "WorkerDiedError"
    assert "died 2 times" in recs["doc4.txt"]["error"]
    assert len(recs) == 8
    # both workers are alive again: a later batch on the same pool works
    s = run_batch(None, [str(docs)], "summarize", tmp_path / "r.jsonl", pool=pool, profile=profile(), retry_failed=True)
    assert answers(tmp_path / "r.jsonl")["doc4.txt"] not in ("WorkerDiedError",)
    assert s.done == 1  # only doc4 (the two bad files fail again without a worker)


def _cli(model: Path, out: str, *extra: str) -> list[str]:
    code = "from dynkv_cli.cli import main; main()"
    return [sys.executable, "-c", code, "batch", "in", "--out", out, "--model", str(model), "--workers", "2",
            "--cpus-per-worker", "1", "--max-new-tokens", str(MAX_NEW), "--budget", "25%", *extra]  # fmt: skip


def _ray_processes() -> set[int]:
    """Pids of Ray's own processes (raylet, gcs_server) on this machine."""
    out = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if cmd.endswith((b"raylet", b"gcs_server")):
            out.add(int(d.name))
    return out


def test_driver_killed_with_sigkill_then_rerun(smollm2_gguf, docs, tmp_path):
    """SIGKILL the driver after 2 lines; the rerun does the rest: 8 lines, each document once."""
    (tmp_path / "in").symlink_to(docs)
    before = _ray_processes()
    proc = subprocess.Popen(
        _cli(smollm2_gguf, "results.jsonl", "--quiet"), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out = tmp_path / "results.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 4:  # 2 bad ones at once, then 2 answers
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = jsonl(out)
    assert 4 <= len(kept) < 8
    # Ray's own processes go with the driver that started them
    deadline = time.time() + 60
    while time.time() < deadline and _ray_processes() - before:
        time.sleep(0.5)
    assert not (_ray_processes() - before), "the local Ray instance outlived its driver"
    done = subprocess.run(_cli(smollm2_gguf, "results.jsonl", "--json"), cwd=tmp_path, capture_output=True, timeout=900)
    assert done.returncode == 1, done.stderr.decode()[-2000:]  # 2 documents failed: exit code 1
    summary = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert summary["total"] == 8 and summary["skipped"] == len(kept)
    assert summary["done"] + summary["failed_now"] == 8 - len(kept)
    recs = jsonl(out)
    assert len(recs) == 8 and len({r["doc_id"] for r in recs}) == 8
    assert [r for r in recs[: len(kept)]] == kept  # the lines written before the kill are untouched
    assert sum(1 for r in recs if r["error"]) == 2


def test_ctrl_c_stops_the_workers_and_keeps_finished_lines(smollm2_gguf, docs, tmp_path):
    (tmp_path / "in").symlink_to(docs)
    before = _ray_processes()
    proc = subprocess.Popen(
        _cli(smollm2_gguf, "results.jsonl"), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out = tmp_path / "results.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]
    kept = jsonl(out)
    assert f"{len(kept)} document(s) are saved" in err.decode()
    assert len({r["doc_id"] for r in kept}) == len(kept)
    deadline = time.time() + 60
    while time.time() < deadline and _ray_processes() - before:
        time.sleep(0.5)
    assert not (_ray_processes() - before), "Ray was left running after Ctrl-C"


def test_a_bad_model_is_one_error_line_before_any_document(docs, tmp_path):
    """Every worker fails to load it: the driver says why in one line, exit 1, nothing written.
    (A subprocess: this file's pool holds the CPUs of the Ray instance this process started.)"""
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    (tmp_path / "in").symlink_to(docs)
    r = subprocess.run(_cli(bad, "r.jsonl"), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: worker 0: ") and "broken.gguf" in err[0], r.stderr
    assert not (tmp_path / "r.jsonl").exists() or (tmp_path / "r.jsonl").read_text() == ""


def test_workers_that_cannot_be_placed_fail_with_a_line(pool, smollm2_gguf, monkeypatch):
    """Ray (started by this file's pool) has no free CPU: a second pool says so instead of waiting."""
    import dynkv_cli.raybatch as rb

    monkeypatch.setattr(rb, "START_TIMEOUT", 5.0)
    other = RayPool(WorkerSpec(model=str(smollm2_gguf), profile=profile()), 1, cpus_per_worker=1)
    with pytest.raises(rb.DynkvError, match="did not start within 5 s: Ray has no room for 1 x 1 CPU"):
        other.start()
