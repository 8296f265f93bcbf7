"""`dynkv bench quality`: accuracy against budget for every method, on the same seeded examples.

    for each task x length: examples = make_suite([task], length, n, seed, "eval", tokenizer)
        for each example: tokenise the document once (the tokenizer's own encoding of it, BOS
            included where it adds one, then the suffix "\\n<question>\\nAnswer:" tokenised on its own)
            full KV once -> reference prediction
            for each method x budget: compress the ids with the question as probe, ask, score

Everything that was measured goes into one :class:`QualityResult`: every prediction, the accuracy table
(task x method x budget, per length), the per-layer budgets DynamicKV chose for each task, and the
issue's targets checked against the table. The console output (tables, layer charts) and the JSON are
both made from it.
"""

from __future__ import annotations

import itertools
import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import typer

from dynkv_cli.config import CompressionSettings, GenerationSettings
from dynkv_cli.engine import CompressedDocument, Engine
from dynkv_cli.errors import UsageError
from dynkv_cli.methods import parse_method
from dynkv_cli.model import LoadedModel
from dynkv_cli.prompt import TaskPrompt, encode, prompt_ids

from .tasks import TASKS, Example, format_prompt, make_example, score, suite_seed

FULL = "full"
DEFAULT_BUDGETS = ("0.9%", "1.7%", "6.9%")
#: The issue's targets are checked at this length (and reported for every measured length).
TARGET_LENGTH = 8192
NEEDLE_CATEGORY = "retrieval"
#: Below this full-KV average (percent) the targets are reported as not measurable.
MIN_FULL_ACCURACY = 50.0
MIX_SUFFIX = "+mix"

#: answer_fn(engine, compressed document, example, generation) -> prediction text
AnswerFn = Callable[[Engine, CompressedDocument, Example, GenerationSettings], str]


# ----------------------------------------------------------------------------------------------
# Parsing the command's words


def parse_length(word: str) -> int:
    """``4k`` -> 4096, ``8K`` -> 8192, ``512`` -> 512."""
    w = word.strip().lower()
    try:
        if w.endswith("k"):
            n = int(float(w[:-1]) * 1024)
        else:
            n = int(w)
    except ValueError:
        raise UsageError(f"length {word!r} is not a length; write tokens like 512, 4k or 8k") from None
    if n < 64:
        raise UsageError(f"length {word!r} is too short; give at least 64 tokens")
    return n


def split_words(text: str | None) -> list[str]:
    return [w.strip() for w in (text or "").split(",") if w.strip()]


def resolve_tasks(text: str | None) -> list[str]:
    names = split_words(text)
    if not names or names == ["all"]:
        return list(TASKS)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise UsageError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    return names


def resolve_methods(text: str | None, mix: bool = False) -> list[str]:
    """Method names from ``dynkv_cli.methods.METHODS`` (read at run time: methods register themselves).

    ``full`` is always measured (it is the reference) and is not listed here. With ``mix`` every method
    that scores with attention is measured a second time with MixKV mixing, as ``<method>+mix``.
    """
    from dynkv_cli.methods import ALIASES, METHODS

    names = split_words(text)
    if not names or names == ["all"]:
        names = [*METHODS, *ALIASES]
    for n in names:
        parse_method(n)  # an unknown method or part: one line naming the valid ones
    out = [n for n in dict.fromkeys(names) if n != FULL]
    if mix:
        for n in list(out):
            m = n + MIX_SUFFIX
            if not n.endswith(MIX_SUFFIX) and m not in out and parse_method(n).observation() != "none":
                out.append(m)
    return out


def resolve_budgets(text: str | None) -> list[str]:
    from dynkv_cli.budget import parse_budget

    words = split_words(text) or list(DEFAULT_BUDGETS)
    for w in words:
        parse_budget(w)
    return words


# ----------------------------------------------------------------------------------------------
# One example: prompt, ids, scoring


@dataclass
class PreparedExample:
    example: Example
    index: int
    seed: int
    length: int
    prompt: TaskPrompt
    doc_ids: list[int]
    prefix_ids: list[int]
    suffix_ids: list[int]
    answer_tokens: int
    evidence: list[int] = field(default_factory=list)  # document token indices of the answer's occurrences

    @property
    def prompt_tokens(self) -> int:
        return len(self.prefix_ids) + len(self.doc_ids) + len(self.suffix_ids)


def reference_ids(tokenizer, example: Example) -> list[int]:
    """The prompt's ids as a plain ``transformers`` user gets them, whatever the model: the document
    as the tokenizer encodes it with its own special tokens (a BOS where it adds one), then the
    suffix tokenised on its own (so no token spans the document/suffix boundary)."""
    doc, suffix = format_prompt(example)
    ids = list(tokenizer(doc)["input_ids"])
    return ids + encode(tokenizer, suffix)


def task_prompt(example: Example) -> TaskPrompt:
    """The suite's prompt as a :class:`TaskPrompt`: no template, the suffix with ``{question}`` in it."""
    _, suffix = format_prompt(example)
    if example.question not in suffix:
        raise UsageError(f"the {example.task} suffix does not contain its question; cannot build a probe")
    return TaskPrompt(
        system=None,
        before_document="",
        after_document=suffix.replace(example.question, "{question}", 1),
        answer_prefix="",
        use_chat_template=False,
    )


