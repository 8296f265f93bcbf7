"""Bi-level cache and selective reload (dynkv_cli/reload.py) on the tiny random model.

The exactness check: a document read in one chunk with the whole low level kept, and every block
reloaded, is the full-KV cache again: the answer equals full KV's, token for token, for every
layout (uniform and ragged). Quality on a real model is `python -m dynkv_bench.reload`.
"""

from __future__ import annotations

import json

import pytest
from cli_helpers import invoke, one_error_line
from tiny import text_of

from dynkv_cli.config import CompressionSettings, GenerationSettings
from dynkv_cli.engine import Engine
from dynkv_cli.errors import UsageError
from dynkv_cli.model import load_model
from dynkv_cli.prompt import TaskPrompt
from dynkv_cli.reload import BLOCK, choose_chunks

PROMPT = TaskPrompt(before_document="Read.\n", after_document="\nq: {question}\na:")
Q = "what is the key"
DOC = " ".join(text_of(60, seed=i) for i in range(12))
GEN = GenerationSettings(max_new_tokens=8)


@pytest.fixture(scope="module")
def lm(model):
    return load_model(model)


def engine(lm, method: str, budget: str = "5%", chunk: int = 1024) -> Engine:
    return Engine(lm, CompressionSettings(method=method, budget=budget, chunk_size=chunk), GEN)


@pytest.mark.parametrize("method", ["dynamickv", "snapkv", "adakv"])
def test_reloading_every_block_of_a_whole_low_level_is_full_kv(lm, method):
    full = engine(lm, "full", "full")
    reference = full.ask(full.compress(DOC, PROMPT, question=Q), Q)
    e = engine(lm, method)
    doc = e.compress(DOC, PROMPT, question=Q, low_level=1.0)
    n = doc.stats.doc_tokens
    assert len(doc.low_level.chunks) == -(-n // BLOCK)
    before, plain = doc.cache.kept_per_layer(), e.ask(doc, Q)
    again = e.ask(doc, Q, reload=n)
    assert again.token_ids == reference.token_ids
    assert plain.token_ids != reference.token_ids  # a 5% cache answers otherwise: the reload made the difference
    assert again.reload["entries_per_head"] == n and again.reload["blocks"] == list(range(len(doc.low_level.chunks)))
    assert doc.cache.kept_per_layer() == before and e.ask(doc, Q).token_ids == plain.token_ids  # doc unchanged


def test_a_partial_low_level_and_a_reload_budget(lm):
    e = engine(lm, "dynamickv", chunk=256)
    doc = e.compress(DOC, PROMPT, question=Q, low_level=0.25)
    low = doc.low_level
    n = doc.stats.doc_tokens
    sizes = [low.chunk_entries(c) for c in range(len(low.chunks))]
    assert sizes[0] == BLOCK // 4 and sum(sizes) <= n // 4 + len(sizes)
    whole = lm.cache_bytes_per_token() * n
    assert low.nbytes() < 0.35 * whole  # a quarter of the keys and values, plus positions
    budget = 3 * BLOCK // 4
    answer = e.ask(doc, Q, reload=budget)
    chosen = answer.reload["blocks"]
    assert chosen[0] == 0 and chosen[-1] == len(low.chunks) - 1
    assert answer.reload["entries_per_head"] == sum(sizes[c] for c in chosen) <= budget
    assert answer.reload["bytes_moved"] > 0


def test_choose_chunks_keeps_the_ends_then_the_best_that_fit():
    assert choose_chunks([0.1, 0.5, 0.05, 0.3, 0.05], [10] * 5, 40) == [0, 1, 3, 4]
    assert choose_chunks([0.1, 0.5, 0.05, 0.3, 0.05], [10, 30, 10, 10, 10], 35) == [0, 3, 4]  # 1 does not fit
    assert choose_chunks([1.0], [10], 0) == [0]
    assert choose_chunks([], [], 10) == []


def test_without_a_low_level_reload_is_refused_and_off_is_unchanged(lm):
    e = engine(lm, "snapkv")
    doc = e.compress(DOC, PROMPT, question=Q)
    assert doc.low_level is None
    with pytest.raises(UsageError, match="without a low level"):
        e.ask(doc, Q, reload=64)
    assert e.ask(doc, Q).reload is None and "reload" not in e.ask(doc, Q).to_dict()


def test_cli_reload(model, tmp_path):
    path = tmp_path / "d.txt"
    path.write_text(DOC)
    base = ["qa", path, "-q", Q, "--model", model, "--max-new-tokens", "4", "--chunk-size", "256", "--json"]
    r = invoke([*base, "--reload", "20%"])
    assert r.exit_code == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["answers"][0]["reload"]["blocks"][0] == 0
    plain = json.loads(invoke(base).stdout)
    assert "reload" not in plain["answers"][0]
    bad = invoke([*base, "--reload", "512MiB"])
    assert bad.exit_code == 2 and "share of the document (8%) or tokens (256)" in one_error_line(bad)


def test_compact_mode_refuses_reload(tmp_path):
    from tiny import make_model

    lm = load_model(make_model(tmp_path / "short", "qwen2", max_pos=160))
    e = Engine(lm, CompressionSettings(method="snapkv", budget="16", chunk_size=64), GenerationSettings(max_new_tokens=4))
    doc = e.compress(text_of(300, seed=3), PROMPT, question=Q, low_level=1.0)
    assert doc.cache.compactions > 0
    with pytest.raises(UsageError, match="compact mode"):
        e.ask(doc, Q, reload=64)


def test_compress_saves_both_levels_and_qa_reloads_from_the_file(model, tmp_path):
    path = tmp_path / "d.txt"
    path.write_text(DOC)
    fast = ["--model", model, "--chunk-size", "1024", "--budget", "5%"]
    plain, bilevel = tmp_path / "plain.dkv", tmp_path / "bi.dkv"
    assert invoke(["compress", path, "-o", plain, *fast]).exit_code == 0
    r = invoke(["compress", path, "-o", bilevel, "--low-level", "1", *fast])
    assert r.exit_code == 0, r.stderr
    assert bilevel.stat().st_size > 3 * plain.stat().st_size  # the whole document is in the low level
    assert invoke(["info", bilevel, "--verify"]).exit_code == 0  # every tensor, low level included, checks
    ask = ["qa", bilevel, "-q", Q, "--max-new-tokens", "6", "--json", "--model", model]
    again = json.loads(invoke([*ask, "--reload", "100%"]).stdout)
    full = json.loads(invoke(["qa", path, "-q", Q, "--max-new-tokens", "6", "--json", "--model", model, "--budget", "full"]).stdout)
    assert again["answer"] == full["answer"]  # every block back: the full-KV answer, from the file alone
    assert again["answers"][0]["reload"]["entries_per_head"] >= 800
    no_low = invoke(["qa", plain, "-q", Q, "--json", "--model", model, "--reload", "8%"])
    assert no_low.exit_code == 2 and "without a low level" in one_error_line(no_low)
    bad = invoke(["compress", path, "-o", tmp_path / "x.dkv", "--low-level", "2", *fast])
    assert bad.exit_code == 2 and "--low-level 2.0" in one_error_line(bad)
