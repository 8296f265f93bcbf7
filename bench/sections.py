"""Divide-conquer-combine against one compressed pass, on the longest multi_news records.

    python -m dynkv_bench.sections --records 6 --budget 5% --section-tokens 2048 --json docs/results/sections-smollm2.json

For each of the ``--records`` longest LongBench multi_news records (``$DYNKV_MULTI_NEWS``, else
``shared/data/longbench/multi_news.jsonl`` next to the checkout; ``--data`` names another file), the
``summarize`` profile writes two summaries at the same budget: one compressed pass over the whole
record (``sections: off``; a record longer than the model's positions is read in compact mode) and
divide-conquer-combine (``sections: on``, ``--section-tokens`` per section). Both are scored with
ROUGE-L F1 against the reference summary (``rouge-score``, stemmed) and checked for being off topic
(no named entity shared with the document). Results append to ``--results`` (JSON lines) as they are
made and a rerun skips what is there; the table is built from that file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def longest_records(path: Path, n: int) -> list[tuple[int, str, str]]:
    """The ``n`` longest records (by characters): (record index, document, reference)."""
    from dynkv_bench.summaries import _clean

    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["context"]))[:n]
    return [(i, _clean(rows[i]["context"]), rows[i]["answers"][0]) for i in order]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dynkv_bench.sections", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: dynkv's default model (SmolLM2-135M-Instruct)")
    ap.add_argument("--data", default=None, help="a multi_news JSON-lines file")
    ap.add_argument("--records", type=int, default=6)
    ap.add_argument("--budget", default="5%")
    ap.add_argument("--method", default="dynamickv")
    ap.add_argument("--section-tokens", type=int, default=2048)
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", required=True)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import torch
    from dynkv_cli.profiles import load_profile

    from dynkv_bench.summaries import off_topic, records_path, rouge_l
    from dynkv_cli.documents import Document
    from dynkv_cli.model import load_model
    from dynkv_cli.tasks import TaskRunner

    torch.set_num_threads(args.threads)
    path = Path(args.data) if args.data else records_path()
    if path is None:
        raise SystemExit("no multi_news file: pass --data or set DYNKV_MULTI_NEWS")
    out = Path(args.results)
    done = set()
    if out.exists():
        done = {(r["record"], r["mode"]) for r in map(json.loads, out.read_text().splitlines())}
    lm = load_model(args.model)
    for rec, text, ref in longest_records(path, args.records):
        for mode in ("off", "on"):
            if (rec, mode) in done:
                continue
            profile = load_profile("summarize").with_overrides(
                method=args.method, budget=args.budget, max_new_tokens=args.max_new_tokens, sections=mode
            )
            profile.section_tokens = args.section_tokens
            runner = TaskRunner(lm, profile.validate())
            t0 = time.perf_counter()
            result = runner.summarize(Document.from_text(text, source=f"multi_news#{rec}"))
            summary = result.answers[0].text.strip()
            row = {
                "record": rec,
                "mode": mode,
                "doc_tokens": result.stats.doc_tokens,
                "max_positions": lm.max_positions,
                "compactions": result.compactions,
                "sections": len([s for s in result.sections if "stage" not in s]),
                "passes": result.passes,
                "rouge_l": round(rouge_l(ref, summary), 4),
                "off_topic": off_topic(summary, text),
                "seconds": round(time.perf_counter() - t0, 1),
                "peak_memory_bytes": result.stats.peak_memory_bytes,
                "summary": summary,
                "model": lm.name,
                "budget": args.budget,
                "method": args.method,
                "section_tokens": args.section_tokens,
            }
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"#{rec} {mode}: {row['doc_tokens']} tokens, ROUGE-L {row['rouge_l']:.3f}, "
                  f"{row['sections']} sections, {row['seconds']:.0f}s: {summary[:80]!r}", flush=True)  # fmt: skip
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summarize_rows(rows)}, indent=1) + "\n")
    return 0


def summarize_rows(rows: list[dict]) -> dict:
    by = {m: [r for r in rows if r["mode"] == m] for m in ("off", "on")}
    common = {r["record"] for r in by["off"]} & {r["record"] for r in by["on"]}
    out = {}
    for m, rs in by.items():
        rs = [r for r in rs if r["record"] in common]
        if rs:
            out[m] = {
                "records": len(rs),
                "rouge_l": round(statistics.fmean(r["rouge_l"] for r in rs), 4),
                "off_topic": sum(bool(r["off_topic"]) for r in rs),
                "seconds": round(statistics.fmean(r["seconds"] for r in rs), 1),
                "doc_tokens": round(statistics.fmean(r["doc_tokens"] for r in rs)),
            }
    return out


def table(rows: list[dict]) -> str:
    lines = ["| record | tokens | one pass ROUGE-L | sections ROUGE-L | sections | off topic (one / sections) |",
             "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    by = {(r["record"], r["mode"]): r for r in rows}
    for rec in sorted({r["record"] for r in rows}):
        a, b = by.get((rec, "off")), by.get((rec, "on"))
        if not a or not b:
            continue
        lines.append(f"| {rec} | {a['doc_tokens']} | {a['rouge_l']:.3f} | {b['rouge_l']:.3f} | {b['sections']} | "
                     f"{'yes' if a['off_topic'] else 'no'} / {'yes' if b['off_topic'] else 'no'} |")  # fmt: skip
    s = summarize_rows(rows)
    if "off" in s and "on" in s:
        lines.append(f"| mean ({s['on']['records']}) | {s['off']['doc_tokens']} | {s['off']['rouge_l']:.3f} | "
                     f"{s['on']['rouge_l']:.3f} | | {s['off']['off_topic']} / {s['on']['off_topic']} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
