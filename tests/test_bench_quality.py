"""`dynkv bench quality`: the harness scores correctly (tiny random model, short documents, few runs)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import make_model

from dynkv_bench import quality as Q
from dynkv_bench.tasks import format_prompt, make_example, make_suite, score
from dynkv_cli import load_model

LENGTH = 512


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("quality") / "llama", "llama")


@pytest.fixture(scope="module")
def lm(model_path):
    return load_model(model_path)


def _plain_greedy_text(lm, ids: list[int], n: int) -> str:
    """Plain transformers (SDPA, full KV) greedy continuation, for comparison with the harness's full run."""
    lm.model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            out = lm.model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=n,
                do_sample=False,
                eos_token_id=lm.tokenizer.eos_token_id,
                pad_token_id=lm.tokenizer.pad_token_id,
            )
        return lm.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()
    finally:
        lm.model.set_attn_implementation("dynkv")


def _with_bos(tok):
    """The tiny tokenizer with a post-processor that puts BOS in front, as many real tokenizers do."""
    from tokenizers import processors

    bos = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    assert tok("a")["input_ids"][0] == bos
    return tok


def test_ids_equal_the_plain_encoding(lm):
    """Prefix + document + suffix as the engine sees them == the tokenizer's own encoding of the
    document (with its BOS, if it adds one) followed by the suffix tokenised on its own."""
    from tiny import make_tokenizer

    for tok in (lm.tokenizer, _with_bos(make_tokenizer())):  # without and with a BOS post-processor
        for task in ("niah_single", "vt"):
            ex = make_example(task, 300, 5, tok)
            prep = Q.prepare(tok, ex, 0, 5, 300, "plain")
            doc, suffix = format_prompt(ex)
            plain = tok(doc)["input_ids"] + tok(suffix, add_special_tokens=False)["input_ids"]
            assert prep.prefix_ids + prep.doc_ids + prep.suffix_ids == plain == Q.reference_ids(tok, ex)
            assert prep.prompt.after_document == "\n{question}\nAnswer:"
            assert (prep.prefix_ids[:1] == [tok.bos_token_id]) == (tok("a")["input_ids"][0] == tok.bos_token_id)


def test_keep_everything_matches_full_prediction_for_prediction(lm):
    budgets = ["100%", "100000"]  # both keep every document token
    res = Q.run_quality(
        lm,
        tasks=["niah_single", "niah_multivalue"],
        lengths=[LENGTH],
        budgets=budgets,
        methods=["dynamickv", "snapkv", "streamingllm"],
        examples=1,
        seed=0,
        chunk_size=128,
    )
    full = {(p.task, p.example_index): p for p in res.predictions if p.method == Q.FULL}
    assert len(full) == 2
    others = [p for p in res.predictions if p.method != Q.FULL]
    assert len(others) == 2 * 3 * len(budgets)
    for p in others:
        f = full[(p.task, p.example_index)]
        assert (p.prediction, p.score, p.kept_per_layer) == (f.prediction, f.score, f.kept_per_layer)
        assert p.kept_per_layer == [p.doc_tokens] * res.num_layers
    # the harness's full run is plain greedy decoding over the prompt's plain ids
    for ex in make_suite(["niah_single"], LENGTH, 1, 0, "eval", lm.tokenizer):
        prep = Q.prepare(lm.tokenizer, ex, 0, 0, LENGTH)
        ids = prep.prefix_ids + prep.doc_ids + prep.suffix_ids
        assert full[("niah_single", 0)].prediction == _plain_greedy_text(lm, ids, Q.answer_budget(prep))


