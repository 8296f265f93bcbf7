"""`dynkv bench quality`: accuracy and fidelity against budget for every method, on the same seeded examples.

    for each task x length: example i = make_example(task, length, suite_seed("eval", seed, task, length, i))
        (the "eval" split is reported; the disjoint "tune" (train) split is for tuning anything on the suite)
        prompt: chat (default): the model's chat template, the qa profile's system text, the document in the
            user turn, the question after it, the task's answer prefix opening the assistant turn;
            plain: "<document>\\n<question>\\nAnswer:" (toy models, ids equal to the plain encoding)
        full KV once per example (it serves every method, budget and protocol) -> reference answer
        for each protocol x method x budget:
            aware: compress with the question as probe; agnostic: compress with the qa profile's generic
            probe (as `questions: shared` and .dkv files); then ask, score, and teacher-force full KV's
            answer under the compressed cache (fidelity: log-prob gap per token, top-1 agreement)

``--results FILE.jsonl`` appends one line per prediction as it is made; a rerun skips the cells already
there (full KV included), and the tables are built from the file. The ``summary`` task (``summaries.py``)
summarizes LongBench multi_news records with the summarize profile (ROUGE-L against the reference and
against full KV, off-topic counts).

Everything that was measured goes into one :class:`QualityResult`: every prediction, the accuracy and
fidelity tables (task x method x budget, per length and protocol), truncated-number counts, the
per-layer budgets DynamicKV chose for each task, and the issue's targets checked against the table.
The console output (tables, layer charts), the Markdown and the JSON are all made from it.
"""

from __future__ import annotations

import itertools
import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
import typer

from dynkv_cli.config import CompressionSettings, GenerationSettings
from dynkv_cli.engine import CompressedDocument, Engine
from dynkv_cli.errors import UsageError
from dynkv_cli.methods import parse_method
from dynkv_cli.model import LoadedModel
from dynkv_cli.prompt import TaskPrompt, encode, prompt_ids

from .tasks import (
    CHAT_AFTER,
    CHAT_BEFORE,
    CHAT_SYSTEM,
    TASK_ALIASES,
    TASKS,
    Example,
    format_prompt,
    make_example,
    score,
    suite_seed,
)

FULL = "full"
DEFAULT_BUDGETS = ("0.9%", "1.7%", "6.9%")
#: The targets are checked at this length (and reported for every measured length).
TARGET_LENGTH = 4096
#: The targets ask for at least this many examples per task.
MIN_EXAMPLES = 8
NEEDLE_CATEGORY = "retrieval"
#: Below this full-KV average (percent) the targets are reported as not measurable.
MIN_FULL_ACCURACY = 50.0
MIX_SUFFIX = "+mix"
#: aware: the question is the probe, one compression per question; agnostic: one compression with the
#: generic probe (the qa profile's, what ``questions: shared`` and ``.dkv`` files do), then the question
PROTOCOLS = ("aware", "agnostic")
AGNOSTIC_PROBE = (
    "Answer questions about the document above. Questions may ask for names, numbers, dates, keys or facts."
)
#: chat: the model's chat template with the qa profile's system and user text; plain: "<doc>\n<q>\nAnswer:"
PROMPT_STYLES = ("chat", "plain")
#: the split every table reports, and the one kept apart for tuning anything on the suite
REPORTED_SPLIT, TUNING_SPLIT = "eval", "tune"
SUMMARY = "summary"

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
    """Task names (or their short names: passkey, vartrack, ...); ``summary`` is the multi_news task."""
    names = [TASK_ALIASES.get(n, n) for n in split_words(text)] or ["all"]
    names = [t for n in names for t in (TASKS if n == "all" else [n])]  # all: the RULER tasks
    unknown = [n for n in names if n not in TASKS and n != SUMMARY]
    if unknown:
        known = [*TASKS, *TASK_ALIASES, SUMMARY]
        raise UsageError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return list(dict.fromkeys(names))


def resolve_protocols(text: str | None) -> list[str]:
    names = split_words(text) or ["aware"]
    names = list(PROTOCOLS) if names == ["both"] else names
    bad = [n for n in names if n not in PROTOCOLS]
    if bad:
        raise UsageError(f"unknown protocol(s) {', '.join(bad)}; choose from aware, agnostic (or both)")
    return list(dict.fromkeys(names))


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


#: a budget word ``2%+r8%``: the 2% cache read with a low level, plus a selective reload of 8% per question;
#: ``2%+r8%:1``: with a low level of that share of each block (default RELOAD_LEVEL)
RELOAD_MARK = "+r"
#: the low level a ``+r`` budget keeps: this share of every block (the profile's reload_level default)
RELOAD_LEVEL = 0.25


def split_reload(budget: str) -> tuple[str, str | None]:
    """``"2%+r8%"`` -> ``("2%", "8%")``; ``"2%+r8%:1"`` -> ``("2%", "8%")`` (see :func:`reload_level`);
    a plain budget -> ``(budget, None)``."""
    base, mark, reload = budget.partition(RELOAD_MARK)
    return base, (reload.partition(":")[0] if mark else None)


def reload_level(budget: str) -> float:
    """The low level's share of each block a ``+r`` budget word asks for (``:1`` -> 1.0)."""
    _, colon, level = budget.partition(RELOAD_MARK)[2].partition(":")
    return float(level) if colon else RELOAD_LEVEL


def resolve_budgets(text: str | None) -> list[str]:
    from dynkv_cli.budget import parse_budget

    words = split_words(text) or list(DEFAULT_BUDGETS)
    for w in words:
        base, reload = split_reload(w)
        parse_budget(base)
        if reload is not None:
            parse_budget(reload)
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
    style: str = "plain"  # "chat" or "plain" (PROMPT_STYLES)
    chat_template: bool = False  # the prompt went through the tokenizer's chat template
    max_new_tokens: int | None = None  # None: answer_budget()
    repetition_guard: dict | None = None

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


