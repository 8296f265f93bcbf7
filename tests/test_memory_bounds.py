"""Memory bounds: ids stream for every budget kind, a cache that would not fit is refused, large
percentage budgets and compact mode are reported (tiny random models, never downloaded)."""

from __future__ import annotations

import json
import re
import tracemalloc

import pytest
import torch
from cli_helpers import FAST, invoke, one_error_line
from tiny import make_model, text_of

from dynkv_cli import CompressionSettings, Engine, GenerationSettings, TaskPrompt, load_model
from dynkv_cli import engine as engine_mod
from dynkv_cli.budget import fitting_budget, format_bytes, parse_memory
from dynkv_cli.documents import Document
from dynkv_cli.errors import BudgetError, CacheTooLargeError, OutOfMemoryError
from dynkv_cli.prompt import encode
from dynkv_cli.tasks import TaskRunner

PROMPT = TaskPrompt(before_document="Read this.\n", after_document="\nquestion: {question}\nanswer:")
QUESTION = "what is the key number"


@pytest.fixture(scope="session")
def lm(model):
    return load_model(model)


@pytest.fixture(scope="session")
def short_model(tmp_path_factory):
    """A tiny model with only 160 positions (documents longer than that are read in compact mode)."""
    return make_model(tmp_path_factory.mktemp("short") / "short", "qwen2", max_pos=160)


def segments(n: int, words: int = 120):
    return [text_of(words, seed=i) + "\n" for i in range(n)]


# ---- streaming ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", ["2%", "full", "50", "64KiB"])
def test_chunks_stream_for_every_budget_kind(lm, budget):
    """A one-shot generator of many segments: chunks come out at chunk size, ids are never all held."""
    eng = Engine(lm, CompressionSettings(budget=budget, chunk_size=64))
    segs = segments(300)
    expected = sum(len(encode(lm.tokenizer, s)) for s in segs)
    tracemalloc.start()
    try:
        chunks, total = eng._token_chunks((s for s in segs), None)
        n, longest = 0, 0
        for c in chunks:
            n += len(c)
            longest = max(longest, len(c))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == expected and longest == 64
    assert total == (expected if budget in ("2%", "full") else None)  # counted only when it matters
    # a list of all ids costs 8 bytes a pointer (plus the ints); streaming holds a segment and a chunk
    assert peak < expected * 8 / 4, (peak, expected)


