"""documents: every input kind, every error message, streaming. No model, no network, PDFs made here."""

from __future__ import annotations

import ast
import io
import logging
import sys
from pathlib import Path

import pytest

from dynkv_cli import documents
from dynkv_cli.documents import Document, DocumentError, Segment, iter_documents, open_document, set_debug

sys.path.insert(0, str(Path(__file__).parent))
import pdfmaker  # noqa: E402

PAGES = [
    "Page one: the quarterly report begins here.\nSecond line of page one.",
    "Page two: revenue grew by (about) 12 percent.",
    "Page three: Grüße from the appendix, the end.",
]


def err(fn, *args, **kwargs) -> str:
    with pytest.raises(DocumentError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


@pytest.fixture(scope="module")
def pdfs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pdfs")
    text = pdfmaker.text_pdf(d / "report.pdf", PAGES)
    return {
        "text": text,
        "scan": pdfmaker.drawing_pdf(d / "scan.pdf", 3),
        "locked": pdfmaker.encrypted_copy(text, d / "locked.pdf", "secret"),
        "open_locked": pdfmaker.encrypted_copy(text, d / "open-locked.pdf", ""),
        "corrupt": pdfmaker.corrupt_pdf(d / "broken.pdf"),
    }


# ---------------------------------------------------------------- PDF


def test_pdf_pages_in_order_with_locations(pdfs):
    doc = open_document(pdfs["text"])
    assert (doc.kind, doc.pages, doc.source, doc.warnings) == ("pdf", 3, str(pdfs["text"]), [])
    segs = list(doc.segments())
    assert [s.location for s in segs] == ["page 1", "page 2", "page 3"]
    assert all(s.source == str(pdfs["text"]) for s in segs)
    assert segs[0].text.startswith("Page one: the quarterly report begins here.\nSecond line")
    assert segs[1].text.startswith("\n\nPage two: revenue grew by (about) 12 percent.")
    assert "Grüße" in segs[2].text
    assert doc.text() == "".join(s.text for s in segs)
    assert list(doc.segments()) == segs  # can be read again


def test_pdf_is_read_one_page_at_a_time(pdfs, monkeypatch):
    from pypdf import PageObject

    calls = []
    real = PageObject.extract_text

    def counting(self, *a, **k):
        text = real(self, *a, **k)
        calls.append(text.split(":")[0])
        return text

    monkeypatch.setattr(PageObject, "extract_text", counting)
    doc = open_document(pdfs["text"])
    assert calls == ["Page one"]  # the text probe stops at the first page with text
    gen = doc.segments()
    assert next(gen).location == "page 1"
    assert calls == ["Page one"]  # page 1 comes from the probe, page 2 not touched yet
    assert next(gen).location == "page 2"
    assert calls == ["Page one", "Page two"]
    assert next(gen).location == "page 3"
    assert calls == ["Page one", "Page two", "Page three"]


def test_pdf_page_that_fails_is_skipped_with_a_warning(pdfs, monkeypatch):
    from pypdf import PageObject

    real = PageObject.extract_text

    def flaky(self, *a, **k):
        text = real(self, *a, **k)
        if text.startswith("Page two"):
            raise ValueError("bad font program\nsecond line of detail")
        return text

    monkeypatch.setattr(PageObject, "extract_text", flaky)
    doc = open_document(pdfs["text"])
    assert [s.location for s in doc.segments()] == ["page 1", "page 3"]
    assert doc.warnings == ["page 2 skipped: bad font program"]


def test_pdf_where_no_page_extracts_is_unreadable(pdfs, monkeypatch):
    from pypdf import PageObject

    def broken(self, *a, **k):
        raise KeyError("/Font")

    monkeypatch.setattr(PageObject, "extract_text", broken)
    msg = err(open_document, pdfs["text"])
    assert msg.startswith(f"{pdfs['text']} is not a readable PDF: no page could be extracted")


def test_encrypted_pdf_needs_password(pdfs):
    msg = err(open_document, pdfs["locked"])
    assert msg == f"{pdfs['locked']} is encrypted: pass --password"


def test_encrypted_pdf_wrong_password(pdfs):
    msg = err(open_document, pdfs["locked"], password="guess")
    assert msg == f"{pdfs['locked']} is encrypted and the password is wrong: check --password"


def test_encrypted_pdf_with_password(pdfs):
    for password in ("secret", "owner-pw"):
        doc = open_document(pdfs["locked"], password=password)
        assert [s.location for s in doc.segments()] == ["page 1", "page 2", "page 3"]
        assert "revenue grew" in doc.text()


def test_encrypted_pdf_with_empty_user_password_opens_without_one(pdfs):
    assert "Page one" in open_document(pdfs["open_locked"]).text()
    # a password given for a whole batch does not stop files that need none
    assert "Page one" in open_document(pdfs["open_locked"], password="secret").text()
    assert "Page one" in open_document(pdfs["text"], password="secret").text()


def test_image_only_pdf(pdfs):
    msg = err(open_document, pdfs["scan"])
    assert msg.startswith(f"{pdfs['scan']} has no extractable text (scanned? run OCR first")


def test_pdf_with_only_a_stray_label_per_page_is_image_only(tmp_path):
    p = pdfmaker.text_pdf(tmp_path / "labels.pdf", ["Background", "", "Background 2"])
    assert "has no extractable text" in err(open_document, p)


def test_mostly_scanned_pdf_reads_with_a_warning(tmp_path):
    p = pdfmaker.text_pdf(tmp_path / "mixed.pdf", ["", "", "3", "Finally a page with real text on it."])
    doc = open_document(p)
    assert [s.location for s in doc.segments()] == ["page 3", "page 4"]
    assert doc.warnings == ["3 of 4 pages have (almost) no text (scanned pages? run OCR first to read them)"]


def test_corrupt_pdf(pdfs):
    msg = err(open_document, pdfs["corrupt"])
    assert msg.startswith(f"{pdfs['corrupt']} is not a readable PDF: ")
    assert len(msg) < 250


def test_truncated_pdf(pdfs, tmp_path):
    data = pdfs["text"].read_bytes()
    p = tmp_path / "half.pdf"
    p.write_bytes(data[: len(data) // 2])
    assert err(open_document, p).startswith(f"{p} is not a readable PDF: ")


def test_pdf_suffix_without_pdf_inside(tmp_path):
    p = tmp_path / "notes.pdf"
    p.write_text("just some text that someone named .pdf")
    assert err(open_document, p) == f"{p} is not a readable PDF: no %PDF- header (is it really a PDF?)"


def test_pdf_without_suffix_is_sniffed(pdfs, tmp_path):
    p = tmp_path / "download"
    p.write_bytes(pdfs["text"].read_bytes())
    assert open_document(p).kind == "pdf"


def test_pypdf_logs_are_silenced_unless_debug(pdfs, tmp_path, caplog):
    data = pdfs["text"].read_bytes()
    p = tmp_path / "badxref.pdf"  # pypdf recovers from a wrong startxref, logging warnings
    p.write_bytes(data[: data.index(b"startxref")] + b"startxref\n999\n%%EOF\n")
    with caplog.at_level(logging.WARNING):
        assert "Page one" in open_document(p).text()
    assert not [r for r in caplog.records if r.name.startswith("pypdf")]
    try:
        set_debug(True)
        with caplog.at_level(logging.WARNING):
            open_document(p)
        assert [r for r in caplog.records if r.name.startswith("pypdf")]
    finally:
        set_debug(False)
    assert logging.getLogger("pypdf").level == logging.NOTSET  # left as it was


# ---------------------------------------------------------------- text


def test_utf8_text_and_markdown(tmp_path):
    (tmp_path / "a.txt").write_text("héllo\nworld\n", encoding="utf-8")
    (tmp_path / "b.md").write_text("# Title\n\nbody\n", encoding="utf-8")
    a = open_document(tmp_path / "a.txt")
    assert (a.kind, a.text(), a.warnings) == ("text", "héllo\nworld\n", [])
    assert [s.location for s in a.segments()] == ["line 1"]
    assert open_document(tmp_path / "b.md").kind == "markdown"


def test_utf8_bom_is_stripped_and_crlf_normalised(tmp_path):
    p = tmp_path / "bom.txt"
    p.write_bytes(b"\xef\xbb\xbfline one\r\nline two\r\n")
    doc = open_document(p)
    assert doc.text() == "line one\nline two\n"
    assert doc.warnings == []


def test_utf16_with_bom(tmp_path):
    p = tmp_path / "wide.txt"
    p.write_bytes("Grüße, UTF-16\n".encode("utf-16"))  # with BOM
    assert open_document(p).text() == "Grüße, UTF-16\n"


def test_utf16_bom_but_broken(tmp_path):
    p = tmp_path / "wide.txt"
    p.write_bytes(b"\xff\xfeh\x00i\x00\x00\xd8")  # a lone high surrogate at the end
    assert err(open_document, p) == (
        f"{p} starts with a UTF-16 byte-order mark but is not valid UTF-16: re-save it as UTF-8 text"
    )


def test_latin1_fallback_warns(tmp_path):
    p = tmp_path / "old.txt"
    p.write_bytes("café \x81 naïve\n".encode("latin-1"))  # 0x81 is not Windows-1252 either
    doc = open_document(p)
    assert doc.text() == "café \x81 naïve\n"
    assert doc.warnings == ["decoded as Latin-1 (not valid UTF-8)"]


def test_windows_1252_fallback_keeps_smart_quotes(tmp_path):
    p = tmp_path / "word.txt"
    p.write_bytes("\u201cquoted\u201d \u2013 café\n".encode("cp1252"))
    doc = open_document(p)
    assert doc.text() == "\u201cquoted\u201d \u2013 café\n"
    assert doc.warnings == ["decoded as Windows-1252 (not valid UTF-8)"]


def test_large_text_streams_in_segments_split_at_newlines(tmp_path, monkeypatch):
    monkeypatch.setattr(documents.base, "SEGMENT_CHARS", 100)
    lines = [f"line {i:03d} " + "x" * (i % 17) for i in range(1, 201)]
    text = "\n".join(lines) + "\n"
    p = tmp_path / "big.log"
    p.write_text(text)
    segs = list(open_document(p).segments())
    assert len(segs) > 10
    assert "".join(s.text for s in segs) == text
    assert all(s.text.endswith("\n") for s in segs)
    for s in segs:  # each location names the first line of its segment
        n = int(s.location.removeprefix("line "))
        assert s.text.startswith(f"line {n:03d} ")


def test_one_huge_line_is_cut_eventually(tmp_path, monkeypatch):
    monkeypatch.setattr(documents.base, "SEGMENT_CHARS", 50)
    p = tmp_path / "one.txt"
    p.write_text("y" * 1000)
    segs = list(open_document(p).segments())
    assert len(segs) > 1 and "".join(s.text for s in segs) == "y" * 1000


def test_file_without_suffix_is_sniffed_as_text(tmp_path):
    p = tmp_path / "README"
    p.write_text("plain notes\n")
    assert open_document(p).text() == "plain notes\n"


def test_missing_file_suggests_a_close_name(tmp_path):
    (tmp_path / "report.pdf").write_bytes(b"%PDF-1.4")
    msg = err(open_document, tmp_path / "reprot.pdf")
    assert msg == f"{tmp_path / 'reprot.pdf'} does not exist: check the path (did you mean {tmp_path / 'report.pdf'}?)"
    assert err(open_document, tmp_path / "zzz.txt") == f"{tmp_path / 'zzz.txt'} does not exist: check the path"


def test_folder_where_a_file_was_expected(tmp_path):
    msg = err(open_document, tmp_path)
    assert msg.startswith(f"{tmp_path} is a folder, not a file: ")
    assert "`dynkv batch`" in msg


@pytest.mark.parametrize("content", [b"", b"  \n\t\r\n  "])
def test_empty_file(tmp_path, content):
    p = tmp_path / "blank.txt"
    p.write_bytes(content)
    assert err(open_document, p).startswith(f"{p} is empty: nothing to read")


def test_empty_pdf_file(tmp_path):
    p = tmp_path / "zero.pdf"
    p.write_bytes(b"")
    assert err(open_document, p) == f"{p} is empty: nothing to read"


def test_binary_file(tmp_path):
    p = tmp_path / "data.txt"
    p.write_bytes(bytes(range(256)) * 8)
    assert err(open_document, p) == (f"{p} looks like a binary file, not text: convert it to a .txt or .pdf first")


def test_binary_without_nul_bytes(tmp_path):
    p = tmp_path / "blob"
    p.write_bytes(bytes(b for b in range(1, 256) if b not in b"\n\r\t") * 8)
    assert "looks like a binary file" in err(open_document, p)


def test_utf16_without_bom_gets_a_hint(tmp_path):
    p = tmp_path / "wide.txt"
    p.write_bytes("hello there, wide text".encode("utf-16-le"))
    assert "(if it is UTF-16 text, save it as UTF-8 or with a byte-order mark)" in err(open_document, p)


def test_unknown_suffix_lists_what_is_accepted(tmp_path):
    p = tmp_path / "letter.docx"
    p.write_bytes(b"PK\x03\x04")
    msg = err(open_document, p)
    assert msg.startswith(f"{p} has an unsupported type '.docx': dynkv reads .txt .text .rst .log .csv .json")
    assert ".md .markdown .pdf .jsonl" in msg
    assert "convert it to PDF or plain text" in msg


def test_unreadable_file(tmp_path, monkeypatch):
    p = tmp_path / "secret.txt"
    p.write_text("hidden")

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(documents.registry, "open", denied, raising=False)  # works as root too
    assert err(open_document, p) == f"cannot read {p}: permission denied (check the file's permissions)"


def test_fingerprint_is_stable_and_follows_changes(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("version one")
    f1 = open_document(p).fingerprint
    assert f1 == open_document(p).fingerprint and len(f1) == 16
    p.write_text("version two, longer")
    assert open_document(p).fingerprint != f1


# ---------------------------------------------------------------- stdin


def test_stdin_text(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xef\xbb\xbffrom a pipe\r\nline 2\n")))
    doc = open_document("-")
    assert (doc.kind, doc.source, doc.path) == ("stdin", "<stdin>", None)
    assert doc.text() == "from a pipe\nline 2\n"
    assert [s.location for s in doc.segments()] == ["line 1"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("from a pipe\nline 2\n"))
    assert open_document("-").fingerprint == doc.fingerprint  # same text, same fingerprint
    monkeypatch.setattr(sys, "stdin", io.StringIO("other"))
    assert open_document("-").fingerprint != doc.fingerprint


def test_stdin_latin1(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("caf\xe9\n".encode("latin-1"))))
    doc = open_document("-")
    assert doc.text() == "café\n" and doc.warnings == ["decoded as Windows-1252 (not valid UTF-8)"]


def test_stdin_empty(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(" \n"))
    assert err(open_document, "-").startswith("<stdin> is empty: nothing to read")


def test_stdin_terminal(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Tty("never read"))
    assert err(open_document, "-").startswith("<stdin> is a terminal, not a document: pipe one in")


# ---------------------------------------------------------------- JSONL


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_single_record(tmp_path):
    p = write_jsonl(tmp_path / "one.jsonl", ['{"id": 7, "context": "the document", "input": "the question"}'])
    doc = open_document(p)
    assert (doc.kind, doc.source, doc.text()) == ("jsonl-record", f"{p}#1", "the document")
    assert doc.record == {"id": 7, "context": "the document", "input": "the question"}
    assert [s.location for s in doc.segments()] == ["record 1"]


@pytest.mark.parametrize("field", ["text", "input"])
def test_jsonl_fallback_fields(tmp_path, field):
    p = write_jsonl(tmp_path / "one.jsonl", [f'{{"{field}": "body"}}'])
    assert open_document(p).text() == "body"


def test_jsonl_record_by_line_number(tmp_path):
    p = write_jsonl(tmp_path / "many.jsonl", ['{"context": "first"}', "", '{"context": "third"}'])
    doc = open_document(f"{p}#3")
    assert (doc.source, doc.text()) == (f"{p}#3", "third")
    assert err(open_document, f"{p}#2").startswith(f"{p}#2 does not exist: line 2 of {p} is blank")


def test_jsonl_many_records_refused_by_open_document(tmp_path):
    p = write_jsonl(tmp_path / "many.jsonl", ['{"context": "a"}', '{"context": "b"}'])
    msg = err(open_document, p)
    assert msg.startswith(f"{p} holds 2 records: open one as {p}#<line number>, or give the file to")


def test_jsonl_errors(tmp_path):
    p = write_jsonl(tmp_path / "r.jsonl", ['{"question": "q", "answers": ["a"]}'])
    assert err(open_document, p) == (
        f'{p}#1 has no document text: expected a field named "context", "text" or "input" '
        f'(found: "question", "answers"); rename the field that holds the document'
    )
    p = write_jsonl(tmp_path / "r.jsonl", ['{"context": "a", oops}'])
    assert err(open_document, p).startswith(f"{p} line 1 is not valid JSON (")
    assert err(open_document, p).endswith("fix or remove that line")
    p = write_jsonl(tmp_path / "r.jsonl", ['["context"]'])
    assert err(open_document, p).startswith(f"{p} line 1 is a JSON list, not an object")
    p = write_jsonl(tmp_path / "r.jsonl", ['{"context": 5}'])
    assert err(open_document, p) == f'{p}#1: field "context" is a int, not a string: store the document as text'
    p = write_jsonl(tmp_path / "r.jsonl", ['{"context": "  "}'])
    assert err(open_document, p) == f'{p}#1 is empty: its "context" field has no text'
    p = write_jsonl(tmp_path / "r.jsonl", ["", " "])
    assert err(open_document, p) == f"{p} is empty: it has no JSON records"


# ---------------------------------------------------------------- iter_documents


@pytest.fixture
def folder(tmp_path, pdfs) -> Path:
    root = tmp_path / "reports"
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "10.txt").write_text("ten")
    (root / "2.txt").write_text("two")
    (root / "b.md").write_text("bee")
    (root / "sub" / "1.pdf").write_bytes(pdfs["text"].read_bytes())
    (root / "image.png").write_bytes(b"\x89PNG")
    (root / ".hidden.txt").write_text("hidden")
    (root / ".git" / "notes.txt").write_text("git")
    return root


def sources(items) -> list[str]:
    return [x.source for x in items]


def test_folder_recursive_sorted_and_filtered(folder):
    items = list(iter_documents([folder]))
    assert all(isinstance(x, Document) for x in items)
    assert sources(items) == [str(folder / n) for n in ("2.txt", "10.txt", "b.md", "sub/1.pdf")]
    assert [x.text() for x in items[:3]] == ["two", "ten", "bee"]


def test_folder_with_pattern(folder):
    assert sources(iter_documents([folder], pattern="*.PDF")) == [str(folder / "sub/1.pdf")]
    assert sources(iter_documents([folder], pattern="sub/*")) == [str(folder / "sub/1.pdf")]


def test_bad_file_in_a_folder_is_yielded_in_place(folder):
    (folder / "3.txt").write_bytes(b"")
    items = list(iter_documents([folder]))
    assert sources(items) == [str(folder / n) for n in ("2.txt", "3.txt", "10.txt", "b.md", "sub/1.pdf")]
    assert isinstance(items[1], DocumentError)
    assert str(items[1]) == f"{folder / '3.txt'} is empty: nothing to read"
    assert all(isinstance(x, Document) for x in items[:1] + items[2:])


def test_pattern_that_picks_unreadable_files_yields_errors(folder):
    [item] = iter_documents([folder], pattern="*.png")
    assert isinstance(item, DocumentError) and "unsupported type '.png'" in str(item)


def test_folder_without_matching_files_raises_at_once(tmp_path, folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "photo.jpg").write_bytes(b"\xff\xd8")
    msg = err(iter_documents, [folder, empty])  # raises before yielding the good folder
    assert msg.startswith(f"{empty} has no files dynkv can read (.txt")
    assert msg.endswith("check the folder, or pass --pattern")
    assert err(iter_documents, [folder], pattern="*.docx") == (
        f"{folder} has no files matching '*.docx': check --pattern"
    )


def test_glob_strings(folder):
    items = list(iter_documents([f"{folder}/*.txt"]))
    assert sources(items) == [f"{folder}/2.txt", f"{folder}/10.txt"]
    assert sources(iter_documents([f"{folder}/**/*.pdf"])) == [f"{folder}/sub/1.pdf"]
    assert err(iter_documents, [f"{folder}/*.docx"]) == (
        f"'{folder}/*.docx' matches no files: check the pattern and the folder"
    )


def test_missing_input_and_no_input_raise_at_once(tmp_path):
    assert err(iter_documents, [tmp_path / "nope.txt"]) == f"{tmp_path / 'nope.txt'} does not exist: check the path"
    assert err(iter_documents, []).startswith("no input given: pass a file, a folder, a glob")


def test_jsonl_file_gives_one_document_per_record(tmp_path):
    p = write_jsonl(
        tmp_path / "set.jsonl",
        ['{"context": "doc one", "id": 1}', "", "not json", '{"answers": []}', '{"text": "doc five"}'],
    )
    items = list(iter_documents([p]))
    assert sources(items) == [f"{p}#1", f"{p}#3", f"{p}#4", f"{p}#5"]
    assert [type(x).__name__ for x in items] == ["Document", "DocumentError", "DocumentError", "Document"]
    assert items[0].text() == "doc one" and items[3].text() == "doc five"
    assert "line 3 is not valid JSON" in str(items[1])
    assert items[0].fingerprint != items[3].fingerprint


def test_files_are_read_once_and_stdin_works(folder, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("piped"))
    items = list(iter_documents([folder / "2.txt", "-", folder]))
    assert sources(items)[:3] == [str(folder / "2.txt"), "<stdin>", str(folder / "10.txt")]
    assert len(items) == 5


def test_password_applies_to_every_pdf(pdfs, tmp_path):
    items = list(iter_documents([pdfs["locked"], pdfs["text"], pdfs["open_locked"]], password="secret"))
    assert all(isinstance(x, Document) for x in items)
    [item] = iter_documents([pdfs["locked"]])
    assert isinstance(item, DocumentError) and str(item).endswith("is encrypted: pass --password")
    assert item.source == str(pdfs["locked"])


# ---------------------------------------------------------------- the reader registry

# One sample per registered suffix: what to write and the kind of Document it gives.
SAMPLES = {
    **{s: (b"plain words\n", "text") for s in (".txt", ".text", ".rst", ".log", ".csv", ".json")},
    ".md": (b"# Title\n\nwords\n", "markdown"),
    ".markdown": (b"# Title\n\nwords\n", "markdown"),
    ".pdf": (None, "pdf"),  # the module's text PDF
    ".jsonl": (b'{"context": "one record"}\n', "jsonl-record"),
}


def test_every_registered_suffix_has_a_sample():
    assert documents.accepted_suffixes() == tuple(SAMPLES)  # the order the unsupported-type message lists
    assert documents.ACCEPTED_SUFFIXES == tuple(SAMPLES)


@pytest.mark.parametrize("suffix", list(SAMPLES))
def test_every_registered_suffix_opens_its_kind_of_file(suffix, tmp_path, pdfs):
    content, kind = SAMPLES[suffix]
    p = tmp_path / f"sample{suffix.upper()}"  # suffixes match in any case
    p.write_bytes(pdfs["text"].read_bytes() if content is None else content)
    doc = open_document(p)
    assert doc.kind == kind and doc.text().strip()
    [item] = iter_documents([tmp_path])  # and folder walking picks the file
    assert item.kind == kind


@pytest.mark.parametrize(("content", "kind"), [(b"notes\n", "text"), (None, "pdf")])
def test_a_file_without_a_suffix_is_sniffed_by_its_first_bytes(content, kind, tmp_path, pdfs):
    p = tmp_path / "NOTES"
    p.write_bytes(pdfs["text"].read_bytes() if content is None else content)
    assert open_document(p).kind == kind


class ShoutReader(documents.base.Reader):
    """A reader for the made-up ".shout" format: the file's text in capitals, one segment."""

    def segments(self, doc):
        yield Segment(doc.path.read_text().upper(), doc.source, "")


def open_shout(f: documents.FileInput) -> Document:
    return Document(source=f.source, path=f.path, kind="shout", fingerprint=f.fingerprint, _reader=ShoutReader())


def each_shout(p: Path, source: str):
    """Two documents per .shout file, to show a format with several documents in a file."""
    for n in (1, 2):
        yield open_shout_member(p, source, n)


def open_shout_member(p: Path, source: str, n: int) -> Document:
    return Document(source=f"{source}#{n}", path=p, kind="shout", fingerprint=str(n), _reader=ShoutReader())


@pytest.fixture
def shout():
    """Register ".shout" for one test (and forget it after)."""
    documents.register_reader(".shout")(open_shout)
    yield
    documents.unregister_reader(".shout")


def test_a_registered_reader_is_used_by_open_document(shout, tmp_path):
    p = tmp_path / "memo.shout"
    p.write_text("quiet words")
    doc = open_document(p)
    assert (doc.kind, doc.text(), doc.source) == ("shout", "QUIET WORDS", str(p))
    other = tmp_path / "memo.docx"
    other.write_bytes(b"PK")
    msg = err(open_document, other)
    assert "dynkv reads .txt .text .rst .log .csv .json .md .markdown .pdf .jsonl .shout (and" in msg


def test_a_registered_reader_is_used_by_folder_walking(shout, tmp_path):
    (tmp_path / "a.txt").write_text("plain")
    (tmp_path / "b.shout").write_text("loud")
    (tmp_path / "c.docx").write_bytes(b"PK")
    items = list(iter_documents([tmp_path]))
    assert [(x.kind, x.text()) for x in items] == [("text", "plain"), ("shout", "LOUD")]
    assert documents.skipped_files([tmp_path]) == {str(tmp_path): [str(tmp_path / "c.docx")]}


def test_a_reader_with_several_documents_per_file(tmp_path):
    documents.register_reader(".shout", each=each_shout, member=open_shout_member)(open_shout)
    try:
        p = tmp_path / "two.shout"
        p.write_text("hey")
        assert sources(iter_documents([tmp_path])) == [f"{p}#1", f"{p}#2"]
        assert open_document(f"{p}#2").source == f"{p}#2"
        assert sources(iter_documents([f"{p}#2"])) == [f"{p}#2"]
    finally:
        documents.unregister_reader(".shout")


def test_an_unregistered_suffix_gives_the_unsupported_type_message(tmp_path):
    p = tmp_path / "memo.shout"
    p.write_text("quiet words")
    assert err(open_document, p) == (
        f"{p} has an unsupported type '.shout': dynkv reads .txt .text .rst .log .csv .json .md .markdown .pdf "
        ".jsonl (and text files without a suffix); convert it to PDF or plain text first, "
        "or rename it to .txt if it is plain text"
    )
    assert err(iter_documents, [tmp_path]) == (
        f"{tmp_path} has no files dynkv can read (.txt .text .rst .log .csv .json .md .markdown .pdf .jsonl): "
        "check the folder, or pass --pattern"
    )
    assert documents.skipped_files([tmp_path]) == {str(tmp_path): [str(p)]}


@pytest.mark.parametrize("bad", ["shout", ".SHOUT", "."])
def test_a_suffix_is_registered_as_dot_and_lower_case(bad):
    with pytest.raises(ValueError, match="lower-case"):
        documents.register_reader(bad)


# ---------------------------------------------------------------- library boundaries


def test_documents_does_not_import_torch_or_the_cli():
    names = set()
    modules = sorted(Path(documents.__file__).parent.glob("*.py"))
    assert len(modules) > 5  # the package, not one file
    for node in (n for m in modules for n in ast.walk(ast.parse(m.read_text()))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0] if node.level == 0 else "." + node.module)
    assert not names & {"torch", "transformers", "typer", "rich", "dynkv_cli", ".cli"}


def test_from_text():
    doc = Document.from_text("some text\n", source="note")
    assert (doc.text(), doc.source, doc.kind) == ("some text\n", "note", "text")