def prepare(tokenizer, example: Example, index: int, seed: int, length: int) -> PreparedExample:
    """Tokenise the document once; check the ids the engine will see equal :func:`reference_ids`."""
    doc, _ = format_prompt(example)
    prompt = task_prompt(example)
    doc_ids = encode(tokenizer, doc)
    p = prompt_ids(tokenizer, prompt, example.question)
    seen = p.prefix + doc_ids + p.suffix
    if seen != reference_ids(tokenizer, example):
        raise UsageError(
            f"{example.task}: the engine's token ids (prefix + document + suffix) differ from the tokenizer's "
            "own encoding of the document followed by the suffix; its special tokens are not a single leading BOS"
        )
    answer_tokens = len(encode(tokenizer, " " + example.answer))
    return PreparedExample(
        example,
        index,
        seed,
        length,
        prompt,
        doc_ids,
        p.prefix,
        p.suffix,
        answer_tokens,
        evidence_tokens(tokenizer, example),
    )


def evidence_tokens(tokenizer, example: Example) -> list[int]:
    """Document token indices that spell an answer item (every occurrence, as a whole word/number).

    What a method must keep for the answer to be readable at all: a model-independent check of
    retention (``evidence_kept``). Empty when the tokenizer gives no offsets.
    """
    doc = example.document
    try:
        enc = tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        return []
    offs = enc.get("offset_mapping") or []
    spans = []
    for item in dict.fromkeys(example.answers or [example.answer]):
        pat = r"(?<![A-Za-z0-9])" + re.escape(item) + r"(?![A-Za-z0-9])"
        spans += [(m.start(), m.end()) for m in re.finditer(pat, doc)]
    return sorted({i for i, (a, b) in enumerate(offs) for s0, e0 in spans if a < e0 and b > s0})


def evidence_kept(doc: CompressedDocument, evidence: list[int]) -> float | None:
    """Share of the evidence tokens present in the cache, averaged over layers and KV heads."""
    if not evidence or doc.stats.compactions:
        return None
    cache, P = doc.cache, doc.cache.prefix_len
    ev = torch.tensor(evidence, dtype=torch.long)
    shares = []
    for layer in cache.layers:
        if hasattr(layer, "head") and hasattr(layer, "lens"):
            heads = [layer.head(h)[2] for h in range(len(layer.lens))]
        else:
            heads = list(layer.positions)
        for pos in heads:
            kept = pos.detach().cpu()
            kept = kept[kept >= P] - P
            shares.append(float(torch.isin(ev, kept).float().mean()))
    return sum(shares) / len(shares) if shares else None


def answer_budget(prep: PreparedExample) -> int:
    """New tokens allowed: the answer, its EOS and 4 more."""
    return prep.answer_tokens + 1 + 4


def generate_answer(engine: Engine, doc: CompressedDocument, example: Example, gen: GenerationSettings) -> str:
    """Default answer function: greedy decoding from the compressed cache."""
    return engine.ask(doc, example.question, generation=gen).text.strip()


# ----------------------------------------------------------------------------------------------
# Records


@dataclass
class Prediction:
    task: str
    length: int
    example_index: int
    seed: int  # the example's seed (eval split)
    method: str  # "full", a method name, or "<method>+mix"
    budget: str  # the budget word ("full" for the reference)
    budget_tokens: int | None  # B (None: nothing dropped)
    doc_tokens: int
    prediction: str
    answer: str
    score: float
    kept_tokens: int  # document entries kept, summed over layers, per KV head
    kept_per_layer: list[int]
    bytes: int  # cache bytes after compression
    full_kv_bytes: int
    depth: float
    seconds: float
    evidence_kept: float | None = None  # share of the answer's tokens in the cache (mean over layers, heads)


