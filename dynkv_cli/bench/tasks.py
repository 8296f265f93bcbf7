"""A seeded generator of RULER-style long-context tasks over generated filler text.

Every example is a document (a haystack of filler sentences, made here by a small grammar over
word lists written for this file, with task facts inserted), a question, and the answer.
The same ``(task, n_tokens, seed)`` always gives the same example. Evaluation and training
examples come from disjoint seed streams (:func:`suite_seed`).

Prompt format (plain text, no chat template), see :func:`format_prompt`::

    <document>\\n<question>\\nAnswer: <answer><eos>

The document is the prefix the engine streams; ``"\\n" + question + "\\nAnswer:"`` is the suffix,
followed by the start of the answer for the keyed lookups (RULER's answer prefix, :func:`suffix_text`).
The question alone is also a meaningful probe for scoring tokens while the document streams.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = [
    "TASKS",
    "Example",
    "TaskSpec",
    "count_tokens",
    "format_prompt",
    "make_example",
    "make_suite",
    "score",
    "suffix_text",
    "suite_seed",
    "vocabulary_text",
]


@dataclass(frozen=True)
class Example:
    task: str
    document: str
    question: str
    answer: str
    answers: list[str] = field(default_factory=list)
    depth: float = 0.0
    # more (question, answer) pairs about the same document, for training only: several answers per
    # document give the model more to learn from per token it reads (evaluation asks `question` only)
    extra: tuple[tuple[str, str, str], ...] = ()  # (question, answer prefix, answer)
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
# Word lists (written for this file) and invented names

_NOUNS = (
    "river garden window teacher market village forest engine letter mountain harbor farmer "
    "bridge painter kitchen island valley library station doctor meadow tower lantern basket "
    "wagon castle sailor singer temple orchard pencil blanket ladder mirror candle hammer "
    "carpet bottle jacket wheel cloud stone field road house child friend city house boat "
    "table chair story song voice morning evening winter summer garden student worker hill "
    "shadow circle signal picture engine machine student question answer journey market"
).split()
_VERBS = (
    "watched followed carried painted visited opened cleaned repaired moved found built "
    "crossed noticed described counted measured gathered pulled pushed lifted covered "
    "explored remembered ignored greeted helped reached joined left passed planted"
).split()
_INTRANS = (
    "waited slept laughed worked rested travelled listened walked smiled wandered "
    "arrived stayed paused returned sang danced"
).split()
_ADJS = (
    "quiet bright old small large green gentle narrow wide warm cold heavy light early "
    "late busy calm tall short simple careful clever distant empty famous golden honest "
    "humble little lonely modern patient proud rapid silver soft steady strange young"
).split()
_ADVS = "slowly quickly quietly often rarely carefully happily suddenly gently always soon again".split()
_PREPS = "near behind beside under over across along past toward inside around below".split()
_DETS = "the a every one another that this".split()
_TIMES = (
    "In the morning, | Later that day, | After a while, | Every spring, | Long ago, | "
    "At noon, | By evening, | Once again, | Meanwhile, | Before dawn,"
).split(" | ")

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


_POOL_RNG = random.Random(20241223)
_COMMON = set(_NOUNS + _VERBS + _INTRANS + _ADJS + _ADVS + _PREPS + _DETS)
KEYS = _invented(_POOL_RNG, 160, _COMMON)  # needle keys, author names
MARKED = _invented(_POOL_RNG, 80, _COMMON | set(KEYS))  # aggregation words
_VARSRC = _invented(_POOL_RNG, 120, _COMMON | set(KEYS) | set(MARKED))
VARS = [w[:4].upper() for w in _VARSRC]
VARS = list(dict.fromkeys(VARS))  # unique, order kept


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


def _sentence(rng: random.Random) -> str:
    r = rng.random()
    n1, n2 = rng.choice(_NOUNS), rng.choice(_NOUNS)
    a1 = rng.choice(_ADJS)
    d1 = rng.choice(_DETS).capitalize()
    if r < 0.3:
        s = f"{d1} {a1} {n1} {rng.choice(_VERBS)} the {n2} {rng.choice(_PREPS)} the {rng.choice(_NOUNS)}."
    elif r < 0.5:
        s = f"{d1} {n1} {rng.choice(_INTRANS)} {rng.choice(_ADVS)} {rng.choice(_PREPS)} the {n2}."
    elif r < 0.7:
        s = f"{rng.choice(_TIMES)} the {a1} {n1} {rng.choice(_VERBS)} a {rng.choice(_ADJS)} {n2}."
    elif r < 0.85:
        s = f"{d1} {n1} was {a1} and the {n2} was {rng.choice(_ADJS)}."
    else:
        s = f"{d1} {n1} {rng.choice(_VERBS)} the {n2} and {rng.choice(_INTRANS)} {rng.choice(_ADVS)}."
    return s


def _filler(rng: random.Random, budget: int, tokenizer) -> tuple[list[str], list[int]]:
    """Filler sentences (each with a leading space) whose token counts add up to about `budget`."""
    sents: list[str] = []
    counts: list[int] = []
    total = 0
    while total < budget:
        batch = [" " + _sentence(rng) for _ in range(64)]
        for s, c in zip(batch, count_tokens(batch, tokenizer), strict=True):
            if total >= budget:
                break
            sents.append(s)
            counts.append(c)
            total += c
    return sents, counts


# ----------------------------------------------------------------------------------------------
# Tasks: each builder returns (needles as (depth, sentence) in document order, question, answer, answers)

_Needles = list[tuple[float, str]]


def _number(rng: random.Random, digits: int, used: set[str]) -> str:
    while True:
        v = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
        if v not in used:
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
    # asked without an answer prefix (the README's `dynkv qa` question); trained with one as well
    return (
        [(rng.uniform(0.0, 1.0), needle)],
        "What is the pass key?",
        v,
        [v],
        None,
        [("What is the pass key?", "The pass key is", v)],
    )


def _t_multikey(rng: random.Random, n: int):
    k = rng.randint(4, 8)
    keys = rng.sample(KEYS, k)
    used: set[str] = set()
    vals = [_number(rng, 6, used) for _ in keys]
    depths = [rng.uniform(0.0, 1.0) for _ in keys]
    needles = sorted((d, _magic(key, v)) for d, key, v in zip(depths, keys, vals, strict=True))
    i = rng.randrange(k)
    extra = [(_ask1(key), _cue1(key), v) for key, v in zip(keys, vals) if key != keys[i]]
    return needles, _ask1(keys[i]), vals[i], [vals[i]], depths[i], extra, _cue1(keys[i])


def _t_multivalue(rng: random.Random, n: int):
    keys = rng.sample(KEYS, 3)
    used: set[str] = set()
    target = keys[0]
    vals = [_number(rng, 6, used) for _ in range(4)]
    depths = _depths(rng, 4)
    needles = [
        (d, f" One of the special magic numbers for {target} is {v}.") for d, v in zip(depths, vals, strict=True)
    ]
    extra = []
    for key in keys[1:]:
        d = rng.uniform(0, 1)
        v = _number(rng, 6, used)
        needles.append((d, f" One of the special magic numbers for {key} is {v}."))
        extra.append((_ask_all(key), _cue_all(key), v))
    needles.sort()
    return needles, _ask_all(target), ", ".join(vals), vals, depths[0], extra, _cue_all(target)


def _t_multiquery(rng: random.Random, n: int):
    k = 5
    keys = rng.sample(KEYS, k)
    used: set[str] = set()
    vals = [_number(rng, 6, used) for _ in keys]
    depths = [rng.uniform(0.0, 1.0) for _ in keys]
    needles = sorted((d, _magic(key, v)) for d, key, v in zip(depths, keys, vals, strict=True))
    asked = rng.sample(range(k), 3)
    q = f"What are the special magic numbers for {keys[asked[0]]}, {keys[asked[1]]} and {keys[asked[2]]}?"
    ans = [vals[i] for i in asked]
    k0, k1, k2 = (keys[i] for i in asked)
    answer = f"{ans[0]}, {k1} is {ans[1]} and {k2} is {ans[2]}"
    extra = [(_ask1(key), _cue1(key), v) for key, v in zip(keys, vals)]
    return needles, q, answer, ans, min(depths[i] for i in asked), extra, f"{k0} is"


def _assign(var: str, source: str) -> str:
    """A variable tracking line: `source` is a value or another variable's name."""
    return f" VAR {var} = {source}."


