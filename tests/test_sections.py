"""Divide-conquer-combine summaries: dividing by structure and length, and the summarize path.

The dividing is model-free (a word counter stands in for the tokenizer); the summaries run on the
tiny random model, so they test the plumbing (passes, records, sections off = today's path), not
the quality (that is `python -m dynkv_bench.sections`, docs/quality.md).
"""

from __future__ import annotations

import re

import pytest
from cli_helpers import invoke, one_error_line
from dynkv_cli.profiles import load_profile
from pdfmaker import text_pdf
from tiny import text_of

from dynkv_cli.documents import Document, open_document
from dynkv_cli.model import load_model
from dynkv_cli.sections import OUTLINE, PAGE, blocks_of, divide, similarity
from dynkv_cli.tasks import TaskRunner


def words(text: str) -> int:
    return len(text.split())


def all_words(text: str) -> list[str]:
    return re.findall(r"\w+", text)


def markdown(chapters: int = 3, paras: int = 4, n: int = 60) -> str:
    out = []
    for c in range(chapters):
        out.append(f"# Chapter {c}\n")
        for p in range(paras):
            out.append(f"## Part {c}.{p}\n\n" + text_of(n, seed=10 * c + p) + "\n")
    return "\n".join(out)


def test_markdown_is_cut_at_headings_then_packed_to_the_limit(tmp_path):
    path = tmp_path / "book.md"
    path.write_text(markdown())
    doc = open_document(str(path))
    blocks = blocks_of(doc)
    assert [b.title for b in blocks if b.level == 0] == ["Chapter 0", "Chapter 1", "Chapter 2"]
    secs = divide(blocks, words, 200)
    assert all(s.tokens <= 200 for s in secs)
    assert [s.title for s in secs if s.title and s.title.startswith("Chapter")] == ["Chapter 0", "Chapter 1", "Chapter 2"]
    assert sum(1 for s in secs if s.text.startswith("# Chapter")) == 3  # every chapter opens a section
    assert all_words(" ".join(s.text for s in secs)) == all_words(doc.text())  # nothing lost, nothing moved
    one = divide(blocks_of(doc), words, 10_000)
    assert len(one) == 1 and all_words(one[0].text) == all_words(doc.text())


def test_a_paragraph_longer_than_a_section_is_cut_at_sentences_then_words():
    text = " ".join(f"Sentence number {i} says something about item {i}." for i in range(100))
    doc = Document.from_text(text)
    secs = divide(blocks_of(doc), words, 50)
    assert len(secs) > 10 and all(s.tokens <= 50 for s in secs)
    assert all(s.text.rstrip().endswith(".") for s in secs)  # cut between sentences
    assert all_words(" ".join(s.text for s in secs)) == all_words(text)
    run_on = Document.from_text(" ".join(f"w{i}" for i in range(500)))  # no sentence ends at all
    secs = divide(blocks_of(run_on), words, 64)
    assert all(s.tokens <= 64 for s in secs) and sum(s.tokens for s in secs) == 500


def test_pdf_pages_and_outline_make_the_sections(tmp_path):
    pages = [text_of(80, seed=i) for i in range(9)]
    pdf = text_pdf(tmp_path / "r.pdf", pages)
    doc = open_document(str(pdf))
    blocks = blocks_of(doc, outline={1: "Intro", 5: "Methods"})
    assert blocks[0].level == OUTLINE and blocks[0].title == "Intro"
    assert [b.level for b in blocks if b.location == "page 2"][0] == PAGE
    secs = divide(blocks, words, 250)
    assert [s.where for s in secs] == ["pages 1-3", "page 4", "pages 5-7", "pages 8-9"]
    assert [s.title for s in secs] == ["Intro", None, "Methods", None]
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(str(pdf)))  # the same PDF with real bookmarks
    writer.add_outline_item(title="Intro", page_number=0)
    writer.add_outline_item(title="Methods", page_number=4)
    with open(tmp_path / "o.pdf", "wb") as f:
        writer.write(f)
    doc = open_document(str(tmp_path / "o.pdf"))
    assert [s.title for s in divide(blocks_of(doc), words, 250)] == ["Intro", None, "Methods", None]


