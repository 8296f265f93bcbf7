"""Fast checks of the task generator (no model)."""

from __future__ import annotations

import gzip
import json
import re
from importlib import resources

import pytest
from tiny import make_tokenizer

from dynkv_bench import tasks as T
from dynkv_bench.tasks import TASKS, Example, count_tokens, format_prompt, make_example, make_suite, score

#: every needle sentence the tasks insert (with its leading space)
NEEDLE = re.compile(
    r" ?(?:The pass key is \d+\. Remember it\. \d+ is the pass key\."
    r"|(?:One of the special magic numbers|The special magic number) for [a-z]+ is \d+\."
    r"|VAR [A-Z]+ = (?:VAR [A-Z]+|\d+)\."
    r"|The marked word is [a-z]+\."
    r"|The author of this report is [a-z]+ [a-z]+\."
    r"|The final code is \d+\.)"
)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _prompt_tokens(ex: Example, tok) -> int:
    doc, suffix = format_prompt(ex)
    return len(tok.backend_tokenizer.encode(doc).ids) + count_tokens([suffix], tok)[0]


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_generates_at_512(task, tokenizer):
    ex = make_example(task, 512, 7, tokenizer)
    assert ex.task == task and ex.document and ex.question and ex.answer and ex.answers
    assert 0.0 <= ex.depth <= 1.0
    assert abs(_prompt_tokens(ex, tokenizer) - 512) <= 0.05 * 512
    assert score(ex, ex.answer) == 1.0


@pytest.mark.parametrize("n", [1024, 4096])
def test_lengths_within_tolerance(n, tokenizer):
    for ex in make_suite(None, n, 1, seed=3, split="eval", tokenizer=tokenizer):
        assert abs(_prompt_tokens(ex, tokenizer) - n) <= 0.05 * n, ex.task


def test_deterministic_by_seed(tokenizer):
    for task in TASKS:
        a = make_example(task, 600, 11, tokenizer)
        b = make_example(task, 600, 11, tokenizer)
        c = make_example(task, 600, 12, tokenizer)
        assert a == b
        assert a != c
    assert make_suite(None, 300, 2, seed=5) == make_suite(None, 300, 2, seed=5)


def test_eval_and_train_are_disjoint():
    ev = {T.suite_seed("eval", s, t, n, i) for s in range(3) for t in TASKS for n in (512, 4096) for i in range(50)}
    tr = {T.suite_seed("train", s, t, n, i) for s in range(3) for t in TASKS for n in (512, 4096) for i in range(50)}
    assert not ev & tr
    assert all(x >> 62 == 1 for x in ev) and all(x >> 62 == 0 for x in tr)
    e = make_suite(["niah_single"], 256, 20, seed=0, split="eval")
    r = make_suite(["niah_single"], 256, 20, seed=0, split="train")
    assert not {x.document for x in e} & {x.document for x in r}


def test_answers_are_in_the_document():
    for seed in range(5):
        for task in TASKS:
            ex = make_example(task, 800, seed)
            doc = ex.document
            if task == "niah_single":
                assert f"The pass key is {ex.answer}." in doc
            elif task == "niah_multikey":
                key = ex.question.split(" for ")[1].rstrip("?")
                assert f"The special magic number for {key} is {ex.answer}." in doc
            elif task == "niah_multivalue":
                key = ex.question.split(" for ")[1].rstrip("?")
                found = re.findall(rf"One of the special magic numbers for {key} is (\d+)\.", doc)
                assert found == ex.answers
            elif task == "niah_multiquery":
                keys = re.findall(r"[a-z]+", ex.question.split(" for ")[1].replace(" and ", " "))
                vals = [re.search(rf"magic number for {k} is (\d+)\.", doc).group(1) for k in keys]
                assert vals == ex.answers
            elif task == "vt":
                value = re.search(r"value (\d+)", ex.question).group(1)
                # follow the chain in the document
                names = re.findall(rf"VAR (\w+) = {value}\.", doc)
                while True:
                    nxt = re.findall(rf"VAR (\w+) = VAR {names[-1]}\.", doc)
                    if not nxt:
                        break
                    names += nxt
                assert names == ex.answers
            elif task == "aggregation":
                counts: dict[str, int] = {}
                for w in re.findall(r"The marked word is (\w+)\.", doc):
                    counts[w] = counts.get(w, 0) + 1
                top = sorted(counts, key=lambda w: -counts[w])[:3]
                assert top == ex.answers
                assert len({counts[w] for w in top}) == 3 and counts[top[2]] > max(
                    c for w, c in counts.items() if w not in top
                )
            elif task == "fact_start":
                assert f"The author of this report is {ex.answer}." in doc
            elif task == "fact_end":
                assert f"The final code is {ex.answer}." in doc
            # the needle is where depth says
            if task == "fact_start":
                assert ex.depth < 0.05 and doc.index(ex.answer) < 0.1 * len(doc)
            if task == "fact_end":
                assert ex.depth > 0.9 and doc.index(ex.answer) > 0.85 * len(doc)