@dataclass
class QualityResult:
    model: str
    tasks: list[str]
    lengths: list[int]
    budgets: list[str]
    methods: list[str]
    examples: int
    seed: int
    chunk_size: int
    num_layers: int
    command: str = ""
    retention: dict = field(default_factory=dict)  # the retention settings every method ran with (DynamicKV's names)
    predictions: list[Prediction] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    # ---- aggregation -------------------------------------------------------------------------
    def accuracy(self, length: int, task: str, method: str, budget: str) -> float | None:
        """Mean score in percent; ``full`` ignores the budget."""
        b = FULL if method == FULL else budget
        xs = [
            p.score
            for p in self.predictions
            if p.length == length and p.task == task and p.method == method and p.budget == b
        ]
        return 100.0 * sum(xs) / len(xs) if xs else None

    def average(self, length: int, method: str, budget: str, tasks: Sequence[str] | None = None) -> float | None:
        vals = [self.accuracy(length, t, method, budget) for t in (tasks or self.tasks)]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    def examples_at(self, length: int) -> int:
        """Examples per task measured at ``length`` (full-KV runs of the first task)."""
        return sum(1 for p in self.predictions if p.length == length and p.method == FULL and p.task == self.tasks[0])

    def evidence(self, length: int, task: str | None, method: str, budget: str) -> float | None:
        """Mean share (percent) of the answer's tokens kept in the cache; ``task=None``: mean over tasks."""
        if task is None:
            vals = [self.evidence(length, t, method, budget) for t in self.tasks]
            vals = [v for v in vals if v is not None]
            return sum(vals) / len(vals) if vals else None
        b = FULL if method == FULL else budget
        xs = [
            p.evidence_kept
            for p in self.predictions
            if p.length == length
            and p.task == task
            and p.method == method
            and p.budget == b
            and p.evidence_kept is not None
        ]
        return 100.0 * sum(xs) / len(xs) if xs else None

    def evidence_table(self) -> dict:
        """``{length: {budget: {method: {task: pct, "average": pct}}}}`` of answer tokens kept."""
        return {
            str(n): {
                b: {
                    m: {
                        **{t: _r(self.evidence(n, t, m, b)) for t in self.tasks},
                        "average": _r(self.evidence(n, None, m, b)),
                    }
                    for m in self.methods
                }
                for b in self.budgets
            }
            for n in self.lengths
        }

    def table(self) -> dict:
        """``{length: {budget: {method: {task: acc, "average": acc, "pct_of_full": pct}}}}``."""
        out: dict = {}
        for length in self.lengths:
            full_avg = self.average(length, FULL, FULL)
            per_budget: dict = {}
            for budget in self.budgets:
                per_method: dict = {}
                for method in [FULL, *self.methods]:
                    row = {t: _r(self.accuracy(length, t, method, budget)) for t in self.tasks}
                    avg = self.average(length, method, budget)
                    row["average"] = _r(avg)
                    row["pct_of_full"] = _r(100.0 * avg / full_avg) if avg is not None and full_avg else None
                    per_method[method] = row
                per_budget[budget] = per_method
            out[str(length)] = per_budget
        return out

    def layer_budgets(self) -> dict:
        """The per-layer budgets DynamicKV chose: ``{length: {budget: {task: profile}}}``.

        A profile is the average kept entries per layer (per KV head) over the task's examples, and the
        same divided by ``B`` (1.0 = the average layer). ``distances`` compares tasks: the mean total
        variation distance between per-task profiles (each normalised to sum 1) against the mean distance
        between examples (seeds) of the same task. Task-dependence means between >> within.
        """
        out: dict = {}
        methods = [m for m in self.methods if m.removesuffix(MIX_SUFFIX) == "dynamickv"]
        for method in methods:
            for length in self.lengths:
                for budget in self.budgets:
                    per_task: dict = {}
                    shares: dict[str, list[list[float]]] = {}
                    for task in self.tasks:
                        ps = [
                            p
                            for p in self.predictions
                            if p.length == length
                            and p.task == task
                            and p.method == method
                            and p.budget == budget
                            and p.budget_tokens
                        ]
                        if not ps:
                            continue
                        L = len(ps[0].kept_per_layer)
                        mean = [sum(p.kept_per_layer[j] for p in ps) / len(ps) for j in range(L)]
                        rel = [sum(p.kept_per_layer[j] / p.budget_tokens for p in ps) / len(ps) for j in range(L)]
                        shares[task] = [_share(p.kept_per_layer) for p in ps]
                        per_task[task] = {
                            "examples": len(ps),
                            "budget_tokens": _r(sum(p.budget_tokens for p in ps) / len(ps)),
                            "kept_per_layer": [_r(x) for x in mean],
                            "relative_to_budget": [_r(x, 3) for x in rel],
                        }
                    if per_task:
                        key = f"{method}@{budget}" if method != "dynamickv" else budget
                        out.setdefault(str(length), {})[key] = {
                            "tasks": per_task,
                            "distances": profile_distances(shares),
                        }
        return out

    def targets(self, length: int = TARGET_LENGTH) -> list[dict]:
        return check_targets(self, length)

    @classmethod
    def from_dict(cls, d: dict) -> QualityResult:
        """Rebuild a result from its JSON (``to_dict``), e.g. to render it again."""
        names = {f for f in Prediction.__dataclass_fields__}
        return cls(
            model=d["model"],
            tasks=list(d["tasks"]),
            lengths=[int(n) for n in d["lengths"]],
            budgets=list(d["budgets"]),
            methods=[m for m in d["methods"] if m != FULL],
            examples=int(d["examples_per_cell"]),
            seed=int(d["seed"]),
            chunk_size=int(d["chunk_size"]),
            num_layers=int(d["num_layers"]),
            command=d.get("command", ""),
            retention=dict(d.get("retention", {})),
            predictions=[Prediction(**{k: v for k, v in p.items() if k in names}) for p in d["predictions"]],
            errors=list(d.get("errors", [])),
            seconds=float(d.get("seconds", 0.0)),
        )

    def to_dict(self) -> dict:
        d = {
            "command": self.command,
            "model": self.model,
            "tasks": self.tasks,
            "lengths": self.lengths,
            "budgets": self.budgets,
            "methods": [FULL, *self.methods],
            "examples_per_cell": self.examples,
            "seed": self.seed,
            "chunk_size": self.chunk_size,
            "num_layers": self.num_layers,
            "retention": self.retention,
            "seconds": round(self.seconds, 1),
            "table": self.table(),
            "evidence_kept": self.evidence_table(),
            "layer_budgets": self.layer_budgets(),
            "targets": {str(n): self.targets(n) for n in self.lengths},
            "errors": self.errors,
            "predictions": [asdict(p) for p in self.predictions],
        }
        return d


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(float(x), nd)


