"""Never damage a user's files: outputs are checked before any work starts, and written whole."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cli_helpers import FAST, invoke, jsonl, one_error_line, write_docs

from dynkv_cli.errors import UsageError
from dynkv_cli.outputs import check_output, is_batch_results, is_dynkv_cache, replacing, write_text

NO_MODEL = ["--model", "/no/such/model"]  # loading it fails: an error about the output proves the order


@pytest.fixture
def docs(tmp_path):
    return write_docs(tmp_path / "docs", n=2, words=80)


def refused(r, *words: str) -> str:
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    err = one_error_line(r)
    for w in words:
        assert w in err, err
    return err


# ---- an input as the output ---------------------------------------------------------------------


def test_compress_refuses_to_write_over_its_input(model, docs):
    before = docs[0].read_bytes()
    r = invoke(["compress", docs[0], "-o", docs[0], "--model", model, *FAST])
    assert refused(r) == (
        f"error: --out {docs[0]} is the input {docs[0]}: dynkv would write over the document it reads; "
        "choose another file"
    )
    assert docs[0].read_bytes() == before


def test_qa_refuses_to_write_over_its_input_even_with_force(model, docs, tmp_path, monkeypatch):
    before = docs[1].read_bytes()
    r = invoke(["qa", docs[1], "-q", "What is the pass key?", "-o", docs[1], "--model", model, *FAST])
    refused(r, "is the input")
    monkeypatch.chdir(docs[1].parent)  # the same file by another name
    r = invoke(["qa", docs[1], "-q", "k?", "-o", "doc2.txt", "--force", "--model", model, *FAST])
    refused(r, "--out doc2.txt is the input")
    assert docs[1].read_bytes() == before


def test_qa_refuses_its_dkv_cache_as_output(model, docs, tmp_path):
    dkv = tmp_path / "doc.dkv"
    assert invoke(["compress", docs[0], "-o", dkv, "--model", model, *FAST]).exit_code == 0
    before = dkv.read_bytes()
    refused(invoke(["qa", dkv, "-q", "k?", "-o", dkv, "--force", "--model", model, *FAST]), "is the input")
    assert dkv.read_bytes() == before


# ---- existing files ---------------------------------------------------------------------------------


def test_existing_file_is_refused_and_force_overwrites_a_dynkv_output(model, docs, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my own notes\n")
    r = invoke(["summarize", docs[0], "-o", notes, *NO_MODEL])
    assert refused(r) == f"error: --out {notes} already exists; pass --force to overwrite it, or choose another file"
    assert notes.read_text() == "my own notes\n"
    r = invoke(["summarize", docs[0], "-o", notes, "--force", "--model", model, *FAST])
    assert r.exit_code == 0, r.stderr
    assert notes.read_text().strip() and notes.read_text() != "my own notes\n"

    # compress: a file that is not a dynkv cache is never written over, not even with --force
    for extra in ([], ["--force"]):
        r = invoke(["compress", docs[0], "-o", notes, *extra, *NO_MODEL])
        refused(r, f"--out {notes} exists and is not a dynkv cache file; dynkv will not write over it")
    dkv = tmp_path / "doc.dkv"
    assert invoke(["compress", docs[0], "-o", dkv, "--model", model, *FAST]).exit_code == 0
    r = invoke(["compress", docs[1], "-o", dkv, *NO_MODEL])
    assert refused(r) == f"error: --out {dkv} already exists (a dynkv cache); pass --force to overwrite it"
    r = invoke(["compress", docs[1], "-o", dkv, "--force", "--model", model, *FAST])
    assert r.exit_code == 0, r.stderr
    assert json.loads(invoke(["info", dkv, "--json"]).stdout)["source"] == str(docs[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.dkv", "docs", "notes.txt"]  # no temporary file left


def test_batch_refuses_an_existing_file_that_is_not_its_results(docs, tmp_path):
    other = tmp_path / "data.jsonl"
    other.write_text(json.dumps({"context": "a user's record", "question": "q?"}) + "\n")
    r = invoke(["batch", docs[0].parent, "--out", other, *NO_MODEL])
    assert refused(r) == (
        f"error: --out {other} exists and is not a dynkv batch results file; dynkv appends only to its own "
        "results: choose another file"
    )
    assert json.loads(other.read_text())["context"] == "a user's record"


def test_batch_resumes_into_an_empty_or_earlier_results_file(model, docs, tmp_path):
    out = tmp_path / "results.jsonl"
    out.write_text("")
    args = ["batch", docs[0].parent, "--out", out, "--model", model, "--quiet", *FAST]
    assert invoke(args).exit_code == 0
    first = out.read_text()
    assert len(jsonl(out)) == 2
    assert invoke(args).exit_code == 0  # resume: nothing refused, nothing done twice
    assert out.read_text() == first


# ---- batch --out among the documents ------------------------------------------------------------------


def test_batch_out_equal_to_an_existing_document_is_refused(docs, tmp_path, monkeypatch):
    before = docs[0].read_bytes()
    r = invoke(["batch", *docs, "--out", docs[0], *NO_MODEL])
    refused(r, f"--out {docs[0]} is the input {docs[0]}")
    monkeypatch.chdir(docs[0].parent)  # the reproduction: dynkv batch . --out doc1.txt
    r = invoke(["batch", ".", "--out", "doc1.txt", *NO_MODEL])
    assert refused(r) == (
        "error: --out doc1.txt is a file in the input folder .: dynkv would write over a file it reads; "
        "choose a file outside ."
    )
    assert docs[0].read_bytes() == before


def test_batch_out_inside_the_input_folder_is_refused(docs, tmp_path):
    folder = docs[0].parent
    out = folder / "sub" / "results.jsonl"
    r = invoke(["batch", folder, "--out", out, "--mkdir", *NO_MODEL])
    assert refused(r) == (
        f"error: --out {out} is inside the input folder {folder}: the next run would read it as a document; "
        f"choose a file outside {folder}"
    )
    assert not (folder / "sub").exists()
    r = invoke(["batch", f"{folder}/*.txt", "--out", folder / "new.txt", *NO_MODEL])
    refused(r, "matches the input pattern")


# ---- the output's folder ------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["summarize", "qa", "rag", "compress", "batch"])
def test_missing_output_folder_is_refused_before_the_model_loads(command, docs, tmp_path):
    out = tmp_path / "new" / "out.jsonl"
    args = {"qa": ["-q", "k?"], "rag": ["-q", "k?"]}.get(command, [])
    r = invoke([command, docs[0], *args, "-o", out, *NO_MODEL])
    assert refused(r) == (
        f"error: --out {out}: the folder {out.parent} does not exist; create it (mkdir -p {out.parent}) or pass --mkdir"
    )


def test_mkdir_creates_the_output_folder(model, docs, tmp_path):
    out = tmp_path / "a" / "b" / "answer.txt"
    r = invoke(["qa", docs[0], "-q", "What is the pass key?", "-o", out, "--mkdir", "--model", model, *FAST])
    assert r.exit_code == 0, r.stderr
    assert out.read_text().strip()
    results = tmp_path / "c" / "results.jsonl"
    r = invoke(["batch", docs[0].parent, "--out", results, "--mkdir", "--model", model, "--quiet", *FAST])
    assert r.exit_code == 0, r.stderr
    assert len(jsonl(results)) == 2


# ---- files a folder holds that dynkv cannot read ---------------------------------------------------------


def test_skipped_files_are_listed(model, docs, tmp_path):
    folder = docs[0].parent
    for name in ("report.docx", "old.docx", "README", "scan.png", ".hidden.docx"):
        (folder / name).write_bytes(b"PK\x03\x04 not text")
    (folder / ".git").mkdir()
    (folder / ".git" / "config").write_text("x")
    line = (
        f"warning: skipped 4 file(s) in {folder} that dynkv cannot read: 2 .docx, 1 .png, 1 without a suffix "
        "(convert them to PDF or plain text, or choose files with --pattern)"
    )
    out = tmp_path / "results.jsonl"
    r = invoke(["batch", folder, "--out", out, "--model", model, "--quiet", "--json", *FAST])
    assert r.exit_code == 0, r.stderr
    assert line in r.stderr.splitlines()
    summary = json.loads(r.stdout)
    assert sorted(summary["skipped_files"]) == sorted(
        str(folder / n) for n in ("report.docx", "old.docx", "README", "scan.png")
    )
    r = invoke(["rag", folder, "-q", "k?", "--model", model, "--json", *FAST])
    assert r.exit_code == 0, r.stderr
    assert line in r.stderr.splitlines()
    r = invoke(["rag", folder, "-q", "k?", "--pattern", "*.txt", "--model", model, "--json", *FAST])
    assert r.exit_code == 0 and "skipped" not in r.stderr  # the user chose the files


# ---- the library -----------------------------------------------------------------------------------------


def test_replacing_leaves_the_old_file_when_writing_fails(tmp_path):
    out = tmp_path / "answer.txt"
    out.write_text("old\n")
    os.chmod(out, 0o640)
    with pytest.raises(RuntimeError):
        with replacing(out) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".answer.txt.")
            tmp.write_text("half a")
            raise RuntimeError("crash")
    assert out.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["answer.txt"]
    write_text(out, "new\n")
    assert out.read_text() == "new\n" and (out.stat().st_mode & 0o777) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["answer.txt"]


def test_cache_save_is_whole_or_nothing(model, docs, tmp_path, monkeypatch):
    from dynkv_cli import cache

    dkv = tmp_path / "doc.dkv"
    assert invoke(["compress", docs[0], "-o", dkv, "--model", model, *FAST]).exit_code == 0
    before = dkv.read_bytes()
    assert is_dynkv_cache(dkv) and not is_dynkv_cache(docs[0])

    def torn(filename, tensors, metadata):  # writes part of a file, then the disk is full
        with open(filename, "wb") as fh:
            fh.write(b"\x10\x00\x00")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache, "_write_safetensors", torn)
    r = invoke(["compress", docs[1], "-o", dkv, "--force", "--model", model, *FAST])
    assert r.exit_code == 1 and "cannot write" in one_error_line(r)
    assert dkv.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.dkv", "docs"]


def test_is_batch_results(tmp_path):
    p = tmp_path / "r.jsonl"
    for content, ok in [
        (b"", True),
        (b"\n\n", True),
        (b'{"source": "a", "task": "qa"}\n', True),
        (b'{"source": "a", "ta', True),  # a torn first line: batch cuts it off
        (b'{"context": "x"}\n', False),
        (b"The pass key is 1.\n", False),
        (b"\x00\x01binary", False),
    ]:
        p.write_bytes(content)
        assert is_batch_results(p) is ok, content


def test_check_output_in_the_library(tmp_path):
    assert check_output(os.devnull, [tmp_path]) == Path(os.devnull)  # a device: written directly
    with pytest.raises(UsageError, match="is a folder"):
        check_output(tmp_path, [])
    with pytest.raises(ValueError):
        check_output(tmp_path / "x", kind="pdf")
    out = check_output(tmp_path / "x" / "y.txt", [], mkdir=True)
    assert out.parent.is_dir()