def test_scoring_exact_partial_wrong():
    single = make_example("niah_single", 300, 1)
    assert score(single, single.answer) == 1.0
    assert score(single, " " + single.answer + ".") == 1.0
    assert score(single, "12") == 0.0
    assert score(single, single.answer + " 1") == 0.0
    multi = make_example("niah_multivalue", 300, 1)
    assert len(multi.answers) == 4
    assert score(multi, ", ".join(multi.answers)) == 1.0
    assert score(multi, ", ".join(multi.answers[:2]) + ", 1, 2") == 0.5
    assert score(multi, "nothing") == 0.0
    vt = make_example("vt", 300, 1)
    assert score(vt, " ".join(vt.answers[:3])) == pytest.approx(0.75)
    agg = make_example("aggregation", 300, 1)
    assert score(agg, " ".join(reversed(agg.answers))) == 1.0


def test_prompt_format():
    ex = make_example("fact_end", 300, 2)
    doc, suffix = format_prompt(ex)
    assert doc == ex.document
    assert suffix == "\n" + ex.question + "\nAnswer:"
    assert not re.search(r"\d", suffix.replace(ex.question, "")) and ex.answer not in ex.question
    # RULER-style answer prefixes: the keyed lookups give the start of the answer in the prompt
    mk = make_example("niah_multikey", 400, 2)
    key = mk.question.split(" for ")[1].rstrip("?")
    assert format_prompt(mk)[1] == f"\n{mk.question}\nAnswer: The special magic number for {key} is"
    mq = make_example("niah_multiquery", 400, 2)
    keys = re.findall(r"[a-z]+", mq.question.split(" for ")[1].replace(" and ", " "))
    assert format_prompt(mq)[1].endswith(f"Answer: {keys[0]} is")
    assert mq.answer == f"{mq.answers[0]}, {keys[1]} is {mq.answers[1]} and {keys[2]} is {mq.answers[2]}"
    for task in TASKS:
        ex = make_example(task, 400, 5)
        assert ex.answer not in format_prompt(ex)[1]


def _shipped_text() -> str:
    """The shipped corpus file read directly (not through tasks.py): sentences joined as the
    generator joins them, a blank line between paragraphs."""
    out = []
    with (resources.files("dynkv_bench") / "data" / "news.jsonl.gz").open("rb") as raw:
        for line in gzip.open(raw, "rt", encoding="utf-8"):
            out += ["\n\n" + " ".join(p) for p in json.loads(line)["paragraphs"]]
    return "".join(out)


def test_the_haystack_is_real_text_from_the_shipped_corpus(tokenizer):
    """Without its needles a document is one run of consecutive sentences of the shipped news text,
    different seeds start at different places, and a long document is mostly that text."""
    text = _shipped_text()
    assert len(text) > 500_000 and (resources.files("dynkv_bench") / "data" / "NOTICE").is_file()
    ring = text + text[:200_000]  # the filler wraps round at the corpus's end
    starts = set()
    for seed in range(3):
        for task in TASKS:
            ex = make_example(task, 1500, seed, tokenizer if seed == 0 else None)
            real = NEEDLE.sub("", ex.document).strip()
            assert len(real) > 0.6 * len(ex.document) and real.count("\n\n") >= 1
            assert real in ring, (task, seed)
            starts.add(real[:80])
    assert len(starts) == 3 * len(TASKS)


def test_needle_words_and_numbers_never_occur_in_the_real_text():
    """Keys, marked words, variable names and needle numbers are absent from the corpus, so each
    answer item is in a document only where a needle put it, and the aggregation count is unique."""
    words = T.corpus().words
    pools = T.pools()
    for pool in (pools.keys, pools.marked, pools.vars):
        assert len(pool) >= 80 and not {w.lower() for w in pool} & words
    assert not set(pools.keys) & set(pools.marked)
    for seed in range(4):
        for task in TASKS:
            ex = make_example(task, 2000, seed)
            real = NEEDLE.sub("", ex.document)
            for item in ex.answers:
                for part in item.split():
                    assert part not in real, (task, seed, part)
            if task == "aggregation":
                needles = re.findall(r"The marked word is (\w+)\.", ex.document)
                for w in set(needles):
                    assert len(re.findall(rf"\b{w}\b", ex.document)) == needles.count(w)


def test_short_task_names_and_the_tune_split():
    from dynkv_bench.quality import resolve_tasks

    assert set(T.TASK_ALIASES.values()) == set(TASKS)
    assert resolve_tasks("passkey,vartrack,end,summary") == ["niah_single", "vt", "fact_end", "summary"]
    assert resolve_tasks("all,summary") == [*TASKS, "summary"] and resolve_tasks(None) == list(TASKS)
    assert T.suite_seed("tune", 0, "vt", 512, 3) == T.suite_seed("train", 0, "vt", 512, 3)
    assert T.suite_seed("tune", 0, "vt", 512, 3) != T.suite_seed("eval", 0, "vt", 512, 3)
    with pytest.raises(ValueError):
        T.suite_seed("test", 0, "vt", 512, 3)


def test_chat_answers_score_by_string_match():
    """With a chat prompt an instruction model answers in a sentence: the answer must occur in it as whole words."""
    ex = make_example("niah_single", 300, 1)
    assert score(ex, f"The pass key is {ex.answer}.", contains=True) == 1.0
    assert score(ex, f"Sure.\nThe pass key is {ex.answer}.", contains=True) == 1.0  # any line
    assert score(ex, f"The pass key is {ex.answer}1.", contains=True) == 0.0  # not a whole number
    assert score(ex, f"The pass key is {ex.answer}.") == 0.0  # plain prompts: exact match
    vt = make_example("vt", 300, 1)
    assert score(vt, "Variables: " + ", ".join(vt.answers[:2]), contains=True) == pytest.approx(0.5)