def _share(kept: list[int]) -> list[float]:
    s = sum(kept)
    return [k / s for k in kept] if s else [0.0] * len(kept)


def _tv(a: list[float], b: list[float]) -> float:
    return 0.5 * sum(abs(x - y) for x, y in zip(a, b))


def profile_distances(shares: dict[str, list[list[float]]]) -> dict:
    """Total-variation distances between layer-budget profiles: between tasks vs between seeds of one task."""
    means = {t: [sum(col) / len(col) for col in zip(*ps)] for t, ps in shares.items() if ps}
    between = [_tv(means[a], means[b]) for a, b in itertools.combinations(sorted(means), 2)]
    within = [_tv(x, y) for ps in shares.values() for x, y in itertools.combinations(ps, 2)]
    b = statistics.fmean(between) if between else None
    w = statistics.fmean(within) if within else None
    pairs = sorted(
        ((round(_tv(means[a], means[c]), 4), a, c) for a, c in itertools.combinations(sorted(means), 2)),
        reverse=True,
    )
    return {
        "between_tasks": _r(b, 4),
        "within_task": _r(w, 4),
        "ratio": _r(b / w, 2) if b is not None and w else None,
        "most_different": [{"tasks": [a, c], "distance": d} for d, a, c in pairs[:3]],
    }


# ----------------------------------------------------------------------------------------------
# Targets (issue 4), checked against the measured table


def check_targets(result: QualityResult, length: int = TARGET_LENGTH) -> list[dict]:
    """The issue's three targets at ``length``: met / missed / not measured, with the numbers."""
    out: list[dict] = []
    has = set(result.methods)
    needle = [t for t in result.tasks if TASKS[t].category == NEEDLE_CATEGORY]
    if length not in result.lengths:
        return out

    # 1. dynamickv at 1.7% keeps >= 90% of full-KV accuracy on average
    t1 = {"target": "dynamickv at 1.7% keeps >= 90% of full-KV accuracy (average over tasks)", "length": length}
    if "dynamickv" in has and "1.7%" in result.budgets:
        d, f = result.average(length, "dynamickv", "1.7%"), result.average(length, FULL, FULL)
        pct = 100.0 * d / f if f else None
        t1.update(dynamickv=_r(d), full=_r(f), pct_of_full=_r(pct), met=pct is not None and pct >= 90.0)
    else:
        t1["met"] = None
    out.append(t1)

    # 2. at 0.9% beats snapkv and pyramidkv by >= 10 points on the needle tasks
    t2 = {
        "target": "dynamickv at 0.9% beats snapkv and pyramidkv by >= 10 points (average over needle tasks)",
        "length": length,
        "tasks": needle,
    }
    others = [m for m in ("snapkv", "pyramidkv") if m in has]
    if "dynamickv" in has and "0.9%" in result.budgets and others and needle:
        d = result.average(length, "dynamickv", "0.9%", needle)
        t2["dynamickv"] = _r(d)
        margins = {}
        for m in others:
            o = result.average(length, m, "0.9%", needle)
            t2[m] = _r(o)
            margins[m] = _r(d - o)
        t2["margin"] = margins
        t2["met"] = all(v >= 10.0 for v in margins.values()) and len(others) == 2
    else:
        t2["met"] = None
    out.append(t2)

    # 3. never worse than snapkv at the same budget by more than 2 points on any task
    t3 = {"target": "dynamickv is never worse than snapkv by > 2 points on any task, at any budget", "length": length}
    if "dynamickv" in has and "snapkv" in has:
        worst = []
        for budget in result.budgets:
            for task in result.tasks:
                d = result.accuracy(length, task, "dynamickv", budget)
                s = result.accuracy(length, task, "snapkv", budget)
                if d is not None and s is not None and d < s - 2.0:
                    worst.append({"budget": budget, "task": task, "dynamickv": _r(d), "snapkv": _r(s)})
        t3["violations"] = worst
        t3["met"] = not worst
    else:
        t3["met"] = None
    out.append(t3)

    # accuracy can only show what compression keeps when the model answers with the full cache
    full = result.average(length, FULL, FULL)
    if full is not None and full < MIN_FULL_ACCURACY:
        for t in out:
            if t.get("met") is not None:
                t["met_as_computed"] = t["met"]
                t["met"] = None
            t["note"] = (
                f"full KV averages {full:.1f}% (< {MIN_FULL_ACCURACY:.0f}%): the model does not solve the suite, "
                "so accuracy cannot show what compression keeps"
            )
    return out


