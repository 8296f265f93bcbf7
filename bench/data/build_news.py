"""Build news.jsonl.gz, the real text of the task generator's haystacks, from LongBench multi_news.

    python bench/data/build_news.py path/to/multi_news.jsonl [--out bench/data/news.jsonl.gz]

Reads records 100..199 of the LongBench multi_news file (``context``: several news articles, each
after a "Passage N:" line; ``NEWLINE_CHAR`` stands for a newline). Records 0..99 are left for
summarization benchmarks, so no haystack shares text with a summarization example. Every article
becomes one line of JSON, ``{"record": i, "passage": n, "paragraphs": [[sentence, ...], ...]}``:
paragraphs are split at the newlines, sentences at a full stop, question or exclamation mark followed
by a space and a capital letter, a digit or an opening quote (not after a common abbreviation or an
initial). Paragraphs without a letter ("___") and repeats of an earlier paragraph (site boilerplate)
are dropped, and so is any sentence that contains a phrase the tasks' needles use. The output is
byte-for-byte reproducible (gzip with no timestamp).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from pathlib import Path

FIRST, LAST = 100, 199  # record indices, both included
#: phrases of the needles and questions (tasks.py); a sentence containing one is dropped
NEEDLE_PHRASES = ("pass key", "magic number", "marked word", "var ", "final code", "author of this report", "answer:")
ABBREVIATIONS = set(
    "mr mrs ms dr st jr sr gov sen rep gen lt col sgt capt cmdr adm prof rev mt ft inc co corp ltd no vs etc "
    "jan feb mar apr aug sept sep oct nov dec approx dept est fig al".split()
)
_PASSAGE = re.compile(r"(?:^|\n)Passage \d+:\n")
_END = re.compile(r"[.!?][\"'”’)\]]*(?=\s+[\"'“‘(\[]?[A-Z0-9])")


def sentences(paragraph: str) -> list[str]:
    out, start = [], 0
    for m in _END.finditer(paragraph):
        before = re.search(r"([A-Za-z]+)\.?[\"'”’)\]]*$", paragraph[start : m.end()])
        word = before.group(1) if before else ""
        if paragraph[m.start()] == "." and (word.lower() in ABBREVIATIONS or len(word) == 1):
            continue  # "Mr. Smith", "U.S. Army", "C.B. Thomas"
        out.append(paragraph[start : m.end()].strip())
        start = m.end()
    out.append(paragraph[start:].strip())
    return [s for s in out if s]


def articles(records: list[dict]):
    seen: set[str] = set()
    for i in range(FIRST, LAST + 1):
        parts = _PASSAGE.split(records[i]["context"].replace("NEWLINE_CHAR", "\n"))
        for n, text in enumerate((p for p in parts if p.strip()), 1):
            paragraphs = []
            for raw in text.split("\n"):
                para = " ".join(raw.split())
                if not re.search(r"[A-Za-z]", para) or para in seen:
                    continue
                seen.add(para)
                sents = [s for s in sentences(para) if not any(ph in s.lower() for ph in NEEDLE_PHRASES)]
                if sents:
                    paragraphs.append(sents)
            if paragraphs:
                yield {"record": i, "passage": n, "paragraphs": paragraphs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="LongBench multi_news.jsonl")
    ap.add_argument("--out", default=str(Path(__file__).with_name("news.jsonl.gz")))
    args = ap.parse_args()
    with open(args.source, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    lines = [json.dumps(a, ensure_ascii=False) + "\n" for a in articles(records)]
    with open(args.out, "wb") as raw, gzip.GzipFile("news.jsonl", "wb", 9, raw, mtime=0) as gz:
        gz.write("".join(lines).encode("utf-8"))
    n_sent = sum(len(p) for a in map(json.loads, lines) for p in a["paragraphs"])
    print(f"{args.out}: {len(lines)} articles, {n_sent} sentences, {Path(args.out).stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
