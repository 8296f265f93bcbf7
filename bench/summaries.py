"""The ``summary`` task of ``dynkv bench quality``: LongBench multi_news documents summarized at each budget.

Records come from a LongBench multi_news JSON-lines file (``context``: several news articles,
``answers[0]``: the reference summary): ``$DYNKV_MULTI_NEWS``, else ``shared/data/longbench/multi_news.jsonl``
next to the checkout. Eval examples are the even records, tuning examples the odd ones (the same
``eval``/``tune`` split as the RULER tasks: nothing is tuned on what is reported). At a length of ``n``
tokens example ``i`` is the ``i``-th record of the split with at least ``n`` tokens, cut to ``n`` tokens
(at a sentence end when one is near). Without the file the bundled ``examples/katrina-forecast.txt`` is
the one example, with no reference (ROUGE-L against full KV only).

Each summary is written with the summarize profile's prompt, instruction (also the probe, in both
protocols: it is the task's own question) and generation settings, and scored with ROUGE-L F1 (the
``rouge-score`` package, stemmed) against the reference and against the full-KV summary. A summary is
*off topic* when it shares no named entity with its document (:func:`off_topic`).
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

from dynkv_cli.prompt import encode, prompt_ids

TASK = "summary"
ROOT = Path(__file__).resolve().parent.parent
#: where the multi_news records are looked for, in order (the first that exists is read)
CANDIDATES = (
    ROOT.parent / "shared" / "data" / "longbench" / "multi_news.jsonl",
    ROOT / "shared" / "data" / "longbench" / "multi_news.jsonl",
)
FALLBACK = ROOT / "examples" / "katrina-forecast.txt"


def records_path() -> Path | None:
    env = os.environ.get("DYNKV_MULTI_NEWS")
    for p in ([Path(env)] if env else []) + list(CANDIDATES):
        if p.is_file() and os.access(p, os.R_OK):
            return p
    return None


def _clean(text: str) -> str:
    text = text.replace("NEWLINE_CHAR", "\n")
    text = re.sub(r"[ \t]*\n[ \t]*", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return re.sub(r"[ \t]{2,}", " ", text).strip()


@functools.cache
def records() -> tuple[tuple[int, str, str], ...]:
    """(record index, document, reference summary); the bundled fallback has index -1 and no reference."""
    path = records_path()
    if path is None:
        if not FALLBACK.is_file():
            return ()
        return ((-1, FALLBACK.read_text(encoding="utf-8").strip(), ""),)
    out = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            r = json.loads(line)
            ref = (r.get("answers") or [""])[0]
            out.append((i, _clean(r["context"]), _clean(ref.lstrip("– -"))))
    return tuple(out)


_SELECTED: dict[tuple, list[tuple[int, str, str]]] = {}


def _split_records(split: str) -> list[tuple[int, str, str]]:
    rs = list(records())
    if len(rs) == 1 and rs[0][0] == -1:
        return rs if split == "eval" else []
    parity = 0 if split == "eval" else 1
    return [r for r in rs if r[0] % 2 == parity]


def _selected(tokenizer, length: int, split: str) -> list[tuple[int, str, str, list[int]]]:
    """The split's records with at least ``length`` tokens (the fallback: whatever its length), with ids."""
    k = (id(tokenizer), length, split)
    if k not in _SELECTED:
        out = []
        for idx, doc, ref in _split_records(split):
            if idx >= 0 and len(doc) < 2 * length:  # surely under `length` tokens: skip the tokenizer
                continue
            ids = encode(tokenizer, doc)
            if idx < 0 or len(ids) >= length:
                out.append((idx, doc, ref, ids))
        _SELECTED[k] = out
    return _SELECTED[k]


def summary_record_id(tokenizer, length: int, i: int, split: str = "eval") -> int | None:
    """The record index of example ``i`` (the seed of its cell in a results file); None: no such record."""
    sel = _selected(tokenizer, length, split)
    return sel[i][0] if i < len(sel) else None


def _cut(tokenizer, ids: list[int], length: int) -> str:
    text = tokenizer.decode(ids[:length], skip_special_tokens=True)
    if len(ids) <= length:
        return text.strip()
    end = max(text.rfind(". "), text.rfind(".\n"), text.rfind('." '))
    return (text[: end + 1] if end > 0.8 * len(text) else text).strip()


def summary_example(tokenizer, length: int, i: int, split: str = "eval"):
    """Example ``i`` of the summary task at ``length`` tokens, prepared with the summarize profile's prompt."""
    from dynkv_cli.profiles import load_profile

    from .quality import PreparedExample
    from .tasks import Example

    sel = _selected(tokenizer, length, split)
    if i >= len(sel):
        return None
    idx, _, ref, ids = sel[i]
    doc = _cut(tokenizer, ids, length)
    prof = load_profile("summarize")
    ex = Example(TASK, doc, prof.instruction, ref, [ref] if ref else [], 0.0, "")
    prompt = prof.prompt
    doc_ids = encode(tokenizer, doc)
    p = prompt_ids(tokenizer, prompt, ex.question)
    return PreparedExample(
        ex,
        i,
        idx,
        length,
        prompt,
        doc_ids,
        p.prefix,
        p.suffix,
        0,
        [],
        style="chat",
        chat_template=bool(getattr(tokenizer, "chat_template", None)) and prompt.use_chat_template,
        max_new_tokens=prof.generation.max_new_tokens,
        repetition_guard=prof.generation.repetition_guard,
    )


# ----------------------------------------------------------------------------------------------
# Scores


@functools.cache
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(reference: str, prediction: str) -> float | None:
    """ROUGE-L F1 of ``prediction`` against ``reference`` (None without a reference)."""
    if not reference or not reference.strip():
        return None
    return round(float(_scorer().score(reference, prediction)["rougeL"].fmeasure), 4)


_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
_SENTENCE_END = re.compile(r"[.!?]['\")\]]*$|^[\"'(\[]*$")


def named_entities(text: str) -> set[str]:
    """Capitalised words of 4+ letters that do not open a sentence (nor the text, nor a line)."""
    out: set[str] = set()
    for line in text.splitlines():
        prev = None
        for m in re.finditer(r"\S+", line):
            tok = m.group()
            word = _WORD.search(tok)
            at_start = prev is None or bool(_SENTENCE_END.search(prev))
            prev = tok
            if not word or at_start or word.start() > 1:
                continue
            w = word.group().strip("'-")
            if len(w) >= 4 and w[0].isupper():
                out.add(w.split("'")[0])
    return out


def off_topic(summary: str, document: str) -> bool:
    """True when no capitalised word of 4+ letters in ``summary`` (anywhere) is a named entity of the
    document (a capitalised word of 4+ letters not at a sentence start there): a summary of something else."""
    ents = named_entities(document)
    words = {w.split("'")[0].strip("'-") for w in _WORD.findall(summary)}
    return not any(len(w) >= 4 and w[0].isupper() and w in ents for w in words)