# ----------------------------------------------------------------------------------------------
# The run


def _settings(method: str, budget: str, chunk_size: int | None, retention: dict) -> CompressionSettings:
    """``method`` may carry wrappers (``snapkv+mix``); ``retention`` by name, each method takes its own."""
    return CompressionSettings(method=method, budget=budget, chunk_size=chunk_size, retention=dict(retention))


def run_one(
    lm: LoadedModel,
    prep: PreparedExample,
    method: str,
    budget: str,
    chunk_size: int | None,
    retention: dict,
    answer_fn: AnswerFn,
    max_new_tokens: int | None = None,
) -> Prediction:
    """Compress one prepared example with one method and budget, answer, score."""
    ex = prep.example
    gen = GenerationSettings(max_new_tokens=max_new_tokens or answer_budget(prep))
    engine = Engine(lm, _settings(method, FULL if method == FULL else budget, chunk_size, retention), gen)
    t0 = time.perf_counter()
    doc = engine.compress(prep.doc_ids, prep.prompt, question=ex.question)
    kept_evidence = evidence_kept(doc, prep.evidence)
    text = answer_fn(engine, doc, ex, gen)
    st = doc.stats
    return Prediction(
        task=ex.task,
        length=prep.length,
        example_index=prep.index,
        seed=prep.seed,
        method=method,
        budget=FULL if method == FULL else budget,
        budget_tokens=st.budget_tokens,
        doc_tokens=st.doc_tokens,
        prediction=text,
        answer=ex.answer,
        score=float(score(ex, text)),
        kept_tokens=int(sum(st.kept_per_layer)),
        kept_per_layer=list(st.kept_per_layer),
        bytes=int(st.bytes_used),
        full_kv_bytes=int(st.full_kv_bytes),
        depth=ex.depth,
        seconds=round(time.perf_counter() - t0, 3),
        evidence_kept=None if kept_evidence is None else round(kept_evidence, 4),
    )


def run_quality(
    lm: LoadedModel,
    *,
    tasks: Sequence[str],
    lengths: Sequence[int],
    budgets: Sequence[str],
    methods: Sequence[str],
    examples: int = 1,
    seed: int = 0,
    chunk_size: int | None = None,
    retention: dict | None = None,
    answer_fn: AnswerFn | None = None,
    max_new_tokens: int | None = None,
    on_prediction: Callable[[Prediction], None] | None = None,
    keep_going: bool = True,
    time_limit: float | None = None,
    model_name: str = "",
    command: str = "",
) -> QualityResult:
    """Measure every method x budget on the same examples (generated once per task x length, eval split).

    ``full`` runs once per example and serves every budget. Each document is tokenised once. With
    ``keep_going`` a method that raises is recorded in ``errors`` and skipped from then on.

    Examples run in rounds (example ``i`` of every length x task, then ``i + 1``): the same examples as
    ``make_suite`` gives, in an order that keeps every cell at the same count when ``time_limit`` (seconds)
    stops the run before the next round would end past it. ``result.examples`` is the rounds completed.
    """
    if examples < 1:
        raise UsageError(f"--examples must be at least 1 (got {examples})")
    retention = parse_method("dynamickv", retention or {}).retention()
    answer_fn = answer_fn or generate_answer
    methods = [m for m in methods if m != FULL]
    chunk = Engine(lm, CompressionSettings(method=FULL, budget=FULL, chunk_size=chunk_size)).chunk_size
    result = QualityResult(
        model=model_name or lm.name,
        tasks=list(tasks),
        lengths=list(lengths),
        budgets=list(budgets),
        methods=methods,
        examples=examples,
        seed=seed,
        chunk_size=chunk,
        num_layers=lm.shape.num_layers,
        command=command,
        retention=dict(retention),
    )
    t0 = time.perf_counter()
    tok = lm.tokenizer
    failed: set[str] = set()
    rounds = 0
    for i in range(examples):  # round i: example i of every length x task, so a stopped run stays balanced
        t_round = time.perf_counter()
        for length in lengths:
            for task in tasks:
                ex_seed = suite_seed("eval", seed, task, length, i)
                prep = prepare(tok, make_example(task, length, ex_seed, tok), i, ex_seed, length)
                runs = [(FULL, FULL)] + [(m, b) for m in methods for b in budgets]
                for method, budget in runs:
                    if method in failed:
                        continue
                    try:
                        p = run_one(lm, prep, method, budget, chunk_size, retention, answer_fn, max_new_tokens)
                    except Exception as e:  # noqa: BLE001 - one broken method must not sink the benchmark
                        if method == FULL or not keep_going:
                            raise
                        failed.add(method)
                        result.errors.append(
                            {"method": method, "budget": budget, "task": task, "length": length, "error": repr(e)}
                        )
                        continue
                    result.predictions.append(p)
                    if on_prediction:
                        on_prediction(p)
        rounds += 1
        now = time.perf_counter()
        if time_limit and i + 1 < examples and (now - t0) + (now - t_round) > time_limit:
            break
    result.examples = rounds
    result.seconds = time.perf_counter() - t0
    return result


