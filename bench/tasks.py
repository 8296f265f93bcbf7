"""A seeded generator of RULER-style long-context tasks over real text.

Every example is a document (a haystack of real news text with task facts, the needles, inserted
between its sentences), a question, and the answer. The haystack is a run of consecutive sentences
from ``data/news.jsonl.gz``, a slice of LongBench's multi_news articles shipped with the package
(records 100..199; MIT licence, see ``data/NOTICE``), starting at a seeded paragraph. The needles'
keys, marked words and variable names are invented words that the real text never contains, and
their numbers never occur in it either, so every answer is decided by the needles alone.

The same ``(task, n_tokens, seed)`` always gives the same example. Evaluation examples come from
their own seed stream (:func:`suite_seed`), disjoint from the ``"train"`` stream of examples for
tuning or fitting anything on the suite.

Plain prompt format (no chat template, for toy models), see :func:`format_prompt`; real instruction
models are asked through their chat template instead, with the qa profile's system and user text
(``CHAT_SYSTEM``, ``CHAT_BEFORE``, ``CHAT_AFTER``; built in ``quality.chat_prompt``)::

    <document>\\n<question>\\nAnswer: <answer><eos>

The document is the prefix the engine streams; ``"\\n" + question + "\\nAnswer:"`` is the suffix,
followed by the start of the answer for the keyed lookups (RULER's answer prefix, :func:`suffix_text`).
The question alone is also a meaningful probe for scoring tokens while the document streams.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from typing import NamedTuple

__all__ = [
    "TASKS",
    "Example",
    "TaskSpec",
    "corpus",
    "count_tokens",
    "format_prompt",
    "make_example",
    "make_suite",
    "score",
    "suffix_text",
    "suite_seed",
    "TASK_ALIASES",
    "CHAT_SYSTEM",
    "CHAT_BEFORE",
    "CHAT_AFTER",
]


@dataclass(frozen=True)
class Example:
    task: str
    document: str
    question: str
    answer: str
    answers: list[str] = field(default_factory=list)
    depth: float = 0.0
    # the start of the answer, given in the prompt as RULER does ("Answer: The special magic number
    # for K is"), so the model continues with the value; empty for tasks asked without one
    prefix: str = ""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    category: str
    description: str
    multi: bool  # score = fraction of `answers` found; otherwise exact match of `answer`


# ----------------------------------------------------------------------------------------------
# The real text (a slice of LongBench multi_news shipped in data/, see data/NOTICE)

CORPUS_FILE = "data/news.jsonl.gz"


class Corpus(NamedTuple):
    units: list[str]  # every sentence in corpus order, after its separator: "\n\n" opens a paragraph, else " "
    starts: list[int]  # the units that open a paragraph
    words: frozenset[str]  # every word of the text, lower case
    digits: str  # every run of digits in the text, space-separated


@functools.cache
def corpus() -> Corpus:
    """The shipped news text (records 100..199 of LongBench multi_news), read once."""
    units: list[str] = []
    starts: list[int] = []
    with (resources.files(__package__) / CORPUS_FILE).open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        for line in f:
            for paragraph in json.loads(line)["paragraphs"]:
                starts.append(len(units))
                units += ["\n\n" + paragraph[0]] + [" " + s for s in paragraph[1:]]
    text = "".join(units)
    words = frozenset(w.lower() for w in re.findall(r"[^\W\d_]+", text))
    return Corpus(units, starts, words, " ".join(re.findall(r"\d+", text)))


# Invented words for needle keys, author names, marked words and variable names: made of syllables
# and kept only when the real text never uses them (in any case), so a key, a marked word or a
# variable occurs in a document exactly where a needle put it, and a count of marked words counts
# the needles only.

_SYLLABLES = (
    "ba be bi bo bu da de di do du fa fe fi fo ga ge go ka ke ki ko ku la le li lo lu ma me mi mo "
    "mu na ne ni no nu pa pe pi po ra re ri ro ru sa se si so ta te ti to tu va ve vi vo za ze zo"
).split()
_CODAS = ["", "", "n", "r", "l", "s", "m", "k", "x", "th"]


def _invented(rng: random.Random, n: int, banned: set[str]) -> list[str]:
    out: list[str] = []
    seen = set(banned)
    while len(out) < n:
        w = rng.choice(_SYLLABLES) + rng.choice(_SYLLABLES) + rng.choice(_CODAS)
        if len(w) >= 4 and w not in seen:
            seen.add(w)
            out.append(w)
    return out


class Pools(NamedTuple):
    keys: list[str]  # needle keys, author names (lower case)
    marked: list[str]  # aggregation words (lower case)
    vars: list[str]  # variable names (4 capitals)


@functools.cache
def pools() -> Pools:
    rng = random.Random(20241223)
    banned = set(corpus().words)
    keys = _invented(rng, 160, banned)
    marked = _invented(rng, 80, banned | set(keys))
    source = _invented(rng, 120, banned | set(keys) | set(marked))
    names = dict.fromkeys(w[:4].upper() for w in source)  # unique, order kept
    return Pools(keys, marked, [v for v in names if v.lower() not in banned])


# ----------------------------------------------------------------------------------------------
# Token counting


def _backend(tokenizer):
    if tokenizer is None:
        return None
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


_APPROX = re.compile(r"\d|[A-Za-z]+|[^\sA-Za-z\d]")


def count_tokens(texts: list[str], tokenizer=None) -> list[int]:
    """Token counts of `texts` without special tokens (approximate when no tokenizer is given)."""
    be = _backend(tokenizer)
    if be is None:
        return [len(_APPROX.findall(t)) for t in texts]
    encs = be.encode_batch(texts, add_special_tokens=False)
    return [len(e.ids) for e in encs]


# ----------------------------------------------------------------------------------------------
# Filler


def _filler(rng: random.Random, budget: int, tokenizer) -> tuple[list[str], list[int], bool]:
    """Consecutive corpus sentences (each after its separator) from a random paragraph on, wrapping
    round at the corpus's end, whose token counts add up to about `budget`, and whether the last one
    is cut short: it is whole when that ends within 1% of `budget`, else cut after the word that
    comes closest."""
    units = corpus().units
    at = rng.choice(corpus().starts)
    sents: list[str] = []
    counts: list[int] = []
    total = 0
    while total < budget:
        batch = [units[(at + k) % len(units)] for k in range(64)]
        at += len(batch)
        for s, c in zip(batch, count_tokens(batch, tokenizer), strict=True):
            if total + c > budget:
                cut, c = _last(s, c, budget - total, budget, tokenizer)
                if c:
                    sents.append(cut)
                    counts.append(c)
                return sents, counts, 0 < len(cut) < len(s)
            sents.append(s)
            counts.append(c)
            total += c
    return sents, counts, False


def _last(sentence: str, tokens: int, need: int, budget: int, tokenizer) -> tuple[str, int]:
    """What of `sentence` (`tokens` tokens) ends the filler, `need` tokens short of `budget`:
    nothing, all of it, or its first words."""
    options = [("", 0), (sentence, tokens)]
    best = min(options, key=lambda o: abs(o[1] - need))
    if abs(best[1] - need) <= 0.01 * budget:
        return best
    heads = [sentence[: m.start()] for m in re.finditer(" ", sentence) if sentence[: m.start()].strip()]
    options += zip(heads, count_tokens(heads, tokenizer)) if heads else []
    return min(options, key=lambda o: abs(o[1] - need))


# ----------------------------------------------------------------------------------------------
# Tasks: each builder returns (needles as (depth, sentence) in document order, question, answer, answers)

_Needles = list[tuple[float, str]]


def _number(rng: random.Random, digits: int, used: set[str]) -> str:
    """A new number of `digits` digits that the real text never contains (not even inside a longer one)."""
    while True:
        v = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
        if v not in used and v not in corpus().digits:
            used.add(v)
            return v


def _depths(rng: random.Random, k: int, lo: float = 0.0, hi: float = 1.0) -> list[float]:
    return sorted(rng.uniform(lo, hi) for _ in range(k))


def _ask1(key: str) -> str:
    return f"What is the special magic number for {key}?"


def _cue1(key: str) -> str:
    return f"The special magic number for {key} is"


def _magic(key: str, value: str) -> str:
    return f" {_cue1(key)} {value}."


def _ask_all(key: str) -> str:
    return f"What are all the special magic numbers for {key}?"


def _cue_all(key: str) -> str:
    return f"The special magic numbers for {key} are"


def _t_passkey(rng: random.Random, n: int):
    v = _number(rng, 5, set())
    needle = f" The pass key is {v}. Remember it. {v} is the pass key."
    # asked without an answer prefix (the README's `dynkv qa` question)
    return [(rng.uniform(0.0, 1.0), needle)], "What is the pass key?", v, [v]


def _t_multikey(rng: random.Random, n: int):
    k = rng.randint(4, 8)
    keys = rng.sample(pools().keys, k)
    used: set[str] = set()
    vals = [_number(rng, 6, used) for _ in keys]
    depths = [rng.uniform(0.0, 1.0) for _ in keys]
    needles = sorted((d, _magic(key, v)) for d, key, v in zip(depths, keys, vals, strict=True))
    i = rng.randrange(k)
    return needles, _ask1(keys[i]), vals[i], [vals[i]], depths[i], _cue1(keys[i])


def _t_multivalue(rng: random.Random, n: int):
    keys = rng.sample(pools().keys, 3)
    used: set[str] = set()
    target = keys[0]
    vals = [_number(rng, 6, used) for _ in range(4)]
    depths = _depths(rng, 4)
    needles = [
        (d, f" One of the special magic numbers for {target} is {v}.") for d, v in zip(depths, vals, strict=True)
    ]
    for key in keys[1:]:  # the distractors: one number each
        d = rng.uniform(0, 1)
        v = _number(rng, 6, used)
        needles.append((d, f" One of the special magic numbers for {key} is {v}."))
    needles.sort()
    return needles, _ask_all(target), ", ".join(vals), vals, depths[0], _cue_all(target)


def _t_multiquery(rng: random.Random, n: int):
    k = 5
    keys = rng.sample(pools().keys, k)
    used: set[str] = set()
    vals = [_number(rng, 6, used) for _ in keys]
    depths = [rng.uniform(0.0, 1.0) for _ in keys]
    needles = sorted((d, _magic(key, v)) for d, key, v in zip(depths, keys, vals, strict=True))
    asked = rng.sample(range(k), 3)
    q = f"What are the special magic numbers for {keys[asked[0]]}, {keys[asked[1]]} and {keys[asked[2]]}?"
    ans = [vals[i] for i in asked]
    k0, k1, k2 = (keys[i] for i in asked)
    answer = f"{ans[0]}, {k1} is {ans[1]} and {k2} is {ans[2]}"
    return needles, q, answer, ans, min(depths[i] for i in asked), f"{k0} is"


def _assign(var: str, source: str) -> str:
    """A variable tracking line: `source` is a value or another variable's name."""
    return f" VAR {var} = {source}."