def test_near_duplicate_neighbours_are_folded(tmp_path):
    boiler = "Confidential. Copyright 2024 Example Corp. All rights reserved. Do not distribute this page."
    pages = [boiler, boiler + " ", text_of(120, seed=1), text_of(120, seed=2)]
    doc = open_document(str(text_pdf(tmp_path / "b.pdf", pages)))
    secs = divide(blocks_of(doc), words, 130)
    assert secs[0].merged == 1 and secs[0].where == "pages 1-2"
    assert len(secs) == 3
    assert similarity(boiler, boiler) == 1.0 and similarity(boiler, text_of(40, seed=3)) < 0.2


@pytest.fixture(scope="module")
def lm(model):
    return load_model(model)


def _runner(lm, **keys):
    profile = load_profile("summarize").with_overrides(max_new_tokens=6, budget="50%")
    for k, v in keys.items():
        setattr(profile, k, v)
    return TaskRunner(lm, profile.validate())


def test_sections_off_and_auto_on_a_short_document_are_the_single_pass(lm):
    doc = Document.from_text(text_of(150, seed=4))
    base = _runner(lm).summarize(doc)
    auto = _runner(lm, sections="auto", section_tokens=512).summarize(doc)
    assert base.passes == auto.passes == 1 and not base.sections and not auto.sections
    assert auto.answers[0].text == base.answers[0].text
    assert "sections" not in base.to_dict()


def test_divide_conquer_combine_summary(lm):
    doc = Document.from_text("\n\n".join(text_of(120, seed=i) for i in range(6)))
    runner = _runner(lm, sections="on", section_tokens=300)
    phases = []
    runner.hooks.phase = lambda kind, what: phases.append((kind, what))
    result = runner.summarize(doc)
    n = len(result.sections)
    assert n >= 3 and result.passes == n + 1 and len(result.answers) == 1
    assert all(s["tokens"] <= 300 and isinstance(s["summary"], str) for s in result.sections)
    assert abs(result.stats.doc_tokens - sum(s["tokens"] for s in result.sections)) <= 2 * n  # the whole document
    rec = result.to_dict()
    assert [s["index"] for s in rec["sections"]] == list(range(1, n + 1))
    assert [w for k, w in phases if k == "compress"][0].endswith(f"section 1/{n}")
    assert phases[-1][0] == "answer"  # the combine pass answers last
    auto = _runner(lm, sections="auto", section_tokens=100).summarize(doc)  # 6 x 120 words > 4 sections
    assert auto.sections and auto.passes > 1


def test_sections_word_is_checked(model, tmp_path):
    doc = tmp_path / "a.txt"
    doc.write_text("hello there")
    r = invoke(["summarize", doc, "--model", model, "--sections", "sometimes"])
    assert r.exit_code == 2 and "--sections 'sometimes' is not one of off, auto, on" in one_error_line(r)


def test_combining_in_stages_stops_when_summaries_cannot_be_packed(lm, monkeypatch):
    """Section summaries longer than half a section cannot be packed two per pass: the combine pass
    takes them as they are instead of summarizing them again and again."""
    doc = Document.from_text("\n\n".join(text_of(120, seed=i) for i in range(4)))
    runner = _runner(lm, sections="on", section_tokens=64)
    runner.profile.generation.max_new_tokens = 40
    runner.profile.generation.repetition_guard = None
    calls = []
    real = TaskRunner._conquer

    def counted(self, *a, **k):
        calls.append(k.get("level", 1))
        assert len(calls) < 10, "combining does not converge"
        return real(self, *a, **k)

    monkeypatch.setattr(TaskRunner, "_conquer", counted)
    result = runner.summarize(doc)
    assert len(result.answers) == 1 and calls[0] == 1 and len(calls) <= 3