def runs_per_example(methods: Sequence[str], budgets: Sequence[str]) -> int:
    return 1 + len([m for m in methods if m != FULL]) * len(budgets)


# ----------------------------------------------------------------------------------------------
# Rendering (rich)

_BLOCKS = " ▁▂▃▄▅▆▇█"


def _fmt(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def accuracy_tables(result: QualityResult) -> list:
    """One rich table per length x budget: rows = tasks, average, % of full; columns = methods."""
    from rich.table import Table

    tables = []
    table = result.table()
    for length in result.lengths:
        for budget in result.budgets:
            rows = table[str(length)][budget]
            t = Table(
                title=f"accuracy (%) at {length} tokens, budget {budget} ({result.examples_at(length)} examples per task)",
                title_justify="left",
            )
            t.add_column("task")
            for m in [FULL, *result.methods]:
                t.add_column(m, justify="right")
            for task in result.tasks:
                t.add_row(task, *[_fmt(rows[m][task]) for m in [FULL, *result.methods]])
            t.add_section()
            t.add_row("average", *[_fmt(rows[m]["average"]) for m in [FULL, *result.methods]], style="bold")
            t.add_row("% of full", *[_fmt(rows[m]["pct_of_full"]) for m in [FULL, *result.methods]])
            tables.append(t)
    return tables


def evidence_tables(result: QualityResult) -> list:
    """Per length: answer tokens kept in the cache (%), rows = method x budget, columns = tasks."""
    from rich.table import Table

    out = []
    for n in result.lengths:
        t = Table(title=f"answer tokens kept in the cache (%, mean over layers and KV heads) at {n} tokens")
        t.add_column("method")
        t.add_column("budget")
        for task in result.tasks:
            t.add_column(task, justify="right")
        t.add_column("average", justify="right")
        for m in result.methods:
            for b in result.budgets:
                vals = [result.evidence(n, task, m, b) for task in result.tasks]
                t.add_row(m, b, *[_fmt(v) for v in vals], _fmt(result.evidence(n, None, m, b)))
        out.append(t)
    return out


def _bar(value: float, vmax: float, width: int) -> str:
    if vmax <= 0:
        return ""
    cells = value / vmax * width
    full = int(cells)
    frac = cells - full
    part = _BLOCKS[int(round(frac * 8))] if full < width and frac > 0.06 else ""
    return "█" * full + part.strip()


def layer_chart_lines(result: QualityResult, width: int = 28, only_top: bool = False) -> list[str]:
    """Plain-text bar charts of the kept entries per layer that DynamicKV chose, one block per task.

    ``only_top``: plain ``dynamickv`` at the longest length only (the Markdown report).
    """
    lines: list[str] = []
    budgets = result.layer_budgets()
    top = str(max(result.lengths)) if result.lengths else None
    for length, per_budget in budgets.items():
        if only_top and length != top:
            continue
        for key, entry in per_budget.items():
            if only_top and "@" in key:
                continue
            tasks = entry["tasks"]
            vmax = max(max(v["relative_to_budget"]) for v in tasks.values())
            lines.append(f"DynamicKV layer budgets at {length} tokens, budget {key} (kept per layer / B):")
            for task, v in tasks.items():
                lines.append(f"  {task} (B={_fmt(v['budget_tokens'], 0)}, {v['examples']} examples)")
                for j, x in enumerate(v["relative_to_budget"]):
                    lines.append(f"    L{j:<2} {_bar(x, vmax, width):<{width}} {x:5.2f}")
            d = entry["distances"]
            lines.append(
                "  profile distance (total variation): between tasks "
                f"{_fmt(d['between_tasks'], 3)}, between seeds of a task {_fmt(d['within_task'], 3)}"
                + (f", ratio {d['ratio']}" if d["ratio"] is not None else "")
            )
            lines.append("")
    return lines


def layer_heatmap(result: QualityResult):
    """A compact rich table: rows = tasks, columns = layers, cells = kept/B with a block glyph."""
    from rich.table import Table

    out = []
    for length, per_budget in result.layer_budgets().items():
        for key, entry in per_budget.items():
            tasks = entry["tasks"]
            L = len(next(iter(tasks.values()))["relative_to_budget"])
            vmax = max(max(v["relative_to_budget"]) for v in tasks.values()) or 1.0
            t = Table(title=f"DynamicKV kept per layer / B at {length} tokens, budget {key}", title_justify="left")
            t.add_column("task")
            for j in range(L):
                t.add_column(f"L{j}", justify="right")
            for task, v in tasks.items():
                cells = []
                for x in v["relative_to_budget"]:
                    g = _BLOCKS[max(1, min(8, math.ceil(x / vmax * 8)))] if x > 0 else " "
                    cells.append(f"{g} {x:.2f}")
                t.add_row(task, *cells)
            d = entry["distances"]
            t.caption = (
                f"total-variation distance between task profiles {_fmt(d['between_tasks'], 3)} vs between seeds "
                f"of one task {_fmt(d['within_task'], 3)}"
            )
            out.append(t)
    return out


def target_lines(result: QualityResult, length: int = TARGET_LENGTH) -> list[str]:
    lines = []
    for t in result.targets(length):
        status = {True: "MET", False: "MISSED", None: "not measurable" if "note" in t else "not measured"}[t["met"]]
        detail = {k: v for k, v in t.items() if k not in ("target", "met", "length", "tasks")}
        lines.append(f"[{status}] {t['target']} @ {t['length']} tokens: {detail}")
    return lines


def merge_results(results: list[QualityResult]) -> QualityResult:
    """One result from several runs of the same tasks, budgets and methods (e.g. one per length)."""
    first = results[0]
    for r in results[1:]:
        if (r.tasks, r.budgets, r.methods) != (first.tasks, first.budgets, first.methods):
            raise UsageError("results to merge must have the same tasks, budgets and methods")
        if r.retention != first.retention:
            raise UsageError("results to merge must have the same retention settings (--r-max, --r-min)")
    out = QualityResult(**{k: getattr(first, k) for k in first.__dataclass_fields__})
    out.lengths = list(dict.fromkeys(n for r in results for n in r.lengths))
    out.examples = min(r.examples for r in results)
    out.predictions = [p for r in results for p in r.predictions]
    out.errors = [e for r in results for e in r.errors]
    out.seconds = sum(r.seconds for r in results)
    out.command = " ; ".join(dict.fromkeys(r.command for r in results if r.command))
    return out


def markdown_report(result: QualityResult) -> str:
    """The tables, the layer-budget charts and the targets as Markdown (for docs/quality.md)."""
    table = result.table()
    cols = [FULL, *result.methods]
    out: list[str] = []
    for length in result.lengths:
        for budget in result.budgets:
            rows = table[str(length)][budget]
            out.append(f"#### {length} tokens, budget {budget} ({result.examples_at(length)} examples per task)\n")
            out.append("| task | " + " | ".join(cols) + " |")
            out.append("|---|" + "---:|" * len(cols))
            for task in result.tasks:
                out.append(f"| {task} | " + " | ".join(_fmt(rows[m][task]) for m in cols) + " |")
            out.append("| **average** | " + " | ".join(f"**{_fmt(rows[m]['average'])}**" for m in cols) + " |")
            out.append("| % of full | " + " | ".join(_fmt(rows[m]["pct_of_full"]) for m in cols) + " |")
            out.append("")
    for n in result.lengths:
        out.append(f"#### Answer tokens kept in the cache at {n} tokens (%, mean over layers and KV heads)\n")
        out.append("| method | budget | " + " | ".join(result.tasks) + " | average |")
        out.append("|---|---|" + "---:|" * (len(result.tasks) + 1))
        for m in result.methods:
            for b in result.budgets:
                vals = [_fmt(result.evidence(n, task, m, b)) for task in result.tasks]
                out.append(f"| {m} | {b} | " + " | ".join(vals) + f" | {_fmt(result.evidence(n, None, m, b))} |")
        out.append("")
    out.append("### DynamicKV layer budgets per task (kept per layer / B, mean over examples)\n")
    lb = result.layer_budgets()
    for length, per_key in lb.items():
        for key, entry in per_key.items():
            tasks = entry["tasks"]
            L = len(next(iter(tasks.values()))["relative_to_budget"])
            d = entry["distances"]
            out.append(f"#### {length} tokens, {key if '@' in key else 'dynamickv@' + key}\n")
            out.append("| task | B | " + " | ".join(f"L{j}" for j in range(L)) + " |")
            out.append("|---|---:|" + "---:|" * L)
            for task, v in tasks.items():
                cells = " | ".join(f"{x:.2f}" for x in v["relative_to_budget"])
                out.append(f"| {task} | {_fmt(v['budget_tokens'], 0)} | {cells} |")
            most = ", ".join(f"{'/'.join(m['tasks'])} {m['distance']:.3f}" for m in d["most_different"])
            out.append(
                f"\nTotal-variation distance between the task profiles: {_fmt(d['between_tasks'], 3)}; between "
                f"seeds of the same task: {_fmt(d['within_task'], 3)} (ratio {d['ratio']}). Most different: {most}.\n"
            )
    charts = [line.rstrip() for line in layer_chart_lines(result, only_top=True)]
    if charts:
        out.append("#### Bar charts\n")
        out.append("```")
        out.extend(charts)
        out.append("```\n")
    out.append("### Targets\n")
    for n in result.lengths:
        for line in target_lines(result, n):
            out.append(f"- {line}")
    if result.errors:
        out.append("\n### Errors\n")
        out.extend(
            f"- {e['method']} ({e['task']}, {e['length']}, {e['budget']}): `{e['error']}`" for e in result.errors
        )
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------
# The command (registered on ``bench_app`` in ``bench/cli.py``)


def quality_command(
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="the model (a path or hub id); default: as for every dynkv command (DYNKV_MODEL, the config file, ...)",
    ),
    tasks: str = typer.Option("all", "--tasks", help="comma-separated task names, or all"),
    lengths: str = typer.Option("4k,8k", "--lengths", help="comma-separated lengths in tokens: 512, 4k, 8k"),
    budgets: str = typer.Option(
        ",".join(DEFAULT_BUDGETS), "--budgets", help="comma-separated budgets: 0.9%, 1.7%, 6.9% or tokens (128)"
    ),
    methods: str = typer.Option("all", "--methods", help="comma-separated methods (default: every method)"),
    mix: bool = typer.Option(False, "--mix", help="also run every scoring method with MixKV mixing (<m>+mix)"),
    examples: int = typer.Option(2, "--examples", "-n", help="examples per task x length (at most)"),
    time_limit: float | None = typer.Option(
        None, "--time-limit", help="minutes: start no example round that would end past this"
    ),
    seed: int = typer.Option(0, "--seed", help="suite seed (eval split)"),
    r_max: float | None = typer.Option(
        None, "--r-max", help="DynamicKV's per-layer cap, a multiple of the average budget (default 10, the paper's)"
    ),
    r_min: float | None = typer.Option(
        None, "--r-min", help="DynamicKV's per-layer floor, a fraction of the average budget (default 0)"
    ),
    chunk_size: int | None = typer.Option(None, "--chunk-size", help="tokens per chunk (default 1024 on CPU)"),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: auto)"),
    dtype: str | None = typer.Option(None, "--dtype", help="float32, bfloat16, float16 (default: auto)"),
    json_out: str | None = typer.Option(None, "--json", help="write every prediction and the tables here"),
    markdown: str | None = typer.Option(None, "--markdown", help="also write the tables and charts as Markdown"),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for torch"),
    from_json: list[str] | None = typer.Option(
        None, "--from-json", help="render saved results (repeat to merge lengths) instead of running a model"
    ),
) -> None:
    """Accuracy against budget for every method, on the same seeded examples (full KV is the reference)."""
    import json
    import shlex
    import sys
    from pathlib import Path

    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dynkv_cli.errors import DynkvError
    from dynkv_cli.model import load_model
    from dynkv_cli.userconfig import resolve_model

    console = Console()
    err = Console(stderr=True)
    try:
        if from_json:
            result = merge_results([QualityResult.from_dict(json.loads(Path(f).read_text())) for f in from_json])
            return _render(result, console, err, json_out, markdown)
        if threads:
            torch.set_num_threads(threads)
        task_list = resolve_tasks(tasks)
        length_list = [parse_length(w) for w in split_words(lengths)]
        if not length_list:
            raise UsageError("give at least one length (--lengths 4k,8k)")
        budget_list = resolve_budgets(budgets)
        method_list = resolve_methods(methods, mix)
        given = {"r_max": r_max, "r_min": r_min}
        retention = parse_method("dynamickv", {k: v for k, v in given.items() if v is not None}).retention()
        model = resolve_model(model)
        lm = load_model(model, device=device, dtype=dtype)
        total = len(length_list) * len(task_list) * examples * runs_per_example(method_list, budget_list)
        argv = sys.argv[1:] if sys.argv and Path(sys.argv[0]).name.startswith("dynkv") else []
        command = "dynkv " + shlex.join(argv) if argv else ""
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        ) as progress:
            bar = progress.add_task("quality", total=total)

            def tick(p: Prediction) -> None:
                progress.update(bar, advance=1, description=f"{p.length} {p.task} #{p.example_index} {p.method}")
                if not err.is_terminal:  # a log line per prediction when the output is a file
                    err.print(
                        f"{p.length} {p.task} #{p.example_index} {p.method} {p.budget}: {p.prediction!r} "
                        f"score {p.score:.2f} ({p.seconds:.1f}s)",
                        highlight=False,
                        markup=False,
                    )

            result = run_quality(
                lm,
                tasks=task_list,
                lengths=length_list,
                budgets=budget_list,
                methods=method_list,
                examples=examples,
                seed=seed,
                chunk_size=chunk_size,
                retention=retention,
                on_prediction=tick,
                time_limit=time_limit * 60 if time_limit else None,
                model_name=model,
                command=command,
            )
    except DynkvError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    _render(result, console, err, json_out, markdown)


def _render(result: QualityResult, console, err, json_out: str | None, markdown: str | None) -> None:
    import json
    from pathlib import Path

    for t in accuracy_tables(result):
        console.print(t)
    for t in evidence_tables(result):
        console.print(t)
    for t in layer_heatmap(result):
        console.print(t)
    for line in layer_chart_lines(result):
        console.print(line, highlight=False, markup=False)
    for n in result.lengths:
        for line in target_lines(result, n):
            console.print(line, highlight=False, markup=False)
    for e in result.errors:
        err.print(f"[yellow]{e['method']} failed[/yellow] ({e['task']}, {e['length']}, {e['budget']}): {e['error']}")
        err.print("  its later runs were skipped; its cells show '-'", highlight=False)
    console.print(f"{len(result.predictions)} predictions in {result.seconds:.0f}s", highlight=False)
    if json_out:
        path = Path(json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        console.print(f"wrote {path}", highlight=False)
    if markdown:
        path = Path(markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(markdown_report(result))
        console.print(f"wrote {path}", highlight=False)
