"""`dynkv batch`: one whole line per document, resume after a crash, bad documents recorded, exit codes."""

from __future__ import annotations

import json

import pytest
from cli_helpers import FAST, invoke, jsonl, one_error_line, write_docs

from dynkv_cli.batch import ResultsFile, questions_for
from dynkv_cli.documents import Document


@pytest.fixture
def folder(tmp_path):
    docs = write_docs(tmp_path / "in", n=3, words=80)
    (tmp_path / "in" / "bad.txt").write_bytes(b"\x00\x01binary\x00" * 20)
    return docs[0].parent


def batch(folder, out, model, *extra):
    return invoke(["batch", folder, "--task", "summarize", "--out", out, "--model", model, "--quiet", *FAST, *extra])


def test_bad_document_is_recorded_and_the_batch_goes_on(folder, model, tmp_path):
    out = tmp_path / "results.jsonl"
    r = batch(folder, out, model)
    assert r.exit_code == 1, r.stderr  # one document failed
    recs = jsonl(out)
    assert sorted(rec["source"] for rec in recs) == sorted(str(p) for p in folder.iterdir())
    bad = [rec for rec in recs if rec["error"]]
    assert len(bad) == 1 and "bad.txt looks like a binary file" in bad[0]["error"]
    assert bad[0]["error_type"] == "DocumentError"
    assert all(rec["answer"] is not None for rec in recs if not rec["error"])
    # rerun: nothing is done twice, the failure still shows in the exit code
    again = batch(folder, out, model)
    assert again.exit_code == 1
    assert jsonl(out) == recs


def test_resume_after_a_crash_mid_batch(folder, model, tmp_path, monkeypatch):
    """Kill the batch while the second document runs, then tear the last line: rerun loses and repeats nothing."""
    from dynkv_cli import tasks

    out = tmp_path / "results.jsonl"
    calls = {"n": 0}
    real = tasks.TaskRunner.summarize

    def crashing(self, doc):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the process dies here
        return real(self, doc)

    monkeypatch.setattr(tasks.TaskRunner, "summarize", crashing)
    r = batch(folder, out, model)
    assert r.exit_code == 130
    assert one_error_line(r) == (
        f"error: interrupted; 2 document(s) are saved in {out}, run the same command again to resume"
    )
    first = out.read_bytes()
    assert first.count(b"\n") == 2  # bad.txt (sorted first) and doc1.txt, each a whole line
    # a crash in the middle of writing the next line leaves a torn tail
    out.write_bytes(first + b'{"source": "half a li')
    monkeypatch.setattr(tasks.TaskRunner, "summarize", real)

    r = batch(folder, out, model)
    assert r.exit_code == 1  # bad.txt
    recs = jsonl(out)  # every line parses: the torn one is gone
    sources = [rec["source"] for rec in recs]
    assert sorted(sources) == sorted(str(p) for p in folder.iterdir())
    assert len(sources) == len(set(sources)) == 4
    assert out.read_bytes().startswith(first)  # lines already written are untouched


def test_retry_failed_drops_the_old_error_line(folder, model, tmp_path):
    out = tmp_path / "results.jsonl"
    batch(folder, out, model)
    (folder / "bad.txt").write_text("now it is text, and the pass key is 1.\n")
    r = batch(folder, out, model, "--retry-failed")
    assert r.exit_code == 0, r.stderr
    recs = jsonl(out)
    assert len(recs) == 4 and not any(rec["error"] for rec in recs)


def test_qa_batch_takes_questions_from_jsonl_records(model, tmp_path):
    data = tmp_path / "records.jsonl"
    lines = [
        {"context": "The pass key is 42. " * 10, "input": "What is the pass key?"},
        {"context": "The river is long. " * 10, "question": "What is long?"},
        {"context": "No question here. " * 10},
    ]
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "answers.jsonl"
    r = invoke(["batch", data, "--task", "qa", "--out", out, "--model", model, "--quiet", *FAST])
    assert r.exit_code == 1
    recs = jsonl(out)
    assert [rec["source"] for rec in recs] == [f"{data}#1", f"{data}#2", f"{data}#3"]
    assert recs[0]["answers"][0]["question"] == "What is the pass key?"
    assert recs[1]["answers"][0]["question"] == "What is long?"
    assert "no question" in recs[2]["error"]


def test_output_of_another_task_is_refused(folder, model, tmp_path):
    out = tmp_path / "results.jsonl"
    out.write_text(json.dumps({"source": "x", "task": "qa", "error": None}) + "\n")
    r = batch(folder, out, model)
    assert r.exit_code == 2 and "already holds qa results" in one_error_line(r)


def test_missing_input_folder(model, tmp_path):
    r = batch(tmp_path / "nowhere", tmp_path / "o.jsonl", model)
    assert r.exit_code == 1 and "does not exist" in one_error_line(r)