def chat_prompt(example: Example, answer_prefix: bool = True) -> TaskPrompt:
    """The suite's prompt for a real instruction model, as ``dynkv qa`` asks (profiles/qa.yaml): the
    chat template, the qa system text, the document in the user turn and the question after it; the
    task's answer prefix (RULER's, "The special magic number for K is") opens the assistant turn.
    A tokenizer without a chat template gets the same text plainly (system, blank line, user text)."""
    return TaskPrompt(
        system=CHAT_SYSTEM,
        before_document=CHAT_BEFORE,
        after_document=CHAT_AFTER,
        answer_prefix=example.prefix if answer_prefix else "",
        use_chat_template=True,
    )


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prepare(tokenizer, example: Example, index: int, seed: int, length: int, style: str = "chat") -> PreparedExample:
    """Tokenise the document once. ``plain``: check the ids the engine will see equal :func:`reference_ids`;
    ``chat``: the prompt of :func:`chat_prompt` (through the chat template when the tokenizer has one)."""
    if style not in PROMPT_STYLES:
        raise UsageError(f"unknown prompt style {style!r}; choose from {', '.join(PROMPT_STYLES)}")
    chat = style == "chat"
    prompt = chat_prompt(example) if chat else task_prompt(example)
    doc_ids = encode(tokenizer, example.document if chat else format_prompt(example)[0])
    p = prompt_ids(tokenizer, prompt, example.question)
    if not chat and p.prefix + doc_ids + p.suffix != reference_ids(tokenizer, example):
        raise UsageError(
            f"{example.task}: the engine's token ids (prefix + document + suffix) differ from the tokenizer's "
            "own encoding of the document followed by the suffix; its special tokens are not a single leading BOS"
        )
    extra = {"style": "chat", "chat_template": has_chat_template(tokenizer)} if chat else {}
    return PreparedExample(
        example,
        index,
        seed,
        length,
        prompt,
        doc_ids,
        p.prefix,
        p.suffix,
        len(encode(tokenizer, " " + example.answer)),
        evidence_tokens(tokenizer, example),
        **extra,
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
    """New tokens allowed: the answer, its EOS and 4 more (plain); chat: 24 more, for a sentence around it."""
    if prep.max_new_tokens:
        return prep.max_new_tokens
    return prep.answer_tokens + 1 + (24 if prep.style == "chat" else 4)


def generate_answer(engine: Engine, doc: CompressedDocument, example: Example, gen: GenerationSettings):
    """Default answer function: greedy decoding from the compressed cache (the :class:`Answer`, whose
    ``token_ids`` the fidelity score teacher-forces; an answer function may return plain text)."""
    return engine.ask(doc, example.question, generation=gen, reload=getattr(doc, "bench_reload", None))


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
    # ---- the cell (results files are keyed by cell_key) and the fidelity score
    model: str = ""
    protocol: str = "aware"  # PROTOCOLS; full KV and summaries serve both (shared_cell)
    prompt: str = "plain"  # PROMPT_STYLES
    split: str = REPORTED_SPLIT
    config: str = ""  # chunk size and retention settings of a compressed run ("full" for full KV)
    answer_ids: list[int] = field(default_factory=list)  # the generated answer's token ids
    # full KV only: the log-prob of each of its answer tokens under the full cache (what compressed runs are
    # compared with)
    answer_logprobs: list[float] | None = None
    fidelity_gap: float | None = None  # mean per-token log-prob gap, full - compressed, on full KV's answer
    fidelity_agreement: float | None = None  # share of those positions where the compressed argmax is full's token
    fidelity_tokens: int = 0
    stop_reason: str = ""
    rouge_full: float | None = None  # summaries: ROUGE-L F1 against the full-KV summary (score: against the reference)
    off_topic: bool | None = None  # summaries: shares no named entity with its document
    chat_template: bool | None = None  # the prompt went through the tokenizer's chat template
    reload: dict | None = None  # a "+r" budget: the blocks reloaded, entries per head, bytes, seconds
    reused: bool = False  # read from the results file, not computed in this run (not written)


def shared_cell(method: str, task: str) -> bool:
    """Cells that do not depend on the protocol: full KV (nothing dropped, the probe never matters) and
    summaries (the instruction is the task's own, question-agnostic probe in both protocols)."""
    return method == FULL or task == SUMMARY


def cell_key(p: Prediction | dict) -> tuple:
    """(model, prompt, protocol, task, length, example seed, method, budget, config): one line of a results file.

    Protocol-free cells (:func:`shared_cell`) carry ``*`` for the protocol, so either protocol reuses them."""
    d = p if isinstance(p, dict) else asdict(p)
    proto = "*" if shared_cell(d["method"], d["task"]) else d.get("protocol", "aware")
    return (
        d.get("model", ""),
        d.get("prompt", "plain"),
        proto,
        d["task"],
        int(d["length"]),
        int(d["seed"]),
        d["method"],
        d["budget"],
        d.get("config", ""),
    )


def run_config(method: str, chunk_size: int, retention: dict) -> str:
    """What besides the cell decides a compressed run's result (so a changed setting is a new cell)."""
    import json

    if method == FULL:
        return FULL
    return f"chunk={chunk_size} " + json.dumps(retention, sort_keys=True, separators=(",", ":"))


class ResultsFile:
    """A JSON-lines file of predictions, one per line, appended as each is made (``--results``).

    A rerun with the same file skips every cell already in it (:func:`cell_key`): full-KV runs too, so
    they are reused across methods, budgets and runs. A torn last line (a killed run) is ignored."""

    def __init__(self, path):
        from pathlib import Path

        self.path = Path(path)
        self.rows: dict[tuple, dict] = {}
        if self.path.exists():
            import json

            for line in self.path.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                    self.rows[cell_key(row)] = row
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a killed run

    def get(self, key: tuple) -> Prediction | None:
        row = self.rows.get(key)
        return None if row is None else prediction_from_row(row, reused=True)

    def add(self, p: Prediction) -> None:
        import json

        row = asdict(p)
        row.pop("reused", None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        self.rows[cell_key(row)] = row

    def predictions(self) -> list[Prediction]:
        return [prediction_from_row(r, reused=True) for r in self.rows.values()]


def prediction_from_row(row: dict, reused: bool = False) -> Prediction:
    names = set(Prediction.__dataclass_fields__)
    p = Prediction(**{k: v for k, v in row.items() if k in names and k != "reused"})
    p.reused = reused
    return p


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
    protocols: list[str] = field(default_factory=lambda: ["aware"])
    prompt: str = "plain"
    notes: list[str] = field(default_factory=list)

    # ---- slicing -------------------------------------------------------------------------------
    def for_protocol(self, protocol: str) -> QualityResult:
        """The same result with only ``protocol``'s predictions (and the protocol-free cells: full KV, summaries)."""
        out = QualityResult(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        out.protocols = [protocol]
        seen: set[tuple] = set()
        out.predictions = []
        for p in self.predictions:
            if p.protocol != protocol and not shared_cell(p.method, p.task):
                continue
            k = cell_key(p)
            if k not in seen:
                seen.add(k)
                out.predictions.append(p)
        return out

    def _cell(self, length: int, task: str, method: str, budget: str) -> list[Prediction]:
        b = FULL if method == FULL else budget
        return [
            p
            for p in self.predictions
            if p.length == length and p.task == task and p.method == method and p.budget == b
        ]

    def full_of(self, p: Prediction) -> Prediction | None:
        """The full-KV prediction of ``p``'s example."""
        for q in self.predictions:
            if q.method == FULL and (q.task, q.length, q.seed) == (p.task, p.length, p.seed):
                return q
        return None

    # ---- fidelity, truncated numbers, off-topic summaries --------------------------------------
    def fidelity(self, length: int, task: str | None, method: str, budget: str) -> dict:
        """``{"gap": mean log-prob gap per token, "agreement": % top-1 agreement, "n": examples}``;
        ``task=None``: the mean of the per-task means."""
        if task is None:
            rows = [self.fidelity(length, t, method, budget) for t in self.scored_tasks()]
            rows = [r for r in rows if r["n"]]
            if not rows:
                return {"gap": None, "agreement": None, "n": 0}
            return {
                "gap": _r(statistics.fmean(r["gap"] for r in rows), 4),
                "agreement": _r(statistics.fmean(r["agreement"] for r in rows)),
                "n": sum(r["n"] for r in rows),
            }
        ps = [p for p in self._cell(length, task, method, budget) if p.fidelity_gap is not None]
        if not ps:
            return {"gap": None, "agreement": None, "n": 0}
        return {
            "gap": _r(statistics.fmean(p.fidelity_gap for p in ps), 4),
            "agreement": _r(100.0 * statistics.fmean(p.fidelity_agreement for p in ps)),
            "n": len(ps),
        }

    def truncations(self, length: int, method: str, budget: str, task: str | None = None) -> int:
        """Compressed answers that name a strict part of a number full KV gave whole (:func:`truncated_number`)."""
        n = 0
        for t in [task] if task else self.scored_tasks():
            if t == SUMMARY:
                continue
            for p in self._cell(length, t, method, budget):
                f = self.full_of(p)
                if f is not None and truncated_number(f.prediction, p.prediction):
                    n += 1
        return n

    def off_topic_count(self, length: int, method: str, budget: str) -> tuple[int, int]:
        """(off-topic summaries, summaries) of ``method`` at ``budget``."""
        ps = [p for p in self._cell(length, SUMMARY, method, budget) if p.off_topic is not None]
        return sum(1 for p in ps if p.off_topic), len(ps)

    def rouge_full(self, length: int, method: str, budget: str) -> float | None:
        xs = [p.rouge_full for p in self._cell(length, SUMMARY, method, budget) if p.rouge_full is not None]
        return 100.0 * statistics.fmean(xs) if xs else None

    def summary_table(self) -> dict:
        """Per model and protocol: ``{length: {budget: {method: {accuracy, pct_of_full, gap, agreement,
        truncated, [rouge_l_ref, rouge_l_full, off_topic]}}}}``, everything averaged over tasks."""
        out: dict = {}
        for n in self.lengths:
            full_avg = self.average(n, FULL, FULL)
            per_b: dict = {}
            for b in self.budgets:
                per_m: dict = {}
                for m in [FULL, *self.methods]:
                    avg = self.average(n, m, b)
                    fid = self.fidelity(n, None, m, b)
                    row = {
                        "accuracy": _r(avg),
                        "pct_of_full": _r(100.0 * avg / full_avg) if avg is not None and full_avg else None,
                        "logprob_gap": fid["gap"],
                        "top1_agreement": fid["agreement"],
                        "truncated_numbers": self.truncations(n, m, b) if m != FULL else 0,
                    }
                    if SUMMARY in self.tasks:
                        off, tot = self.off_topic_count(n, m, b)
                        row["rouge_l_reference"] = _r(self.accuracy(n, SUMMARY, m, b))
                        row["rouge_l_full"] = _r(self.rouge_full(n, m, b))
                        row["off_topic"] = off
                        row["summaries"] = tot
                    per_m[m] = row
                per_b[b] = per_m
            out[str(n)] = per_b
        return out

    def fidelity_table(self) -> dict:
        """``{length: {budget: {method: {task: {gap, agreement, n}, "average": {...}}}}}``."""
        return {
            str(n): {
                b: {
                    m: {
                        **{t: self.fidelity(n, t, m, b) for t in self.tasks},
                        "average": self.fidelity(n, None, m, b),
                    }
                    for m in [FULL, *self.methods]
                }
                for b in self.budgets
            }
            for n in self.lengths
        }

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

    def scored_tasks(self) -> list[str]:
        """The tasks that averages are taken over: summaries (ROUGE-L, not accuracy) are reported apart,
        unless they are all there is."""
        return [t for t in self.tasks if t != SUMMARY] or list(self.tasks)

    def average(self, length: int, method: str, budget: str, tasks: Sequence[str] | None = None) -> float | None:
        vals = [self.accuracy(length, t, method, budget) for t in (tasks or self.scored_tasks())]
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    def examples_at(self, length: int) -> int:
        """Examples per task measured at ``length`` (full-KV runs of the first task)."""
        return sum(
            1 for p in self.predictions if p.length == length and p.method == FULL and p.task == self.scored_tasks()[0]
        )

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
            protocols=list(d.get("protocols", ["aware"])),
            prompt=d.get("prompt", "plain"),
            notes=list(d.get("notes", [])),
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
        first = self.for_protocol(self.protocols[0]) if len(self.protocols) > 1 else self
        if first is not self:  # the top-level tables are the first protocol's; every protocol's are below
            d.update(
                table=first.table(),
                evidence_kept=first.evidence_table(),
                layer_budgets=first.layer_budgets(),
                targets={str(n): first.targets(n) for n in self.lengths},
            )
        d["protocols"] = self.protocols
        d["prompt"] = self.prompt
        d["splits"] = {"reported": REPORTED_SPLIT, "tuning": TUNING_SPLIT, "tuned_on_reported": False}
        d["notes"] = self.notes
        d["by_protocol"] = {}
        for proto in self.protocols:
            r = self.for_protocol(proto) if len(self.protocols) > 1 else self
            d["by_protocol"][proto] = {
                "summary": r.summary_table(),
                "table": r.table(),
                "fidelity": r.fidelity_table(),
                "layer_budgets": r.layer_budgets(),
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
    """The real-model targets at ``length``: met / missed / not measured, with the numbers.

    Question-aware (``result.protocols == ["aware"]``): dynamickv keeps >= 90% of full KV's average at
    2% and >= 98% at 5%; at every budget its average is at least snapkv's, pyramidkv's and adakv's; on
    no task more than 5 points under snapkv; no truncated numbers at 5%. Question-agnostic: >= 85% at
    10%. Summaries (either protocol): ROUGE-L against the references >= 90% of full KV's at 2% and
    >= 95% at 5%, and no off-topic summary. Each target also says whether the cells have the
    ``MIN_EXAMPLES`` examples per task the targets ask for (``enough_examples``).
    """
    out: list[dict] = []
    if length not in result.lengths:
        return out
    has = set(result.methods)
    protocol = result.protocols[0] if len(result.protocols) == 1 else "aware"
    tasks = [t for t in result.scored_tasks() if t != SUMMARY]
    full = result.average(length, FULL, FULL, tasks) if tasks else None
    enough = result.examples_at(length) >= MIN_EXAMPLES

    def pct_of_full(budget: str) -> tuple[float | None, float | None]:
        d = result.average(length, "dynamickv", budget, tasks)
        return d, (100.0 * d / full if d is not None and full else None)

    def entry(target: str, **kw) -> dict:
        return {"target": target, "length": length, "protocol": protocol, "enough_examples": enough, **kw}

    keep = [("2%", 90.0), ("5%", 98.0)] if protocol == "aware" else [("10%", 85.0)]
    for budget, need in keep if tasks else []:
        t = entry(f"{protocol} dynamickv at {budget} keeps >= {need:.0f}% of full-KV accuracy (average over tasks)")
        if "dynamickv" in has and budget in result.budgets and result.average(length, "dynamickv", budget, tasks) is not None:
            d, pct = pct_of_full(budget)
            t.update(dynamickv=_r(d), full=_r(full), pct_of_full=_r(pct), met=pct is not None and pct >= need)
        else:
            t["met"] = None
        out.append(t)
    if protocol == "aware" and tasks:
        others = [m for m in ("snapkv", "pyramidkv", "adakv") if m in has]
        t = entry("at every budget dynamickv's average >= snapkv's, pyramidkv's and adakv's", methods=others)
        if "dynamickv" in has and others:
            behind = []
            for b in result.budgets:
                d = result.average(length, "dynamickv", b, tasks)
                for m in others:
                    o = result.average(length, m, b, tasks)
                    if d is not None and o is not None and d < o:
                        behind.append({"budget": b, "method": m, "dynamickv": _r(d), m: _r(o), "gap": _r(o - d)})
            t["behind"] = behind
            t["met"] = not behind and len(others) == 3
        else:
            t["met"] = None
        out.append(t)
        t = entry("dynamickv is never more than 5 points under snapkv on any task, at any budget")
        if "dynamickv" in has and "snapkv" in has:
            worst = []
            for b in result.budgets:
                for task in tasks:
                    d = result.accuracy(length, task, "dynamickv", b)
                    sn = result.accuracy(length, task, "snapkv", b)
                    if d is not None and sn is not None and d < sn - 5.0:
                        worst.append({"budget": b, "task": task, "dynamickv": _r(d), "snapkv": _r(sn)})
            t["violations"] = worst
            t["met"] = not worst
        else:
            t["met"] = None
        out.append(t)
        t = entry("no truncated numbers at 5% (a number full KV gives whole, named in part)")
        if "dynamickv" in has and "5%" in result.budgets:
            t["truncated"] = {m: result.truncations(length, m, "5%") for m in sorted(has)}
            t["met"] = t["truncated"]["dynamickv"] == 0
        else:
            t["met"] = None
        out.append(t)
    if SUMMARY in result.tasks:
        ref = result.accuracy(length, SUMMARY, FULL, FULL)
        for budget, need in (("2%", 90.0), ("5%", 95.0)):
            t = entry(f"summaries: dynamickv at {budget} has >= {need:.0f}% of full KV's ROUGE-L and none off topic")
            d = result.accuracy(length, SUMMARY, "dynamickv", budget)
            if d is None or not ref:
                t["met"] = None
            else:
                off, n = result.off_topic_count(length, "dynamickv", budget)
                pct = 100.0 * d / ref
                t.update(rouge_l=_r(d), full=_r(ref), pct_of_full=_r(pct), off_topic=off, summaries=n)
                t["met"] = pct >= need and off == 0
            out.append(t)

    # accuracy can only show what compression keeps when the model answers with the full cache
    if full is not None and full < MIN_FULL_ACCURACY:
        for t in out:
            if "summaries" in t["target"]:
                continue
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


_NUMBER = re.compile(r"\d+")


def truncated_number(full_prediction: str, prediction: str) -> bool:
    """Full KV answered a number (2+ digits) whole and ``prediction`` names a strict part of it instead
    (a prefix or substring: "123" for "12345") without the whole number."""
    whole = [n for n in _NUMBER.findall(full_prediction) if len(n) >= 2]
    parts = _NUMBER.findall(prediction)
    return any(n not in parts and any(m != n and m in n for m in parts) for n in whole)


def can_teacher_force() -> bool:
    return hasattr(Engine, "teacher_force")


TEACHER_FORCE_MISSING = "fidelity not measured: this dynkv's Engine has no teacher_force()"


def _fidelity(
    engine: Engine, doc: CompressedDocument, question: str, ref_ids: list[int], ref_logprobs: list[float] | None
) -> tuple[list[float], float, float] | None:
    """Teacher-force ``ref_ids`` (full KV's answer) under ``doc``'s cache: (log-probs, mean gap, agreement).

    ``ref_logprobs`` None: ``doc`` is the full cache itself (the gap is then 0 by definition)."""
    if not ref_ids or not can_teacher_force():
        return None
    tf = engine.teacher_force(doc, question, list(ref_ids))
    lps = [float(lp) for lp, _ in tf]
    tops = [int(t) for _, t in tf]
    ref = lps if ref_logprobs is None else list(ref_logprobs)
    k = min(len(lps), len(ref), len(ref_ids))
    if k == 0:
        return None
    gap = statistics.fmean(ref[i] - lps[i] for i in range(k))
    agree = statistics.fmean(float(tops[i] == ref_ids[i]) for i in range(k))
    return lps, gap, agree


def run_one(
    lm: LoadedModel,
    prep: PreparedExample,
    method: str,
    budget: str,
    chunk_size: int | None,
    retention: dict,
    answer_fn: AnswerFn,
    max_new_tokens: int | None = None,
    *,
    protocol: str = "aware",
    reference: Prediction | None = None,
    model_name: str = "",
) -> Prediction:
    """Compress one prepared example with one method and budget, answer, score.

    ``protocol``: aware (the question is the probe) or agnostic (the generic probe; the question and the
    task's answer prefix are seen only when asking). ``reference``: the example's full-KV prediction,
    whose answer tokens are teacher-forced under this cache for the fidelity score (full KV: its own)."""
    ex = prep.example
    gen = GenerationSettings(max_new_tokens=max_new_tokens or answer_budget(prep))
    if prep.repetition_guard is not None:
        gen.repetition_guard = dict(prep.repetition_guard)
    base, reload = split_reload(budget)
    settings = _settings(method, FULL if method == FULL else base, chunk_size, retention)
    engine = Engine(lm, settings, gen)
    low = reload_level(budget) if reload is not None and method != FULL else None
    t0 = time.perf_counter()
    if protocol == "agnostic" and ex.task != SUMMARY:
        doc = engine.compress(
            prep.doc_ids, replace(prep.prompt, answer_prefix=""), probe=AGNOSTIC_PROBE, low_level=low
        )
        doc.prompt = prep.prompt  # asked with the question and the task's answer prefix
    elif protocol in PROTOCOLS:
        doc = engine.compress(prep.doc_ids, prep.prompt, question=ex.question, low_level=low)
    else:
        raise UsageError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    if low is not None:  # read by generate_answer: this question's selective reload
        from dynkv_cli.reload import reload_entries

        doc.bench_reload = reload_entries(reload, doc.stats.doc_tokens)
    kept_evidence = evidence_kept(doc, prep.evidence)
    out = answer_fn(engine, doc, ex, gen)
    reloaded = None
    if isinstance(out, str):
        text, ids, stop = out.strip(), encode(lm.tokenizer, out), ""
    else:
        text, ids, stop = out.text.strip(), list(out.token_ids), out.stop_reason
        reloaded = getattr(out, "reload", None)
    seconds = time.perf_counter() - t0
    st = doc.stats
    p = Prediction(
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
        score=0.0,
        kept_tokens=int(sum(st.kept_per_layer)),
        kept_per_layer=list(st.kept_per_layer),
        bytes=int(st.bytes_used),
        full_kv_bytes=int(st.full_kv_bytes),
        depth=ex.depth,
        seconds=round(seconds, 3),
        evidence_kept=None if kept_evidence is None else round(kept_evidence, 4),
        model=model_name or lm.name,
        protocol=protocol,
        prompt=prep.style,
        config=run_config(method, engine.chunk_size, retention),
        answer_ids=ids,
        stop_reason=stop,
        chat_template=prep.chat_template,
        reload=reloaded,
    )
    if ex.task == SUMMARY:
        from .summaries import off_topic, rouge_l

        p.score = rouge_l(ex.answer, text)
        p.rouge_full = 1.0 if reference is None else rouge_l(reference.prediction, text)
        p.off_topic = off_topic(text, ex.document)
    else:
        p.score = float(score(ex, text, contains=prep.style == "chat"))
    # fidelity: full KV's answer teacher-forced under this cache (full KV: its own, for its log-probs)
    ref_ids = ids if reference is None else reference.answer_ids
    ref_lps = None if reference is None else reference.answer_logprobs
    if (reference is None or ref_lps is not None) and low is None:  # a reload's cache is per question: no fidelity
        fid = _fidelity(engine, doc, ex.question, ref_ids, ref_lps)
        if fid is not None:
            lps, gap, agree = fid
            if reference is None:
                p.answer_logprobs = [round(x, 5) for x in lps]
            p.fidelity_gap, p.fidelity_agreement, p.fidelity_tokens = round(gap, 5), round(agree, 4), len(lps)
    return p


def example_for(
    task: str, length: int, i: int, seed: int, tokenizer, style: str, split: str = REPORTED_SPLIT
) -> PreparedExample | None:
    """Example ``i`` of ``task`` at ``length`` (the split's seeded stream; summaries: the multi_news records)."""
    if task == SUMMARY:
        from .summaries import summary_example

        return summary_example(tokenizer, length, i, split)
    ex_seed = suite_seed(split, seed, task, length, i)
    return prepare(tokenizer, make_example(task, length, ex_seed, tokenizer), i, ex_seed, length, style)


def example_seed(task: str, length: int, i: int, seed: int, tokenizer, split: str = REPORTED_SPLIT) -> int | None:
    """The seed that names example ``i`` in a results file, without building it (None: no such example)."""
    if task == SUMMARY:
        from .summaries import summary_record_id

        return summary_record_id(tokenizer, length, i, split)
    return suite_seed(split, seed, task, length, i)


def _wants_fidelity(p: Prediction, reference: Prediction | None) -> bool:
    """A stored cell without a fidelity score that could have one now."""
    if p.fidelity_gap is not None or not can_teacher_force() or split_reload(p.budget)[1] is not None:
        return False  # a reload's cache is built per question: no fidelity score to add
    if p.method == FULL:
        return bool(p.answer_ids)
    return reference is not None and bool(reference.answer_ids) and reference.answer_logprobs is not None


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
    protocols: Sequence[str] = ("aware",),
    prompt: str = "chat",
    results: ResultsFile | str | None = None,
) -> QualityResult:
    """Measure every protocol x method x budget on the same examples (generated once per task x length,
    eval split).

    ``full`` runs once per example and serves every budget and protocol. Each document is tokenised once.
    With ``keep_going`` a method that raises is recorded in ``errors`` and skipped from then on.
    ``results`` (a JSON-lines file, :class:`ResultsFile`): every prediction is appended as it is made,
    cells already there are read instead of run, and the result is built from the file's rows.

    Examples run in rounds (example ``i`` of every length x task, then ``i + 1``): the same examples as
    ``make_suite`` gives, in an order that keeps every cell at the same count when ``time_limit`` (seconds)
    stops the run before the next round would end past it. ``result.examples`` is the rounds completed.
    """
    if examples < 1:
        raise UsageError(f"--examples must be at least 1 (got {examples})")
    protocols = list(protocols)
    for proto in protocols:
        if proto not in PROTOCOLS:
            raise UsageError(f"unknown protocol {proto!r}; choose from {', '.join(PROTOCOLS)}")
    if prompt not in PROMPT_STYLES:
        raise UsageError(f"unknown prompt style {prompt!r}; choose from {', '.join(PROMPT_STYLES)}")
    retention = parse_method("dynamickv", retention or {}).retention()
    answer_fn = answer_fn or generate_answer
    methods = [m for m in methods if m != FULL]
    store = ResultsFile(results) if isinstance(results, (str, bytes)) or hasattr(results, "__fspath__") else results
    name = model_name or lm.name
    chunk = Engine(lm, CompressionSettings(method=FULL, budget=FULL, chunk_size=chunk_size)).chunk_size
    result = QualityResult(
        model=name,
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
        protocols=protocols,
        prompt=prompt,
    )
    t0 = time.perf_counter()
    tok = lm.tokenizer
    failed: set[str] = set()
    rounds = 0
    for i in range(examples):  # round i: example i of every length x task, so a stopped run stays balanced
        t_round = time.perf_counter()
        for length in lengths:
            for task in tasks:
                ex_seed = example_seed(task, length, i, seed, tok)
                if ex_seed is None:
                    continue  # fewer summary records than examples
                runs = [(FULL, FULL, protocols[0])] + [
                    (m, b, proto)
                    for proto in protocols
                    for m in methods
                    for b in budgets
                    if not (task == SUMMARY and proto != protocols[0])  # summaries: one protocol-free cell
                ]

                def key(method: str, budget: str, proto: str, task=task, length=length, ex_seed=ex_seed) -> tuple:
                    style = "chat" if task == SUMMARY else prompt  # summaries: always the summarize profile's
                    d = dict(model=name, prompt=style, protocol=proto, task=task, length=length, seed=ex_seed)
                    d.update(method=method, budget=budget, config=run_config(method, chunk, retention))
                    return cell_key(d)

                prep = None
                reference: Prediction | None = None
                for method, budget, proto in runs:
                    if method in failed:
                        continue
                    p = store.get(key(method, budget, proto)) if store is not None else None
                    if p is not None and _wants_fidelity(p, reference):
                        p = None  # measured before teacher_force existed: run it again, now with fidelity
                    if p is None:
                        if prep is None:
                            prep = example_for(task, length, i, seed, tok, prompt)
                        try:
                            p = run_one(
                                lm,
                                prep,
                                method,
                                budget,
                                chunk_size,
                                retention,
                                answer_fn,
                                max_new_tokens,
                                protocol=proto,
                                reference=reference,
                                model_name=name,
                            )
                        except Exception as e:  # noqa: BLE001 - one broken method must not sink the benchmark
                            if method == FULL or not keep_going:
                                raise
                            failed.add(method)
                            result.errors.append(
                                {
                                    "method": method,
                                    "budget": budget,
                                    "task": task,
                                    "length": length,
                                    "protocol": proto,
                                    "error": repr(e),
                                }
                            )
                            continue
                        if store is not None:
                            store.add(p)
                    if method == FULL:
                        reference = p
                    result.predictions.append(p)
                    if on_prediction:
                        on_prediction(p)
        rounds += 1
        now = time.perf_counter()
        if time_limit and i + 1 < examples and (now - t0) + (now - t_round) > time_limit:
            break
    result.examples = rounds
    result.seconds = time.perf_counter() - t0
    if store is not None:  # the tables come from the file: its rows for this run's cells
        wanted = {cell_key(p) for p in result.predictions}
        result.predictions = [p for p in store.predictions() if cell_key(p) in wanted]
    result.notes = notes_for(result.predictions)
    return result


NO_TEMPLATE = "the tokenizer has no chat template: the chat prompt's text was given plainly"


def notes_for(predictions: Sequence[Prediction]) -> list[str]:
    """What a reader of the tables must know about how these predictions were made."""
    notes = []
    if any(p.method == FULL and p.answer_ids and p.fidelity_gap is None for p in predictions):
        notes.append(TEACHER_FORCE_MISSING + " (for some or all cells)")
    if any(p.prompt == "chat" and p.chat_template is False for p in predictions):
        notes.append(NO_TEMPLATE)
    return notes


def runs_per_example(methods: Sequence[str], budgets: Sequence[str], protocols: int = 1) -> int:
    return 1 + len([m for m in methods if m != FULL]) * len(budgets) * protocols


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
        if t["met"] is not None and not t.get("enough_examples", True):
            status += f" (on fewer than {MIN_EXAMPLES} examples per task)"
        detail = {k: v for k, v in t.items() if k not in ("target", "met", "length", "tasks", "enough_examples")}
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


def _rows(result: QualityResult):
    """(method, budget) rows of the summary tables: full KV once, then every method x budget."""
    yield FULL, result.budgets[0] if result.budgets else FULL
    for m in result.methods:
        for b in result.budgets:
            yield m, b


def _summary_header(result: QualityResult) -> list[str]:
    cols = ["accuracy", "% of full", "log-prob gap", "top-1 agree %", "truncated numbers"]
    if SUMMARY in result.tasks:
        cols += ["ROUGE-L ref", "ROUGE-L full", "off topic"]
    return cols


def _summary_cells(result: QualityResult, row: dict) -> list[str]:
    cells = [
        _fmt(row["accuracy"]),
        _fmt(row["pct_of_full"]),
        _fmt(row["logprob_gap"], 3),
        _fmt(row["top1_agreement"]),
        str(row["truncated_numbers"]),
    ]
    if SUMMARY in result.tasks:
        cells += [_fmt(row["rouge_l_reference"]), _fmt(row["rouge_l_full"]), f"{row['off_topic']}/{row['summaries']}"]
    return cells


def title_of(result: QualityResult) -> str:
    proto = ", ".join(result.protocols)
    return (
        f"{result.model}: protocol {proto}, {result.prompt} prompt; {REPORTED_SPLIT} split reported "
        f"({TUNING_SPLIT} split kept for tuning; nothing here was tuned on {REPORTED_SPLIT})"
    )


def summary_markdown(result: QualityResult) -> list[str]:
    """Per length: method x budget averaged over tasks (accuracy absolute and % of full KV's average,
    fidelity, truncated numbers, summaries' ROUGE-L and off-topic counts), then the same per task."""
    out: list[str] = []
    st = result.summary_table()
    head = _summary_header(result)
    for n in result.lengths:
        out.append(f"#### {n} tokens: average over tasks ({', '.join(result.scored_tasks())})\n")
        out.append("| method | budget | " + " | ".join(head) + " |")
        out.append("|---|---|" + "---:|" * len(head))
        for m, b in _rows(result):
            out.append(
                f"| {m} | {b if m != FULL else '-'} | " + " | ".join(_summary_cells(result, st[str(n)][b][m])) + " |"
            )
        out.append("")
        out.append(f"#### {n} tokens: per task (accuracy % / log-prob gap / top-1 agreement % / truncated)\n")
        out.append("| method | budget | " + " | ".join(result.tasks) + " |")
        out.append("|---|---|" + "---:|" * len(result.tasks))
        for m, b in _rows(result):
            cells = []
            for t in result.tasks:
                f = result.fidelity(n, t, m, b)
                tr = result.truncations(n, m, b, t) if m != FULL else 0
                cells.append(
                    f"{_fmt(result.accuracy(n, t, m, b))} / {_fmt(f['gap'], 3)} / {_fmt(f['agreement'])} / {tr}"
                )
            out.append(f"| {m} | {b if m != FULL else '-'} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def markdown_report(result: QualityResult) -> str:
    """Per protocol: the summary tables, then the tables, the layer-budget charts and the targets as Markdown."""
    if len(result.protocols) > 1:
        return "\n".join(markdown_report(result.for_protocol(p)) for p in result.protocols)
    out = [f"### {title_of(result)}\n"]
    out.extend(f"- note: {n}" for n in result.notes)
    if result.notes:
        out.append("")
    out.extend(summary_markdown(result))
    return "\n".join(out) + "\n" + _markdown_body(result)


def _markdown_body(result: QualityResult) -> str:
    """The accuracy tables, the evidence and layer-budget tables, the charts and the targets."""
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
    tasks: str = typer.Option(
        "all",
        "--tasks",
        help="comma-separated task names (passkey, multikey, multivalue, multiquery, vartrack, aggregate, start, "
        "end or their niah_* names; summary: LongBench multi_news summaries), or all (the RULER tasks)",
    ),
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
    retention_profile: str | None = typer.Option(
        None,
        "--retention-profile",
        help="run every method with this profile's retention settings (qa: span digits); "
        "default: the methods' own defaults",
    ),
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
    protocol: str = typer.Option(
        "aware",
        "--protocol",
        help="aware: the question is the probe (one compression per question); agnostic: one compression with "
        "the qa profile's generic probe, then the question (as questions: shared and .dkv files); both",
    ),
    prompt: str = typer.Option(
        "chat",
        "--prompt",
        help="chat: the model's chat template with the qa profile's system and user text; plain: "
        "'<document>\\n<question>\\nAnswer:' (toy models)",
    ),
    results_file: str | None = typer.Option(
        None,
        "--results",
        help="a JSON-lines file: one line per prediction, appended as it is made; a rerun skips the cells "
        "already there (full KV included) and the tables are built from the file",
    ),
    from_results: list[str] | None = typer.Option(
        None, "--from-results", help="render every model and protocol of results files instead of running"
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
        if from_results:
            rows = [p for f in from_results for p in ResultsFile(f).predictions()]
            if not rows:
                raise UsageError(f"no predictions in {', '.join(from_results)}")
            return _render(results_from_rows(rows), console, err, json_out, markdown)
        protocol_list = resolve_protocols(protocol)
        if prompt not in PROMPT_STYLES:
            raise UsageError(f"--prompt must be chat or plain, not {prompt!r}")
        if threads:
            torch.set_num_threads(threads)
        task_list = resolve_tasks(tasks)
        length_list = [parse_length(w) for w in split_words(lengths)]
        if not length_list:
            raise UsageError("give at least one length (--lengths 4k,8k)")
        budget_list = resolve_budgets(budgets)
        method_list = resolve_methods(methods, mix)
        given = {"r_max": r_max, "r_min": r_min}
        base: dict = {}
        if retention_profile:
            from dynkv_cli.profiles import load_profile

            base = dict(load_profile(retention_profile).compression.retention)
        retention = parse_method(
            "dynamickv", {**base, **{k: v for k, v in given.items() if v is not None}}
        ).retention()
        model = resolve_model(model)
        lm = load_model(model, device=device, dtype=dtype)
        total = (
            len(length_list)
            * len(task_list)
            * examples
            * runs_per_example(method_list, budget_list, len(protocol_list))
        )
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
                    fid = (
                        "" if p.fidelity_gap is None else f" gap {p.fidelity_gap:.3f} agree {p.fidelity_agreement:.2f}"
                    )
                    err.print(
                        f"{p.length} {p.task} #{p.example_index} {p.protocol} {p.method} {p.budget}: "
                        f"{p.prediction[:120]!r} score {p.score:.2f}{fid} "
                        + ("(from the results file)" if p.reused else f"({p.seconds:.1f}s)"),
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
                protocols=protocol_list,
                prompt=prompt,
                results=results_file,
            )
    except DynkvError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    _render(result, console, err, json_out, markdown)


def summary_tables(result: QualityResult) -> list:
    """Rich tables of :meth:`QualityResult.summary_table`: one per length, rows = method x budget."""
    from rich.table import Table

    out = []
    st = result.summary_table()
    head = _summary_header(result)
    for n in result.lengths:
        t = Table(title=f"{title_of(result)}\naverage over tasks at {n} tokens", title_justify="left")
        t.add_column("method")
        t.add_column("budget")
        for h in head:
            t.add_column(h, justify="right")
        for m, b in _rows(result):
            t.add_row(m, b if m != FULL else "-", *_summary_cells(result, st[str(n)][b][m]))
        out.append(t)
    return out


def results_from_rows(rows: list[Prediction], command: str = "") -> list[QualityResult]:
    """Results (one per model x prompt style) rebuilt from a results file's predictions, to render them."""
    groups: dict[tuple[str, str], list[Prediction]] = {}
    for p in rows:
        groups.setdefault((p.model, p.prompt), []).append(p)
    out = []
    for (model, prompt), ps in groups.items():
        order = {t: i for i, t in enumerate([*TASKS, SUMMARY])}
        tasks = sorted(dict.fromkeys(p.task for p in ps), key=lambda t: order.get(t, len(order)))
        comp = [p for p in ps if p.method != FULL]
        retention: dict = {}
        chunk = 0
        if comp and comp[0].config.startswith("chunk="):
            import json

            head, _, body = comp[0].config.partition(" ")
            chunk = int(head.removeprefix("chunk=") or 0)
            retention = json.loads(body or "{}")
        protos = list(dict.fromkeys(p.protocol for p in comp if not shared_cell(p.method, p.task))) or ["aware"]
        r = QualityResult(
            model=model,
            tasks=tasks,
            lengths=sorted({p.length for p in ps}),
            budgets=list(dict.fromkeys(p.budget for p in comp)),
            methods=list(dict.fromkeys(p.method for p in comp)),
            examples=max(p.example_index for p in ps) + 1,
            seed=0,
            chunk_size=chunk,
            num_layers=len(ps[0].kept_per_layer),
            command=command,
            retention=retention,
            predictions=ps,
            protocols=[x for x in PROTOCOLS if x in protos],
            prompt=prompt,
        )
        r.notes = notes_for(ps)
        out.append(r)
    return out


def _render(
    result: QualityResult | list[QualityResult], console, err, json_out: str | None, markdown: str | None
) -> None:
    import json
    from pathlib import Path

    results = result if isinstance(result, list) else [result]
    for r in results:
        for proto in r.protocols:
            pr = r.for_protocol(proto) if len(r.protocols) > 1 else r
            _render_console(pr, console)
        for e in r.errors:
            err.print(
                f"[yellow]{e['method']} failed[/yellow] ({e['task']}, {e['length']}, {e['budget']}, "
                f"{e.get('protocol', 'aware')}): {e['error']}"
            )
            err.print("  its later runs were skipped; its cells show '-'", highlight=False)
        for n in r.notes:
            err.print(f"note: {n}", highlight=False, markup=False)
        console.print(f"{len(r.predictions)} predictions in {r.seconds:.0f}s", highlight=False)
    if json_out:
        path = Path(json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = results[0].to_dict() if len(results) == 1 else {"models": [r.to_dict() for r in results]}
        path.write_text(json.dumps(data, indent=1) + "\n")
        console.print(f"wrote {path}", highlight=False)
    if markdown:
        path = Path(markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        if len(results) == 1:
            text = markdown_report(results[0])
        else:
            text = "\n".join(f"## {r.model}\n\n" + markdown_report(r) for r in results)
        path.write_text(text)
        console.print(f"wrote {path}", highlight=False)


def _render_console(result: QualityResult, console) -> None:
    for t in summary_tables(result):
        console.print(t)
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