def _needle_span(tok, ex) -> list[int]:
    """Token indices (in the document) of the pass-key needle sentence."""
    needle = f"The pass key is {ex.answer}. Remember it. {ex.answer} is the pass key."
    start = ex.document.index(needle)
    end = start + len(needle)
    offs = tok(ex.document, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return [i for i, (a, b) in enumerate(offs) if a < end and b > start]


def test_dropping_the_needle_fails_it(lm):
    """StreamingLLM with a tiny budget on a mid-document needle: the needle is not in the cache and an
    oracle that reads only the kept tokens cannot answer (score 0); with full KV the same oracle scores 1."""
    tok = lm.tokenizer
    ex = next(e for s in range(200) if 0.3 < (e := make_example("niah_single", LENGTH, s, tok)).depth < 0.7)  # noqa: B023
    prep = Q.prepare(tok, ex, 0, 0, LENGTH)
    needle = _needle_span(tok, ex)
    seen = {}

    def oracle(engine, doc, example, gen):
        P = doc.cache.prefix_len
        kept = sorted({int(x) - P for layer in doc.cache.layers for x in layer.positions[:, P:].reshape(-1)})
        seen[doc.settings.method] = kept
        text = tok.decode([prep.doc_ids[i] for i in kept])
        return example.answer if example.answer in text else "unknown"

    keep = Q.run_one(lm, prep, "streamingllm", "16", 128, {}, oracle)
    assert not set(needle) & set(seen["streamingllm"])
    assert keep.prediction == "unknown" and keep.score == 0.0
    assert keep.kept_per_layer == [16] * lm.shape.num_layers
    assert set(needle) >= set(prep.evidence) and prep.evidence and keep.evidence_kept == 0.0
    full = Q.run_one(lm, prep, Q.FULL, Q.FULL, 128, {}, oracle)
    assert set(needle) <= set(seen["full"])
    assert full.prediction == ex.answer and full.score == 1.0 and full.evidence_kept == 1.0
    # the scoring path: a wrong or partial answer scores 0, the answer with spacing noise scores 1
    assert score(ex, str(int(ex.answer) + 1)) == 0.0
    assert score(ex, ex.answer[:-1]) == 0.0
    assert score(ex, f" {ex.answer} \nmore") == 1.0


def _fake(task, method, budget, s, length=4096, kept=None, prediction="", index=0):
    return Q.Prediction(
        task, length, index, 1 + index, method, budget, 10, 1000, prediction, "", s, 60, kept or [10] * 6, 0, 0, 0.5, 0.0
    )


def test_targets_and_distances_from_a_table():
    tasks = ["niah_single", "vt"]
    methods = ["dynamickv", "snapkv", "pyramidkv", "adakv"]
    r = Q.QualityResult("m", tasks, [4096], ["2%", "5%"], methods, 1, 0, 1024, 6)
    for t in tasks:
        r.predictions.append(_fake(t, "full", "full", 1.0, prediction="The key is 123456."))
        r.predictions.append(_fake(t, "dynamickv", "2%", 1.0 if t == "vt" else 0.8, kept=[20, 10, 10, 10, 5, 5]))
        r.predictions.append(_fake(t, "snapkv", "2%", 1.0))
        r.predictions.append(_fake(t, "pyramidkv", "2%", 0.5))
        r.predictions.append(_fake(t, "adakv", "2%", 0.9))
        r.predictions.append(_fake(t, "dynamickv", "5%", 1.0, kept=[5, 5, 10, 10, 10, 20], prediction="The key is 123."))
        for m in ("snapkv", "pyramidkv", "adakv"):
            r.predictions.append(_fake(t, m, "5%", 1.0))
    tab = r.table()["4096"]
    assert tab["2%"]["dynamickv"]["average"] == 90.0 and tab["2%"]["dynamickv"]["pct_of_full"] == 90.0
    two, five, beats, near, whole = r.targets(4096)
    assert two["met"] is True and two["pct_of_full"] == 90.0
    assert five["met"] is True and five["pct_of_full"] == 100.0
    assert beats["met"] is False and beats["behind"] == [  # a tie with adakv is not behind
        {"budget": "2%", "method": "snapkv", "dynamickv": 90.0, "snapkv": 100.0, "gap": 10.0},
    ]
    assert near["met"] is False and near["violations"] == [
        {"budget": "2%", "task": "niah_single", "dynamickv": 80.0, "snapkv": 100.0}
    ]
    assert whole["met"] is False and whole["truncated"]["dynamickv"] == 2 and whole["truncated"]["snapkv"] == 0
    assert not two["enough_examples"]
    lines = Q.target_lines(r, 4096)
    assert any("MISSED" in line for line in lines) and all("fewer than 8 examples" in line for line in lines)
    lb = r.layer_budgets()["4096"]
    assert lb["2%"]["tasks"]["vt"]["relative_to_budget"] == [2.0, 1.0, 1.0, 1.0, 0.5, 0.5]
    assert lb["2%"]["distances"]["between_tasks"] == 0.0
    d = Q.profile_distances({"a": [[0.5, 0.5], [0.7, 0.3]], "b": [[0.1, 0.9], [0.1, 0.9]]})
    assert d["within_task"] == pytest.approx(0.1, abs=1e-4) and d["between_tasks"] == pytest.approx(0.5, abs=1e-4)


def test_agnostic_and_summary_targets():
    r = Q.QualityResult("m", ["niah_single", Q.SUMMARY], [4096], ["2%", "5%", "10%"], ["dynamickv"], 8, 0, 1024, 6)
    r.protocols = ["agnostic"]
    for i in range(8):
        r.predictions.append(_fake("niah_single", "full", "full", 1.0, index=i))
        r.predictions.append(_fake("niah_single", "dynamickv", "10%", 1.0 if i < 7 else 0.0, index=i))
        r.predictions.append(_fake(Q.SUMMARY, "full", "full", 0.40, index=i))
        for b, rouge in (("2%", 0.37), ("5%", 0.39)):
            p = _fake(Q.SUMMARY, "dynamickv", b, rouge, index=i)
            p.off_topic = b == "2%" and i == 0
            r.predictions.append(p)
    agn, s2, s5 = r.targets(4096)
    assert agn["protocol"] == "agnostic" and agn["met"] is True and agn["pct_of_full"] == 87.5 and agn["enough_examples"]
    assert s2["met"] is False and s2["off_topic"] == 1 and s2["pct_of_full"] == 92.5
    assert s5["met"] is True and s5["off_topic"] == 0 and s5["pct_of_full"] == 97.5


def test_words():
    assert [Q.parse_length(w) for w in ("512", "4k", "8K")] == [512, 4096, 8192]
    assert Q.resolve_budgets("0.9%, 128") == ["0.9%", "128"]
    from dynkv_cli.methods import ALIASES, METHODS

    assert Q.resolve_methods(None) == [m for m in [*METHODS, *ALIASES] if m != "full"]
    assert Q.resolve_methods("snapkv,streamingllm", mix=True) == ["snapkv", "streamingllm", "snapkv+mix"]
    with pytest.raises(Q.UsageError):
        Q.resolve_tasks("niah_single,nope")


def test_command_end_to_end(model_path, tmp_path):
    import typer
    from typer.testing import CliRunner

    from dynkv_bench.cli import bench_app

    root = typer.Typer()
    root.add_typer(bench_app, name="bench")
    out = tmp_path / "q.json"
    res = CliRunner().invoke(
        root,
        [
            "bench",
            "quality",
            "--model",
            str(model_path),
            "--tasks",
            "niah_single,fact_end",
            "--lengths",
            "512",
            "--budgets",
            "10%,32",
            "--methods",
            "dynamickv,snapkv",
            "--examples",
            "1",
            "--chunk-size",
            "128",
            "--r-max",
            "4",
            "--json",
            str(out),
            "--markdown",
            str(tmp_path / "q.md"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "accuracy (%) at 512 tokens" in res.output
    assert "DynamicKV layer budgets" in res.output
    data = json.loads(out.read_text())
    assert data["methods"] == ["full", "dynamickv", "snapkv"] and data["retention"]["r_max"] == 4.0
    assert len(data["predictions"]) == 2 * (1 + 2 * 2)
    fields = {"task", "length", "seed", "method", "budget", "prediction", "answer", "score", "kept_tokens", "bytes"}
    for p in data["predictions"]:
        assert fields <= set(p)
        assert p["seed"] >> 62 == 1  # eval split
    assert set(data["table"]["512"]["10%"]) == {"full", "dynamickv", "snapkv"}
    assert set(data["layer_budgets"]["512"]) == {"10%", "32"}
    assert len(data["targets"]["512"]) == 5  # aware: 2%, 5%, beats the others, near snapkv, whole numbers
    kept = {p["kept_tokens"] for p in data["predictions"] if p["method"] == "snapkv" and p["budget"] == "32"}
    assert kept == {32 * 4}
    assert set(data["evidence_kept"]["512"]["32"]) == {"dynamickv", "snapkv"}
    md = (tmp_path / "q.md").read_text()
    assert "| task | full | dynamickv | snapkv |" in md and "### Targets" in md
    assert "#### 512 tokens, budget 10% (1 examples per task)" in md
    again = CliRunner().invoke(
        root, ["bench", "quality", "--from-json", str(out), "--markdown", str(tmp_path / "r.md")]
    )
    assert again.exit_code == 0, again.output
    assert (tmp_path / "r.md").read_text() == md


def test_a_failing_method_is_recorded_and_skipped(lm):
    def answer(engine, doc, example, gen):
        if doc.settings.method == "snapkv":
            raise RuntimeError("boom")
        return example.answer

    res = Q.run_quality(
        lm,
        tasks=["fact_end"],
        lengths=[256],
        budgets=["10%", "20%"],
        methods=["snapkv", "streamingllm"],
        examples=2,
        chunk_size=128,
        answer_fn=answer,
    )
    assert [e["method"] for e in res.errors] == ["snapkv"] and "boom" in res.errors[0]["error"]
    assert {p.method for p in res.predictions} == {"full", "streamingllm"}
    assert res.table()["256"]["10%"]["snapkv"]["average"] is None
    assert res.table()["256"]["20%"]["streamingllm"]["average"] == 100.0


def test_rounds_are_the_suite_examples_and_time_limit_keeps_cells_equal(lm):
    seen = []

    def answer(engine, doc, example, gen):
        seen.append(example)
        return ""

    kw = dict(tasks=["fact_end", "fact_start"], lengths=[200], budgets=["10%"], methods=["streamingllm"])
    res = Q.run_quality(lm, examples=2, chunk_size=128, answer_fn=answer, **kw)
    suite = make_suite(kw["tasks"], 200, 2, 0, "eval", lm.tokenizer)
    assert sorted(seen[::2], key=suite.index) == suite and res.examples == 2
    res = Q.run_quality(lm, examples=3, chunk_size=128, answer_fn=answer, time_limit=1e-6, **kw)
    assert res.examples == 1 and len(res.predictions) == 2 * 2


def test_r_max_caps_the_dynamickv_layers_and_is_recorded(lm):
    """--r-max 1 leaves DynamicKV no layer above the average budget B (plus its window); the result
    records the settings, and results run with other settings do not merge."""
    from dynkv_cli.methods.dynamickv import DynamicKVSettings

    kw = dict(tasks=["niah_single"], lengths=[512], budgets=["5%"], methods=["dynamickv"], examples=1, chunk_size=128)
    free = Q.run_quality(lm, answer_fn=lambda *a: "", **kw)
    capped = Q.run_quality(lm, answer_fn=lambda *a: "", retention={"r_max": 1.0}, **kw)
    (p_free,) = [p for p in free.predictions if p.method == "dynamickv"]
    (p_cap,) = [p for p in capped.predictions if p.method == "dynamickv"]
    window = DynamicKVSettings().window
    assert max(p_free.kept_per_layer) > p_free.budget_tokens + window  # uncapped, the budget moves between layers
    assert max(p_cap.kept_per_layer) <= p_cap.budget_tokens + window
    assert capped.to_dict()["retention"]["r_max"] == 1.0 and free.retention["r_max"] == 10.0
    assert Q.QualityResult.from_dict(capped.to_dict()).retention == capped.retention
    with pytest.raises(Exception, match="retention settings"):
        Q.merge_results([free, capped])


def test_targets_are_not_measurable_when_full_kv_fails():
    methods = ["dynamickv", "snapkv", "pyramidkv", "adakv"]
    r = Q.QualityResult("m", ["niah_single"], [4096], ["2%", "5%"], methods, 1, 0, 1, 6)
    r.predictions += [_fake("niah_single", "full", "full", 0.0)]
    r.predictions += [_fake("niah_single", m, b, 0.0) for m in r.methods for b in r.budgets]
    ts = r.targets(4096)
    assert [t["met"] for t in ts] == [None] * 5 and all("does not solve" in t["note"] for t in ts)
    assert ts[3]["met_as_computed"] is True
    assert all("not measurable" in line for line in Q.target_lines(r, 4096))


# ----------------------------------------------------------------------------------------------
# Real-model prompts, fidelity, protocols, results files, summaries, truncated numbers

CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

needs_teacher_force = pytest.mark.skipif(
    not hasattr(Q.Engine, "teacher_force"),
    reason="Engine.teacher_force(doc, question, answer_ids) is not in dynkv_cli/engine.py yet: no fidelity score",
)


def test_chat_prompt_uses_the_template_when_the_tokenizer_has_one():
    """The qa profile's system and user text through the chat template; the answer prefix opens the
    assistant turn; without a template the same text is given plainly."""
    from dynkv_cli.profiles import load_profile
    from tiny import make_tokenizer

    qa = load_profile("qa")
    assert (Q.CHAT_SYSTEM, Q.CHAT_BEFORE, Q.CHAT_AFTER) == (
        qa.prompt.system,
        qa.prompt.before_document,
        qa.prompt.after_document,
    )
    assert Q.AGNOSTIC_PROBE == qa.probe
    tok = make_tokenizer()
    ex = make_example("niah_multikey", 300, 3, tok)
    plain = Q.prepare(tok, ex, 0, 3, 300)  # no template: the chat prompt's text, plainly
    assert not plain.chat_template and tok.decode(plain.prefix_ids).startswith(Q.CHAT_SYSTEM)
    tok.chat_template = CHAT
    prep = Q.prepare(tok, ex, 0, 3, 300)
    assert prep.style == "chat" and prep.chat_template
    prefix, suffix = tok.decode(prep.prefix_ids), tok.decode(prep.suffix_ids)
    assert prefix.startswith(f"<|system|>{Q.CHAT_SYSTEM}</s><|user|>Document:")
    assert suffix.endswith(f"Question: {ex.question}</s><|assistant|>{ex.prefix}")
    assert prep.doc_ids == tok(ex.document, add_special_tokens=False)["input_ids"]
    # a sentence around the answer scores with the chat prompt (RULER's string match), not with the plain one
    said = f"The special magic number is {ex.answer}."
    assert score(ex, said, contains=True) == 1.0 and score(ex, said) == 0.0
    assert Q.answer_budget(prep) > Q.answer_budget(Q.prepare(tok, ex, 0, 3, 300, "plain"))


class _Calls:
    """Counts Engine.compress / ask / teacher_force calls and records compress's question and probe."""

    def __init__(self, monkeypatch):
        self.compress, self.ask, self.forced = [], 0, 0
        real_compress, real_ask = Q.Engine.compress, Q.Engine.ask

        def compress(engine, document, prompt=None, **kw):
            self.compress.append((engine.settings.method, kw.get("question"), kw.get("probe")))
            return real_compress(engine, document, prompt, **kw)

        def ask(engine, *a, **kw):
            self.ask += 1
            return real_ask(engine, *a, **kw)

        monkeypatch.setattr(Q.Engine, "compress", compress)
        monkeypatch.setattr(Q.Engine, "ask", ask)
        if hasattr(Q.Engine, "teacher_force"):
            real_tf = Q.Engine.teacher_force

            def tf(engine, *a, **kw):
                self.forced += 1
                return real_tf(engine, *a, **kw)

            monkeypatch.setattr(Q.Engine, "teacher_force", tf)

    def reset(self):
        self.compress, self.ask, self.forced = [], 0, 0


@needs_teacher_force
def test_fidelity_of_full_against_itself_is_exact(lm):
    """Full KV's answer under full KV: gap 0, agreement 1; a budget that keeps everything gives the same."""
    res = Q.run_quality(
        lm,
        tasks=["niah_single"],
        lengths=[256],
        budgets=["100%", "8"],
        methods=["snapkv"],
        examples=1,
        chunk_size=128,
        max_new_tokens=6,
    )
    full = next(p for p in res.predictions if p.method == Q.FULL)
    keep = next(p for p in res.predictions if p.budget == "100%")
    tight = next(p for p in res.predictions if p.budget == "8")
    assert full.answer_ids and len(full.answer_logprobs) == len(full.answer_ids) == full.fidelity_tokens
    assert full.fidelity_gap == 0.0 and full.fidelity_agreement == 1.0
    assert keep.fidelity_gap == pytest.approx(0.0, abs=1e-3) and keep.fidelity_agreement == 1.0
    assert tight.fidelity_tokens == len(full.answer_ids) and tight.fidelity_gap is not None
    row = res.summary_table()["256"]["100%"]
    assert row["full"]["top1_agreement"] == 100.0 and row["snapkv"]["logprob_gap"] == pytest.approx(0.0, abs=1e-3)
    assert "log-prob gap" in Q.markdown_report(res)


def test_results_file_resumes_and_reuses_full_kv(lm, tmp_path, monkeypatch):
    """A second run with the same file computes nothing; a new budget reuses the stored full-KV runs."""
    calls = _Calls(monkeypatch)
    path = tmp_path / "r.jsonl"
    kw = dict(tasks=["fact_end", "niah_single"], lengths=[256], methods=["streamingllm"], examples=2, chunk_size=128)
    first = Q.run_quality(lm, budgets=["10%"], results=str(path), max_new_tokens=4, **kw)
    assert len(calls.compress) == 2 * 2 * 2 and len(path.read_text().splitlines()) == 8
    calls.reset()
    again = Q.run_quality(lm, budgets=["10%"], results=str(path), max_new_tokens=4, **kw)
    assert (calls.compress, calls.ask, calls.forced) == ([], 0, 0)
    assert all(p.reused for p in again.predictions) and again.table() == first.table()
    assert [Q.cell_key(p) for p in again.predictions] == [Q.cell_key(p) for p in first.predictions]
    calls.reset()
    more = Q.run_quality(lm, budgets=["10%", "16"], results=str(path), max_new_tokens=4, **kw)
    assert [m for m, _, _ in calls.compress] == ["streamingllm"] * 4  # only the new cells; full KV from the file
    assert len(more.predictions) == 2 * 2 * 3 and len(path.read_text().splitlines()) == 12
    # another model's or another protocol's cells are not these
    assert {Q.cell_key(p)[0] for p in more.predictions} == {lm.name}
    # the tables are built from the file, and render from it alone
    (r,) = Q.results_from_rows(Q.ResultsFile(path).predictions())
    assert r.table() == more.table() and r.budgets == ["10%", "16"] and r.methods == ["streamingllm"]
    # a torn last line (a killed run) is ignored
    with path.open("a") as f:
        f.write('{"task": "fact_end", "len')
    assert len(Q.ResultsFile(path).rows) == 12


def test_agnostic_compresses_once_per_example_with_the_generic_probe(lm, monkeypatch):
    calls = _Calls(monkeypatch)
    res = Q.run_quality(
        lm,
        tasks=["niah_multikey"],
        lengths=[256],
        budgets=["10%"],
        methods=["snapkv"],
        examples=2,
        chunk_size=128,
        protocols=["aware", "agnostic"],
        max_new_tokens=4,
    )
    comp = [c for c in calls.compress if c[0] != "full"]
    full = [c for c in calls.compress if c[0] == "full"]
    assert len(full) == 2  # once per example, for both protocols
    agnostic = [c for c in comp if c[2] == Q.AGNOSTIC_PROBE]
    aware = [c for c in comp if c[2] is None]
    assert len(agnostic) == 2 and all(q is None for _, q, _ in agnostic)  # one compression per example
    assert len(aware) == 2 and all(q for _, q, _ in aware)
    assert {p.protocol for p in res.predictions if p.method != "full"} == {"aware", "agnostic"}
    for proto in ("aware", "agnostic"):
        sub = res.for_protocol(proto)
        assert {p.method for p in sub.predictions} == {"full", "snapkv"} and len(sub.predictions) == 4
    d = res.to_dict()
    assert set(d["by_protocol"]) == {"aware", "agnostic"} and d["splits"]["reported"] == "eval"
    md = Q.markdown_report(res)
    assert "protocol aware" in md and "protocol agnostic" in md and "tune split kept for tuning" in md


def test_truncated_numbers():
    assert Q.truncated_number("The pass key is 48213.", "The pass key is 482.")
    assert Q.truncated_number("48213", "it is 8213")
    assert not Q.truncated_number("48213", "48213")
    assert not Q.truncated_number("48213", "48213 and 482")  # the whole number is there
    assert not Q.truncated_number("48213", "99999")  # another number, not a part of it
    assert not Q.truncated_number("no number", "482")
    r = Q.QualityResult("m", ["niah_single"], [512], ["1%"], ["snapkv"], 1, 0, 128, 6)
    full, cut = _fake("niah_single", "full", "full", 1.0, 512), _fake("niah_single", "snapkv", "1%", 0.0, 512)
    full.prediction, cut.prediction = "12345", "123"
    r.predictions += [full, cut]
    assert (
        r.truncations(512, "snapkv", "1%") == 1 and r.summary_table()["512"]["1%"]["snapkv"]["truncated_numbers"] == 1
    )


def test_rouge_l_and_off_topic():
    from dynkv_bench.summaries import named_entities, off_topic, rouge_l

    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(0.8333, abs=1e-4)
    assert rouge_l("", "anything") is None
    doc = "Hurricane Katrina hit New Orleans on Monday. Officials in Louisiana said the levees broke."
    assert named_entities(doc) == {"Katrina", "Orleans", "Monday", "Louisiana"}  # not Hurricane, Officials
    assert not off_topic("Katrina flooded the city.", doc)  # a sentence start counts in the summary
    assert not off_topic("The storm hit Louisiana hard.", doc)
    assert off_topic("The storm hit the city hard.", doc)  # no named entity at all
    assert off_topic("Apple released a new iPhone in California.", doc)  # entities, but not the document's


def test_summary_task_scores_rouge_and_off_topic(lm, tmp_path, monkeypatch):
    from dynkv_bench import summaries as S

    words = "Mayor Nutter met protesters of Occupy Philadelphia near City Hall and the police waited. "
    recs = [{"context": words * 60, "answers": ["Occupy Philadelphia protesters stayed at City Hall."]}] * 2
    path = tmp_path / "multi_news.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    monkeypatch.setenv("DYNKV_MULTI_NEWS", str(path))
    S.records.cache_clear()
    S._SELECTED.clear()
    try:
        res = Q.run_quality(
            lm,
            tasks=["summary"],
            lengths=[256],
            budgets=["10%"],
            methods=["snapkv"],
            examples=1,
            chunk_size=128,
            max_new_tokens=8,
            protocols=["aware", "agnostic"],
        )
    finally:
        S.records.cache_clear()
        S._SELECTED.clear()
    assert len(res.predictions) == 2  # full and snapkv: summaries are one protocol-free cell
    full, comp = res.predictions
    assert full.seed == 0 and full.doc_tokens <= 256 and full.rouge_full == 1.0
    assert comp.rouge_full is not None and comp.off_topic is not None and 0.0 <= comp.score <= 1.0
    row = res.summary_table()["256"]["10%"]["snapkv"]
    assert row["summaries"] == 1 and row["off_topic"] in (0, 1) and "rouge_l_full" in row


def test_summaries_are_kept_out_of_the_task_averages():
    r = Q.QualityResult("m", ["niah_single", "summary"], [512], ["1%"], ["snapkv"], 1, 0, 128, 6)
    r.predictions += [_fake("niah_single", "full", "full", 1.0, 512), _fake("niah_single", "snapkv", "1%", 0.5, 512)]
    r.predictions += [_fake("summary", "full", "full", 0.2, 512), _fake("summary", "snapkv", "1%", 0.1, 512)]
    row = r.summary_table()["512"]["1%"]["snapkv"]
    assert row["accuracy"] == 50.0 and row["pct_of_full"] == 50.0 and row["rouge_l_reference"] == 10.0


def test_command_protocols_results_file_and_render_from_it(model_path, tmp_path):
    import typer
    from typer.testing import CliRunner

    from dynkv_bench.cli import bench_app

    root = typer.Typer()
    root.add_typer(bench_app, name="bench")
    rows = tmp_path / "r.jsonl"
    args = ["bench", "quality", "--model", str(model_path), "--tasks", "end", "--lengths", "256"]
    args += ["--budgets", "16", "--methods", "snapkv", "--examples", "1", "--chunk-size", "128"]
    args += ["--protocol", "both", "--results", str(rows), "--markdown", str(tmp_path / "a.md")]
    res = CliRunner().invoke(root, args)
    assert res.exit_code == 0, res.output
    assert len(rows.read_text().splitlines()) == 3  # full once, snapkv per protocol
    md = (tmp_path / "a.md").read_text()
    assert "protocol aware, chat prompt" in md and "protocol agnostic, chat prompt" in md
    again = CliRunner().invoke(
        root, ["bench", "quality", "--from-results", str(rows), "--markdown", str(tmp_path / "b.md")]
    )
    assert again.exit_code == 0, again.output
    assert (tmp_path / "b.md").read_text().split("\n#### 256 tokens, budget")[0] == md.split(
        "\n#### 256 tokens, budget"
    )[0]
    bad = CliRunner().invoke(root, [*args[:-4], "--protocol", "sideways"])
    assert bad.exit_code == 2 and "unknown protocol" in bad.output


@needs_teacher_force
def test_smollm2_is_asked_through_its_chat_template(smollm2):
    """The real default model: the prompt goes through its chat template, and a budget that keeps every
    token answers as full KV does, token for token (agreement 1, no log-prob gap)."""
    lm = smollm2.lm
    tok = lm.tokenizer
    ex = make_example("niah_single", 256, 1, tok)
    prep = Q.prepare(tok, ex, 0, 1, 256)
    assert prep.chat_template
    assert "<|im_start|>system\n" + Q.CHAT_SYSTEM in tok.decode(prep.prefix_ids)
    assert tok.decode(prep.suffix_ids).endswith(f"Question: {ex.question}<|im_end|>\n<|im_start|>assistant\n")
    res = Q.run_quality(
        lm, tasks=["niah_single"], lengths=[256], budgets=["100%"], methods=["snapkv"], examples=1, max_new_tokens=6
    )
    full, keep = res.predictions
    assert full.chat_template and full.fidelity_agreement == 1.0 and full.fidelity_gap == 0.0
    assert keep.prediction == full.prediction and keep.fidelity_agreement == 1.0
    assert keep.fidelity_gap == pytest.approx(0.0, abs=1e-3)


def test_a_reload_budget_word(lm):
    """``2%+r8%``: the run reads a low level and reloads per question; the row says what came back."""
    assert Q.split_reload("2%+r8%") == ("2%", "8%") and Q.split_reload("5%") == ("5%", None)
    assert Q.split_reload("2%+r8%:1") == ("2%", "8%") and Q.reload_level("2%+r8%:1") == 1.0
    assert Q.reload_level("2%+r8%") == Q.RELOAD_LEVEL
    assert Q.resolve_budgets("2%+r8%,5%") == ["2%+r8%", "5%"]
    with pytest.raises(Exception, match="not a budget"):
        Q.resolve_budgets("2%+rlots")
    tok = lm.tokenizer
    ex = make_example("niah_single", LENGTH, 3, tok)
    prep = Q.prepare(tok, ex, 0, 0, LENGTH)
    p = Q.run_one(lm, prep, "snapkv", "5%+r20%", 128, {}, Q.generate_answer, protocol="agnostic")
    assert p.budget == "5%+r20%" and p.reload["blocks"][0] == 0 and p.reload["entries_per_head"] > 0
    plain = Q.run_one(lm, prep, "snapkv", "5%", 128, {}, Q.generate_answer, protocol="agnostic")
    assert plain.reload is None and plain.kept_per_layer == p.kept_per_layer  # the cache kept is the same