def test_spool_reads_the_source_once_and_leaves_no_file(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    eng = Engine(lm, CompressionSettings(budget="2%", chunk_size=64))
    calls = []

    def source():
        calls.append(1)
        yield from segments(20)

    chunks, total = eng._token_chunks(source(), None)
    assert total > 0 and len(calls) == 1
    assert sum(len(c) for c in chunks) == total
    assert list(tmp_path.iterdir()) == []  # an unnamed temporary file: nothing to clean up


def test_percent_budget_over_segments_matches_the_ids_path(lm):
    """Same kept tokens, fingerprint and answer as when all ids are given at once (the old path)."""
    gen = GenerationSettings(max_new_tokens=6)
    eng = Engine(lm, CompressionSettings(method="dynamickv", budget="10%", chunk_size=64), gen)
    segs = segments(8)
    ids = [i for s in segs for i in encode(lm.tokenizer, s)]
    a = eng.compress(ids, PROMPT, question=QUESTION)
    b = eng.compress((s for s in segs), PROMPT, question=QUESTION)
    assert b.stats.doc_tokens == a.stats.doc_tokens == len(ids)
    assert b.stats.budget_tokens == a.stats.budget_tokens == -(-len(ids) // 10)
    assert b.stats.kept_per_layer == a.stats.kept_per_layer
    assert b.fingerprint == a.fingerprint
    for la, lb in zip(a.cache.layers, b.cache.layers):
        assert torch.equal(la.positions, lb.positions)
    assert eng.ask(b, QUESTION).token_ids == eng.ask(a, QUESTION).token_ids


def test_stdin_with_a_percentage_budget(model, tmp_path):
    text = "".join(segments(6)) + "The pass key is 4711.\n"
    path = tmp_path / "doc.txt"
    path.write_text(text, encoding="utf-8")
    args = ["qa", "-q", "What is the pass key?", "--model", model, "--budget", "5%", "--json", *FAST]
    piped = invoke([*args[:1], "-", *args[1:]], input=text)
    assert piped.exit_code == 0, piped.stderr
    from_file = invoke([*args[:1], path, *args[1:]])
    assert from_file.exit_code == 0, from_file.stderr
    p, f = json.loads(piped.stdout), json.loads(from_file.stdout)
    assert p["doc_tokens"] == f["doc_tokens"] > 0
    assert p["budget_tokens"] == f["budget_tokens"] == -(-p["doc_tokens"] * 5 // 100)
    assert p["kept_per_layer"] == f["kept_per_layer"]


# ---- the memory limit --------------------------------------------------------------------------------


def test_memory_words():
    assert parse_memory("2GiB") == 2 * 2**30
    assert parse_memory("512 MB") == 512 * 10**6
    assert parse_memory("1000") == 1000
    assert parse_memory("off") is None
    with pytest.raises(BudgetError, match="--max-cache"):
        parse_memory("lots")
    assert format_bytes(9.1 * 2**30) == "9.1 GiB" and format_bytes(300) == "300 B"
    assert fitting_budget(5000 * 100, 100, 0) == 4096
    assert fitting_budget(100, 100, 5) == 0


def test_refused_before_the_first_chunk(lm, monkeypatch):
    eng = Engine(lm, CompressionSettings(budget="50%", chunk_size=32), max_cache="64KiB")
    forwards = []
    monkeypatch.setattr(Engine, "_forward", lambda self, *a, **k: forwards.append(1))
    with pytest.raises(CacheTooLargeError) as err:
        eng.compress((s for s in segments(10)), PROMPT, question=QUESTION)
    assert forwards == []  # not even the prompt's prefix
    msg = str(err.value)
    assert re.fullmatch(
        r"a 50% budget of this [\d,]+-token document keeps [\d,]+ tokens per layer, a [\d.]+ KiB cache; "
        r"this machine allows 64\.0 KiB \(--max-cache\): use --budget \d+ or less",
        msg,
    ), msg
    assert err.value.exit_code == 2


def test_default_limit_is_a_share_of_available_memory(lm, monkeypatch):
    monkeypatch.setattr(engine_mod, "_mem_available", lambda: 256 * 2**10)
    eng = Engine(lm, CompressionSettings(budget="full", chunk_size=32))
    with pytest.raises(CacheTooLargeError, match=r"a full cache of this [\d,]+-token document keeps all") as err:
        eng.compress((s for s in segments(20)), PROMPT, question=QUESTION)
    assert "allows 128.0 KiB (50% of the available memory; --max-cache sets it)" in str(err.value)
    off = Engine(lm, CompressionSettings(budget="full", chunk_size=256), GenerationSettings(max_new_tokens=2))
    off.max_cache, off._max_cache_bytes = "off", None
    assert off.compress(segments(2), PROMPT, question=QUESTION).stats.budget_tokens is None


def test_cli_refusal_then_the_suggested_budget_runs(model, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("".join(segments(10)), encoding="utf-8")
    base = ["qa", doc, "-q", "What?", "--model", model, "--max-new-tokens", "2", "--chunk-size", "32"]
    r = invoke([*base, "--budget", "50%", "--max-cache", "300KiB"])
    assert r.exit_code == 2
    err = one_error_line(r)
    m = re.search(r"use --budget (\d+) or less", err)
    assert m and "this machine allows 300.0 KiB (--max-cache)" in err, err
    ok = invoke([*base, "--budget", m.group(1), "--max-cache", "300KiB"])
    assert ok.exit_code == 0, ok.stderr
    full = invoke([*base, "--budget", "full", "--max-cache", "300KiB"])
    assert full.exit_code == 2 and "a full cache of this" in one_error_line(full)
    tiny = invoke([*base, "--budget", "8", "--max-cache", "1KiB"])
    assert tiny.exit_code == 2 and "use a smaller --chunk-size or a larger --max-cache" in one_error_line(tiny)
    bad = invoke([*base, "--max-cache", "lots"])
    assert bad.exit_code == 2 and "--max-cache 'lots' is not a size" in one_error_line(bad)


def test_config_file_max_cache(model, tmp_path, isolated_config):
    isolated_config.mkdir(parents=True, exist_ok=True)
    (isolated_config / "config.yaml").write_text("max_cache: 100KiB\n", encoding="utf-8")
    doc = tmp_path / "doc.txt"
    doc.write_text("".join(segments(10)), encoding="utf-8")
    base = ["qa", doc, "-q", "What?", "--model", model, "--budget", "full", *FAST]
    r = invoke(base)
    assert r.exit_code == 2 and "allows 100.0 KiB (--max-cache)" in one_error_line(r)
    (isolated_config / "config.yaml").write_text("max_cache: off\n", encoding="utf-8")
    assert invoke(base).exit_code == 0


def test_out_of_memory_gives_advice_and_exit_code_1(lm, model, tmp_path, monkeypatch):
    eng = Engine(lm, CompressionSettings(budget="50%", chunk_size=32))

    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(lm, "model", boom)
    with pytest.raises(OutOfMemoryError) as err:
        eng.compress(segments(4), PROMPT, question=QUESTION)
    assert re.search(r"out of memory on cpu with a .* cache and a pass of [\d,]+ tokens", str(err.value))
    assert re.search(r"use --budget \d+ or less", str(err.value))
    assert err.value.exit_code == 1


# ---- warnings: large percentage budgets, compact mode ------------------------------------------------


def test_large_percentage_budget_warns_once(lm, monkeypatch):
    monkeypatch.setattr(engine_mod, "PERCENT_WARN_TOKENS", 16)
    from dynkv_cli.profiles import load_profile

    warned = []
    from dynkv_cli.tasks import Hooks

    profile = load_profile("qa").with_overrides(budget="20%", chunk_size=64, max_new_tokens=2)
    runner = TaskRunner(lm, profile, Hooks(warning=warned.append))
    result = runner.qa(Document.from_text("".join(segments(6))), ["What?", "Why?"])
    assert len(warned) == 1, warned
    assert re.fullmatch(
        r"<text>: a 20% budget of this [\d,]+-token document keeps [\d,]+ tokens per layer, a [\d.]+ KiB cache, "
        r"not a small one \(reading it takes long\): a fixed budget such as --budget 8 keeps it small",
        warned[0],
    ), warned[0]
    assert result.to_dict()["warnings"] == warned


def test_compact_mode_is_reported_in_text_and_json(short_model, tmp_path):
    doc = tmp_path / "long.txt"
    doc.write_text(text_of(700), encoding="utf-8")
    base = ["qa", doc, "-q", "What?", "--model", short_model, "--budget", "12", "--chunk-size", "32"]
    base += ["--max-new-tokens", "4"]
    text = invoke(base)
    assert text.exit_code == 0, text.stderr
    m = re.search(
        r"warning: the document \(([\d,]+) tokens\) is longer than the model's 160 positions; "
        r"read in compact mode \(positions compressed (\d+) time\(s\)\)",
        text.stderr,
    )
    assert m, text.stderr
    assert "warning" not in text.stdout
    js = invoke([*base, "--json"])
    assert js.exit_code == 0, js.stderr
    rec = json.loads(js.stdout)
    assert rec["compactions"] == int(m.group(2)) >= 1 and rec["max_positions"] == 160
    assert rec["doc_tokens"] == int(m.group(1).replace(",", ""))
    assert [w for w in rec["warnings"] if "compact mode" in w] == [m.group(0)[len("warning: ") :]]


def test_compact_mode_on_task_result_and_from_a_cache_file(short_model, tmp_path):
    from dynkv_cli.profiles import load_profile

    lm = load_model(short_model)
    profile = load_profile("qa").with_overrides(budget="12", chunk_size=32, max_new_tokens=3)
    runner = TaskRunner(lm, profile)
    long = runner.qa(Document.from_text(text_of(700)), ["What?"])
    assert long.compactions >= 1 and long.to_dict()["compactions"] == long.compactions
    assert long.to_dict()["max_positions"] == 160
    short = runner.qa(Document.from_text(text_of(20)), ["What?"])
    assert short.compactions == 0 and not [w for w in short.warnings if "compact" in w]
    cdoc = runner.compress(Document.from_text(text_of(700)), question="What?")
    again = runner.qa(cdoc, ["What?"])
    assert again.compactions == cdoc.stats.compactions >= 1
    assert any("compact mode" in w for w in again.warnings)


def test_stdin_is_spooled_to_a_temporary_file_and_read_again(monkeypatch):
    import io
    import sys

    from dynkv_cli.documents import open_document

    text = "".join(segments(40))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.replace("\n", "\r\n").encode())))
    doc = open_document("-")
    assert not hasattr(doc._reader, "text")  # the text is not held in memory
    assert doc.text() == text and doc.text() == text  # read again, from the start
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    assert open_document("-").fingerprint == doc.fingerprint  # same text, same fingerprint


def test_memory_report_takes_max_cache(model, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("".join(segments(10)), encoding="utf-8")
    r = invoke(["profile", doc, "--model", model, "--budget", "full", "--max-cache", "100KiB", "--chunk-size", "32"])
    assert r.exit_code == 2 and "allows 100.0 KiB (--max-cache)" in one_error_line(r)