def assignments(chain: list[str], value: str) -> list[str]:
    """The lines of one variable chain, in order: its first variable gets `value`, each next one the
    variable before it."""
    return [_assign(chain[0], value)] + [_assign(cur, f"VAR {prev}") for prev, cur in zip(chain, chain[1:])]


def ask_vars(value: str) -> str:
    """The variable tracking question."""
    return f"Which variables are assigned the value {value}?"


def _t_vartrack(rng: random.Random, n: int):
    names = rng.sample(VARS, 8)
    used: set[str] = set()
    chains = [names[:4], names[4:8]]
    values = [_number(rng, 5, used) for _ in chains]
    needles: _Needles = []
    for chain, val in zip(chains, values, strict=True):
        needles += zip(_depths(rng, len(chain), 0.0, 0.95), assignments(chain, val), strict=True)
    first = needles[0][0]  # where the asked chain (the first) starts
    needles.sort()
    target = chains[0]
    extra = [(ask_vars(values[1]), "", " ".join(chains[1]))]
    return needles, ask_vars(values[0]), " ".join(target), list(target), first, extra


def _t_aggregate(rng: random.Random, n: int):
    words = rng.sample(MARKED, 10)
    c = max(4, min(9, n // 500))
    counts = [c + 3, c + 1, c - 1] + [rng.randint(1, 2) for _ in range(7)]
    occ = [w for w, k in zip(words, counts, strict=True) for _ in range(k)]
    needles = sorted((rng.uniform(0, 1), f" The marked word is {w}.") for w in occ)
    q = "What are the three most frequent marked words?"
    top = words[:3]
    return needles, q, " ".join(top), top, 0.0, [("What is the most frequent marked word?", "", top[0])]


def _t_start(rng: random.Random, n: int):
    a, b = rng.sample(KEYS, 2)
    needle = f" The author of this report is {a} {b}."
    q = "Who is the author of this report?"
    return (
        [(rng.uniform(0.0, 0.04), needle)],
        q,
        f"{a} {b}",
        [f"{a} {b}"],
        None,
        [(q, "The author of this report is", f"{a} {b}")],
    )


def _t_end(rng: random.Random, n: int):
    v = _number(rng, 6, set())
    needle = f" The final code is {v}."
    q = "What is the final code?"
    return [(rng.uniform(0.95, 1.0), needle)], q, v, [v], None, [(q, "The final code is", v)]


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


# ----------------------------------------------------------------------------------------------
# Examples


def suffix_text(question: str, prefix: str = "") -> str:
    """What follows the document: ``"\n" + question + "\nAnswer:"``, then ``" " + prefix`` when the
    task gives the start of the answer. Also how train.py asks an example's extra questions."""
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
    extra: tuple = ()  # training-only (question, prefix, answer)
    prefix: str = ""


def make_example(task: str, n_tokens: int, seed: int, tokenizer=None) -> Example:
    """One example of about `n_tokens` model tokens (document + suffix, ±5%), fixed by `seed`."""
    if task not in _BUILDERS:
        raise KeyError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    rng = random.Random(f"{task}:{n_tokens}:{seed}")
    needles, question, answer, answers, depth, extra, prefix = _Built(*_BUILDERS[task](rng, n_tokens))
    depth = needles[0][0] if depth is None else depth
    extra = tuple(tuple(qa) for qa in extra)
    suffix = suffix_text(question, prefix)
    fixed = sum(count_tokens([s for _, s in needles] + [suffix], tokenizer)) + 1  # +1: BOS
    sents, counts = _filler(rng, max(0, n_tokens - fixed), tokenizer)
    total = sum(counts)
    # insert each needle before the filler sentence at its depth (by tokens)
    cum = [0]
    for c in counts:
        cum.append(cum[-1] + c)
    slots: dict[int, list[str]] = {}
    for d, s in needles:
        slots.setdefault(_bisect(cum, d * total), []).append(s)
    parts: list[str] = []
    for i in range(len(sents) + 1):
        parts.extend(slots.get(i, []))
        if i < len(sents):
            parts.append(sents[i])
    document = "".join(parts).lstrip(" ")
    return Example(task, document, question, answer, list(answers), round(float(depth), 4), extra, prefix)


def _bisect(cum: list[int], target: float) -> int:
    import bisect

    i = bisect.bisect_left(cum, target)
    if i > 0 and (i == len(cum) or target - cum[i - 1] <= cum[i] - target):
        return i - 1
    return min(i, len(cum) - 1)


def suite_seed(split: str, seed: int, task: str, n_tokens: int, index: int) -> int:
    """Example seed for a split. Eval seeds have bit 62 set, train seeds never: they cannot collide."""
    if split not in ("eval", "train"):
        raise ValueError(f"split must be 'eval' or 'train', not {split!r}")
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


def score(example: Example, prediction: str) -> float:
    """Exact match (normalised spacing/punctuation) for single answers; for multi-answer tasks the
    fraction of required items found as whole words in the prediction."""
    pred = prediction.split("\n")[0]
    if not TASKS[example.task].multi:
        return float(_norm(pred) == _norm(example.answer))
    words = _norm(pred).split()
    found = sum(1 for a in example.answers if _contains(words, a.split()))
    return found / max(1, len(example.answers))


def _contains(words: list[str], item: list[str]) -> bool:
    k = len(item)
    return any(words[i : i + k] == item for i in range(len(words) - k + 1))


def vocabulary_text(seed: int = 0, n: int = 200) -> Iterable[str]:
    """Text covering the suite's vocabulary, for training a tokenizer (no tokenizer needed)."""
    names = list(TASKS)
    for i in range(n):
        ex = make_example(names[i % len(names)], 600, seed * 100003 + i, None)
        doc, suf = format_prompt(ex)
        yield doc + suf + " " + ex.answer
    pools = [KEYS, MARKED, VARS, _NOUNS, _VERBS, _INTRANS, _ADJS, _ADVS]
    for _ in range(20):
        for p in pools:
            yield "".join(" " + w for w in p)
