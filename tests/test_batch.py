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
        assert list(results.records) == ["a"] and results.dropped == 1
        results.append({"source": "c", "task": "qa"})
    assert out.read_text().splitlines() == ['{"source": "a", "task": "qa"}', '{"source": "c", "task": "qa"}']


def test_results_file_is_locked(tmp_path):
    out = tmp_path / "r.jsonl"
    with ResultsFile(out):
        with pytest.raises(Exception, match="in use by another dynkv batch"):
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