def _assignments(chain: list[str], value: str) -> list[str]:
    """The lines of one variable chain, in order: its first variable gets `value`, each next one the
    variable before it."""
    return [_assign(chain[0], value)] + [_assign(cur, f"VAR {prev}") for prev, cur in zip(chain, chain[1:])]


def _ask_vars(value: str) -> str:
    """The variable tracking question."""
    return f"Which variables are assigned the value {value}?"


def _t_vartrack(rng: random.Random, n: int):
    names = rng.sample(pools().vars, 8)
    used: set[str] = set()
    chains = [names[:4], names[4:8]]
    values = [_number(rng, 5, used) for _ in chains]
    needles: _Needles = []
    for chain, val in zip(chains, values, strict=True):
        needles += zip(_depths(rng, len(chain), 0.0, 0.95), _assignments(chain, val), strict=True)
    first = needles[0][0]  # where the asked chain (the first) starts
    needles.sort()
    target = chains[0]
    return needles, _ask_vars(values[0]), " ".join(target), list(target), first


def _t_aggregate(rng: random.Random, n: int):
    words = rng.sample(pools().marked, 10)
    c = max(4, min(9, n // 500))
    counts = [c + 3, c + 1, c - 1] + [rng.randint(1, 2) for _ in range(7)]
    occ = [w for w, k in zip(words, counts, strict=True) for _ in range(k)]
    needles = sorted((rng.uniform(0, 1), f" The marked word is {w}.") for w in occ)
    q = "What are the three most frequent marked words?"
    top = words[:3]
    return needles, q, " ".join(top), top, 0.0


def _t_start(rng: random.Random, n: int):
    a, b = rng.sample(pools().keys, 2)
    needle = f" The author of this report is {a} {b}."
    return [(rng.uniform(0.0, 0.04), needle)], "Who is the author of this report?", f"{a} {b}", [f"{a} {b}"]


def _t_end(rng: random.Random, n: int):
    v = _number(rng, 6, set())
    needle = f" The final code is {v}."
    return [(rng.uniform(0.95, 1.0), needle)], "What is the final code?", v, [v]


_BUILDERS: dict[str, Callable] = {
    "niah_single": _t_passkey,
    "niah_multikey": _t_multikey,
    "niah_multivalue": _t_multivalue,
    "niah_multiquery": _t_multiquery,
    "vt": _t_vartrack,
    "aggregation": _t_aggregate,
    "fact_start": _t_start,
    "fact_end": _t_end,
}

TASKS: dict[str, TaskSpec] = {
    "niah_single": TaskSpec("niah_single", "retrieval", "one pass key in the haystack", False),
    "niah_multikey": TaskSpec("niah_multikey", "retrieval", "4-8 keyed magic numbers, one key asked", False),
    "niah_multivalue": TaskSpec(
        "niah_multivalue", "retrieval", "all 4 magic numbers of one key (2 other keys distract)", True
    ),
    "niah_multiquery": TaskSpec("niah_multiquery", "retrieval", "5 keyed magic numbers, 3 keys asked", True),
    "vt": TaskSpec("vt", "multi-hop", "variable tracking: a 4-variable chain from a value (plus a decoy chain)", True),
    "aggregation": TaskSpec(
        "aggregation", "aggregation", "the three most frequent marked words (7 rare ones distract)", True
    ),
    "fact_start": TaskSpec("fact_start", "position", "the author, stated near the start", False),
    "fact_end": TaskSpec("fact_end", "position", "the final code, stated near the end", False),
}


#: Short names for the tasks (``--tasks passkey,vartrack``), each the task it names.
TASK_ALIASES: dict[str, str] = {
    "passkey": "niah_single",
    "multikey": "niah_multikey",
    "multivalue": "niah_multivalue",
    "multiquery": "niah_multiquery",
    "vartrack": "vt",
    "aggregate": "aggregation",
    "start": "fact_start",
    "end": "fact_end",
}

# The chat prompt of real instruction models: the qa profile's (profiles/qa.yaml), the document in the
# user turn and the question after it; the task's answer prefix (RULER's) opens the assistant turn.
CHAT_SYSTEM = "You answer questions about a document using only the document."
CHAT_BEFORE = "Document:\n"
CHAT_AFTER = "\n\nAnswer the question briefly, using the document above.\nQuestion: {question}"


# ----------------------------------------------------------------------------------------------
# Examples


def suffix_text(question: str, prefix: str = "") -> str:
    """What follows the document: ``"\n" + question + "\nAnswer:"``, then ``" " + prefix`` when the
    task gives the start of the answer."""
    return "\n" + question + "\nAnswer:" + (" " + prefix if prefix else "")


def format_prompt(example: Example) -> tuple[str, str]:
    """(document_text, suffix_text); the model continues the suffix with ``" " + answer`` and EOS."""
    return example.document, suffix_text(example.question, example.prefix)


class _Built(NamedTuple):
    """What a task builder returns (builders give the leading fields, positionally)."""

    needles: list  # (depth, sentence), in document order
    question: str
    answer: str
    answers: list
    depth: float | None = None  # None: the first needle's depth
    prefix: str = ""


def make_example(task: str, n_tokens: int, seed: int, tokenizer=None) -> Example:
    """One example of about `n_tokens` model tokens (document + suffix, ±5%), fixed by `seed`."""
    if task not in _BUILDERS:
        raise KeyError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    rng = random.Random(f"{task}:{n_tokens}:{seed}")
    needles, question, answer, answers, depth, prefix = _Built(*_BUILDERS[task](rng, n_tokens))
    depth = needles[0][0] if depth is None else depth
    suffix = suffix_text(question, prefix)
    fixed = sum(count_tokens([s for _, s in needles] + [suffix], tokenizer)) + 1  # +1: BOS
    sents, counts, cut = _filler(rng, max(0, n_tokens - fixed), tokenizer)
    total = sum(counts)
    # insert each needle before the filler sentence at its depth (by tokens)
    cum = [0]
    for c in counts:
        cum.append(cum[-1] + c)
    slots: dict[int, list[str]] = {}
    for d, s in needles:
        # never right after a cut sentence: a needle at the very end goes before it
        slots.setdefault(min(_bisect(cum, d * total), len(sents) - cut), []).append(s)
    parts: list[str] = []
    for i in range(len(sents) + 1):
        parts.extend(slots.get(i, []))
        if i < len(sents):
            parts.append(sents[i])
    document = "".join(parts).strip()
    return Example(task, document, question, answer, list(answers), round(float(depth), 4), prefix)


def _bisect(cum: list[int], target: float) -> int:
    import bisect

    i = bisect.bisect_left(cum, target)
    if i > 0 and (i == len(cum) or target - cum[i - 1] <= cum[i] - target):
        return i - 1
    return min(i, len(cum) - 1)


def suite_seed(split: str, seed: int, task: str, n_tokens: int, index: int) -> int:
    """Example seed for a split ("eval", or "train" for examples to tune or fit on). Eval seeds have
    bit 62 set, train seeds never: the two streams cannot collide."""
    split = "train" if split == "tune" else split  # the tuning split goes by both names
    if split not in ("eval", "train"):
        raise ValueError(f"split must be 'eval' or 'train' ('tune'), not {split!r}")
    h = hashlib.sha256(f"{split}|{seed}|{task}|{n_tokens}|{index}".encode()).digest()
    x = int.from_bytes(h[:8], "big") & ((1 << 62) - 1)
    return x | (1 << 62) if split == "eval" else x


def make_suite(
    tasks: Iterable[str] | None,
    n_tokens: int,
    n_examples: int,
    seed: int = 0,
    split: str = "eval",
    tokenizer=None,
) -> list[Example]:
    """`n_examples` examples per task at `n_tokens`, task by task, from the split's seed stream."""
    names = list(TASKS) if tasks is None else list(tasks)
    return [
        make_example(t, n_tokens, suite_seed(split, seed, t, n_tokens, i), tokenizer)
        for t in names
        for i in range(n_examples)
    ]


# ----------------------------------------------------------------------------------------------
# Scoring

_WORD = re.compile(r"[A-Za-z]+|\d+")


def _norm(s: str) -> str:
    return " ".join(_WORD.findall(s))


def score(example: Example, prediction: str, contains: bool = False) -> float:
    """Exact match (normalised spacing/punctuation) for single answers; for multi-answer tasks the
    fraction of required items found as whole words in the prediction. Both read the first line.

    ``contains`` (chat prompts: an instruction model answers in a sentence, "The pass key is 12345."):
    the whole prediction is read and a single answer counts when it occurs in it as whole words
    (RULER's string match)."""
    pred = prediction if contains else prediction.split("\n")[0]
    if not TASKS[example.task].multi:
        if contains:
            return float(_contains(_norm(pred).split(), _norm(example.answer).split()))
        return float(_norm(pred) == _norm(example.answer))
    words = _norm(pred).split()
    found = sum(1 for a in example.answers if _contains(words, a.split()))
    return found / max(1, len(example.answers))


def _contains(words: list[str], item: list[str]) -> bool:
    k = len(item)
    return any(words[i : i + k] == item for i in range(len(words) - k + 1))