def test_results_file_cuts_a_torn_line(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_bytes(b'{"source": "a", "task": "qa"}\n{"source": "b", "ta')
    with ResultsFile(out) as results:
        assert [r["source"] for r in results.records.values()] == ["a"] and results.dropped == 1
        results.append({"source": "c", "task": "qa"})
    assert out.read_text().splitlines() == ['{"source": "a", "task": "qa"}', '{"source": "c", "task": "qa"}']


def test_results_file_is_locked(tmp_path):
    out = tmp_path / "r.jsonl"
    with ResultsFile(out):
        with pytest.raises(Exception, match="is being written by another dynkv batch"):
            ResultsFile(out).open()


def test_questions_for_records():
    doc = Document.from_text("x")
    assert questions_for(doc, ["given"]) == ["given"]
    doc.record = {"text": "doc", "input": "not a question without context"}
    assert questions_for(doc, []) == []
    doc.record = {"context": "doc", "input": "q?"}
    assert questions_for(doc, []) == ["q?"]
    doc.record = {"context": "doc", "questions": ["a?", "b?"]}
    assert questions_for(doc, []) == ["a?", "b?"]


def test_example_batch_script(model, tmp_path):
    """examples/batch.sh over examples/docs: exit code 0 and one line per document."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "results.jsonl"
    env = {
        **os.environ,
        "DYNKV_MODEL": str(model),
        "DYNKV_CONFIG_DIR": str(tmp_path),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    r = subprocess.run(
        ["bash", str(root / "examples" / "batch.sh"), str(root / "examples" / "docs"), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "all documents summarized" in r.stdout
    assert len(jsonl(out)) == len(list((root / "examples" / "docs").iterdir()))


# ---- identity, settings, lock ---------------------------------------------------------------------


def two_docs(tmp_path):
    folder = tmp_path / "in"
    write_docs(folder, n=2, words=40)
    return folder


def test_rerun_by_another_spelling_of_the_path_adds_nothing(model, tmp_path, monkeypatch):
    folder = two_docs(tmp_path)
    (folder / "data.jsonl").write_text(json.dumps({"context": "The pass key is 7. " * 5}) + "\n")
    (tmp_path / "link").symlink_to(folder, target_is_directory=True)
    out = tmp_path / "results.jsonl"
    r = batch(folder, out, model)
    assert r.exit_code == 0, r.stderr
    first = out.read_bytes()
    recs = jsonl(out)
    assert len(recs) == 3
    assert {rec["doc_id"] for rec in recs} == {
        str((folder / "doc1.txt").resolve()),
        str((folder / "doc2.txt").resolve()),
        f"{(folder / 'data.jsonl').resolve()}#1",
    }
    for rec in recs:
        assert rec["doc_fingerprint"] and rec["model_fingerprint"] and rec["settings_hash"]
        assert rec["budget"] and rec["method"] and rec["profile"] == "summarize"
        assert rec["settings"]["max_new_tokens"] == 3 and rec["settings"]["chunk_size"] == 128
    monkeypatch.chdir(tmp_path)
    for spelling in ("in", "./in", "in/", "link", str(tmp_path / "link"), "in/../in"):
        r = batch(spelling, "results.jsonl", model, "--json")
        assert r.exit_code == 0, (spelling, r.stderr)
        assert json.loads(r.stdout)["skipped"] == 3, spelling
    r = invoke(["batch", "./in/data.jsonl#1", "in/doc1.txt", "--task", "summarize", "--out", out, "--model", model,
                "--quiet", "--json", *FAST])  # fmt: skip
    assert r.exit_code == 0 and json.loads(r.stdout)["skipped"] == 2, r.stderr
    assert out.read_bytes() == first
    assert not (tmp_path / ".results.jsonl.lock").exists()  # the lock file goes with the batch


def test_old_records_without_identity_resume_by_source(model, tmp_path, monkeypatch):
    """Records written before doc_id/settings existed: matched by their resolved source, not redone."""
    folder = two_docs(tmp_path)
    out = tmp_path / "results.jsonl"
    monkeypatch.chdir(tmp_path)
    assert batch("in", out, model).exit_code == 0
    new_fields = ("doc_id", "doc_fingerprint", "model_fingerprint", "settings", "settings_hash")
    old = [{k: v for k, v in rec.items() if k not in new_fields} for rec in jsonl(out)]
    assert {rec["source"] for rec in old} == {"in/doc1.txt", "in/doc2.txt"}  # relative, as typed
    out.write_text("".join(json.dumps(rec) + "\n" for rec in old))
    r = batch(folder.resolve(), out, model, "--json")  # now spelled absolute
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["skipped"] == 2
    assert jsonl(out) == old


def test_other_settings_are_refused_before_any_work(model, tmp_path, monkeypatch):
    from dynkv_cli import cli

    folder = two_docs(tmp_path)
    out = tmp_path / "results.jsonl"
    assert batch(folder, out, model, "--budget", "2%").exit_code == 0
    first = out.read_bytes()
    real_runner = cli._runner

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli, "_runner", no_model)  # the settings a profile decides are checked before loading
    (folder / "doc3.txt").write_text("A third document, not done yet. " * 5)
    r = batch(folder, out, model, "--budget", "5%")
    assert r.exit_code == 2
    assert one_error_line(r) == (
        f"error: {out} was made with budget 2% (this run: 5%) for 2 document(s); "
        "start a new --out file, or pass --redo-changed to redo them"
    )
    assert out.read_bytes() == first  # nothing done, not even the new document
    r = batch(folder, out, model, "--budget", "2%", "--max-new-tokens", "2")
    assert r.exit_code == 2
    assert "max new tokens 3 (this run: 2) for 2 document(s)" in one_error_line(r)
    r = batch(folder, out, model, "--budget", "5%", "--method", "snapkv")
    assert "method dynamickv (this run: snapkv) and budget 2% (this run: 5%) for 2" in one_error_line(r)

    monkeypatch.setattr(cli, "_runner", real_runner)
    r = batch(folder, out, model, "--budget", "5%", "--redo-changed", "--json")
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert (summary["redone"], summary["done"], summary["skipped"]) == (2, 3, 0)
    assert out.read_bytes().startswith(first)  # appended: the old lines are still there
    recs = jsonl(out)
    assert len(recs) == 5
    last = {}
    for rec in recs:
        last[rec["doc_id"]] = rec  # the last record of a document is the one that counts
    assert len(last) == 3 and all(rec["budget"] == "5%" for rec in last.values())
    r = batch(folder, out, model, "--budget", "5%", "--json")  # the file now agrees with 5%
    assert r.exit_code == 0 and json.loads(r.stdout)["skipped"] == 3, r.stderr
    assert len(jsonl(out)) == 5


def test_another_model_is_refused(model, tmp_path, tmp_path_factory):
    from cli_helpers import tiny_model

    other = tiny_model(tmp_path_factory, name="dynkv-batch-other-model", layers=2)
    folder = two_docs(tmp_path)
    out = tmp_path / "results.jsonl"
    assert batch(folder, out, model).exit_code == 0
    r = batch(folder, out, other)
    assert r.exit_code == 2
    assert one_error_line(r) == (
        f"error: {out} was made with model {model} (this run: {other}) for 2 document(s); "
        "start a new --out file, or pass --redo-changed to redo them"
    )
    assert len(jsonl(out)) == 2


def test_changed_document_is_done_again(model, tmp_path):
    folder = two_docs(tmp_path)
    out = tmp_path / "results.jsonl"
    assert batch(folder, out, model).exit_code == 0
    doc = folder / "doc1.txt"
    doc.write_text("New content. The pass key is 99.\n")
    st = doc.stat()
    import os

    os.utime(doc, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a coarse clock still sees the change
    r = invoke(["batch", folder, "--task", "summarize", "--out", out, "--model", model, *FAST])
    assert r.exit_code == 0, r.stderr
    assert f"warning: {doc} changed since its record in {out} was written: done again" in r.stderr
    assert "1 changed since their record (done again)" in r.stderr
    recs = jsonl(out)
    assert [rec["source"] for rec in recs] == [str(folder / "doc1.txt"), str(folder / "doc2.txt"), str(doc)]
    assert recs[0]["doc_fingerprint"] != recs[2]["doc_fingerprint"]


LOCK_HOLDER = """
import sys
from dynkv_cli.batch import BatchLock
lock = BatchLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()
lock.release()
"""


def test_a_second_batch_on_the_same_out_fails_at_once(model, tmp_path):
    import subprocess
    import sys

    folder = two_docs(tmp_path)
    out = tmp_path / "results.jsonl"
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = batch(folder, out, model)
        assert r.exit_code == 1
        assert one_error_line(r) == (
            f"error: {out} is being written by another dynkv batch (pid {holder.pid}); "
            "wait for it or choose another --out"
        )
        assert not out.exists() or out.read_bytes() == b""
    finally:
        holder.communicate("", timeout=30)
    assert holder.returncode == 0
    r = batch(folder, out, model)
    assert r.exit_code == 0, r.stderr
    assert len(jsonl(out)) == 2


def test_out_that_is_not_a_regular_file_is_refused(model, tmp_path):
    import os

    folder = two_docs(tmp_path)
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    r = batch(folder, fifo, model)
    assert r.exit_code == 2
    assert one_error_line(r) == (
        f"error: --out {fifo} is not a regular file: a batch appends to its results file and reads it back to "
        "resume; give a file name like results.jsonl"
    )
    assert not (tmp_path / ".pipe.jsonl.lock").exists()  # refused before the lock file is made
