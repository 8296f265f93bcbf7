"""Bad inputs through the CLI: one `error: ...` line on stderr, nothing on stdout, the right exit code."""

from __future__ import annotations

import json

import pytest
from cli_helpers import FAST, invoke, one_error_line, write_docs
from pdfmaker import corrupt_pdf, drawing_pdf, encrypted_copy, text_pdf
from tiny import text_of


def qa(path, model, *extra):
    return invoke(["qa", path, "-q", "What is the pass key?", "--model", model, *FAST, *extra])


def fails(result, code: int, *needles: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert result.stdout == ""
    line = one_error_line(result)
    for n in needles:
        assert n in line, line
    return line


def test_missing_file(model, tmp_path):
    fails(qa(tmp_path / "nope.txt", model), 1, "nope.txt does not exist")


def test_directory_where_a_file_was_expected(model, tmp_path):
    fails(qa(tmp_path, model), 1, "is a folder, not a file")


def test_empty_file(model, tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("")
    fails(qa(p, model), 1, "empty.txt is empty")


def test_binary_file(model, tmp_path):
    p = tmp_path / "blob.txt"
    p.write_bytes(b"\x00\x01\x02\x03" * 100)
    fails(qa(p, model), 1, "looks like a binary file")


def test_unknown_suffix(model, tmp_path):
    p = tmp_path / "slides.pptx"
    p.write_bytes(b"PK\x03\x04 not really")
    fails(qa(p, model), 1, "unsupported type '.pptx'")


@pytest.fixture
def pdf(tmp_path):
    pages = [text_of(60, seed=i) + f"\nThe pass key is {100 + i}." for i in range(3)]
    return text_pdf(tmp_path / "report.pdf", pages)


def test_pdf_several_pages(model, pdf):
    r = qa(pdf, model, "--json")
    assert r.exit_code == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["doc_tokens"] > 100 and rec["warnings"] == []


def test_encrypted_pdf_needs_the_password(model, pdf, tmp_path):
    locked = encrypted_copy(pdf, tmp_path / "locked.pdf", "s3cret")
    fails(qa(locked, model), 1, "locked.pdf is encrypted: pass --password")
    fails(qa(locked, model, "--password", "wrong"), 1, "password is wrong")
    ok = qa(locked, model, "--password", "s3cret")
    assert ok.exit_code == 0, ok.stderr
    assert ok.stdout.strip()


def test_encrypted_pdf_with_empty_password_opens(model, pdf, tmp_path):
    locked = encrypted_copy(pdf, tmp_path / "open.pdf", "")
    r = qa(locked, model)
    assert r.exit_code == 0, r.stderr


def test_image_only_pdf(model, tmp_path):
    p = drawing_pdf(tmp_path / "scan.pdf", 2)
    fails(qa(p, model), 1, "no extractable text (scanned?")


def test_corrupt_pdf(model, tmp_path):
    p = corrupt_pdf(tmp_path / "broken.pdf")
    fails(qa(p, model), 1, "broken.pdf is not a readable PDF")


def test_wrong_budget_word(model, tmp_path):
    (doc,) = write_docs(tmp_path / "d", n=1)
    fails(qa(doc, model, "--budget", "lots"), 2, "budget 'lots' is not a budget", "1.7%")


def test_unknown_method(model, tmp_path):
    (doc,) = write_docs(tmp_path / "d", n=1)
    fails(qa(doc, model, "--method", "magic"), 2, "unknown method 'magic'", "dynamickv")


def test_model_folder_that_is_not_a_model(tmp_path):
    (doc,) = write_docs(tmp_path / "d", n=1)
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "readme.txt").write_text("hi")
    fails(qa(doc, folder), 1, "is not a model folder (no config.json, no .gguf file)")


def test_unknown_profile_key(model, tmp_path):
    (doc,) = write_docs(tmp_path / "d", n=1)
    prof = tmp_path / "mine.yaml"
    prof.write_text("extends: qa\nbudgett: 3%\n")
    line = fails(qa(doc, model, "--profile", prof), 2, "unknown profile key(s) budgett", "valid keys:", "budget")
    assert "retention" in line


def test_mistyped_nested_profile_value(model, tmp_path):
    (doc,) = write_docs(tmp_path / "d", n=1)
    prof = tmp_path / "mine.yaml"
    prof.write_text("extends: qa\nretention:\n  window: eight\n  poolng: max\n")
    fails(qa(doc, model, "--profile", prof), 2, "retention.poolng", "retention.pooling")


def test_missing_question_is_a_usage_error(model, tmp_path):
    (doc,) = write_docs(tmp_path / "d", n=1)
    r = invoke(["qa", doc, "--model", model])
    fails(r, 2, "Missing option '--question'")


def test_debug_shows_the_traceback(model, tmp_path):
    r = invoke(["qa", tmp_path / "nope.txt", "-q", "k?", "--model", model, "--debug"])
    assert r.exit_code == 1
    assert "Traceback" in r.stderr and r.stderr.strip().splitlines()[-1].startswith("error: ")


def test_summarize_of_several_files_goes_on_after_a_bad_one(model, tmp_path):
    (doc,) = write_docs(tmp_path / "d", n=1)
    r = invoke(["summarize", tmp_path / "missing.txt", doc, "--model", model, "--json", *FAST])
    assert r.exit_code == 1
    assert "missing.txt does not exist" in r.stderr
    assert json.loads(r.stdout)["source"] == str(doc)
