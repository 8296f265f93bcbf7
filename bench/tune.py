"""Tune retention settings on the tuning split: accuracy, fidelity and whole numbers per setting.

    python -m dynkv_bench.tune --model PATH --length 1500 --examples 4 \\
        --methods dynamickv,snapkv --budgets 5%,10% \\
        --variant base= --variant span=span:digits --variant floor=r_min:0.2,span:digits \\
        --results tune.jsonl

Examples come from the *tune* seed stream of ``bench/tasks.py`` (never the reported eval split).
Every example is read once with full KV (its answer is the reference), then once per method x budget x
variant, question-aware (the question is the probe), with the profile's prompt, generation settings
and retention settings (a variant's settings replace the profile's). Per cell it
records exact-match accuracy, fidelity (the full-KV answer teacher-forced under the compressed cache:
mean log-prob gap and top-1 agreement, see ``Engine.teacher_force``) and whether a number full KV
answered whole came back cut (a strict prefix or part of it). Results append to a JSONL file that a
rerun resumes; the table printed at the end is built from it.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

from dynkv_bench.tasks import TASK_ALIASES, TASKS, make_suite, score


def parse_variant(text: str) -> tuple[str, dict]:
    """``floor=r_min:0.2,span:digits`` -> ("floor", {"r_min": 0.2, "span": "digits"})."""
    name, _, body = text.partition("=")
    out: dict = {}
    for item in filter(None, body.split(",")):
        k, _, v = item.partition(":")
        try:
            out[k] = int(v)
        except ValueError:
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = v
    return name, out


def truncated(full: str, pred: str) -> bool:
    """True when full KV answered a number whole and ``pred`` names only a strict part of it."""
    nums = re.findall(r"\d{3,}", full)
    got = re.findall(r"\d+", pred)
    return any(g != n and g in n for n in nums for g in got) and not any(n in got for n in nums)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dynkv_bench.tune", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--profile", default="qa", help="whose prompt, generation and retention settings to start from")
    ap.add_argument("--length", type=int, default=1500)
    ap.add_argument("--examples", type=int, default=4)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--methods", default="dynamickv,snapkv")
    ap.add_argument("--budgets", default="5%,10%")
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", required=True)
    args = ap.parse_args(argv)

    from dataclasses import replace

    import torch
    from dynkv_cli.profiles import load_profile

    from dynkv_cli import CompressionSettings, Engine, load_model

    torch.set_num_threads(args.threads)
    variants = [parse_variant(v) for v in (args.variant or ["base="])]
    lm = load_model(args.model)
    path = Path(args.results)
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            done[(r["task"], r["index"], r["method"], r["budget"], r["variant"])] = r
    profile = load_profile(args.profile)
    gen = profile.generation
    base_retention = dict(profile.compression.retention)
    names = [TASK_ALIASES.get(t, t) for t in args.tasks.split(",")]
    suite = make_suite(names, args.length, args.examples, 0, "tune", lm.tokenizer)
    counters: dict[str, int] = {}
    with path.open("a") as out:
        for ex in suite:
            i = counters[ex.task] = counters.get(ex.task, -1) + 1
            prompt = replace(profile.prompt, answer_prefix=ex.prefix)
            key = (ex.task, i, "full", "full", "-")
            full_eng = Engine(lm, CompressionSettings("full", "full", args.chunk_size), gen)
            if key not in done:
                doc = full_eng.compress(ex.document, prompt, question=ex.question)
                a = full_eng.ask(doc, ex.question)
                lp = full_eng.teacher_force(doc, ex.question, a.token_ids)
                done[key] = dict(task=ex.task, index=i, method="full", budget="full", variant="-", answer=a.text,
                                 ids=a.token_ids, logp=[x for x, _ in lp], score=score(ex, a.text, contains=True),
                                 doc_tokens=doc.stats.doc_tokens)  # fmt: skip
                out.write(json.dumps(done[key]) + "\n")
                out.flush()
            ref = done[key]
            for method in args.methods.split(","):
                for budget in args.budgets.split(","):
                    for vname, ret in variants:
                        k = (ex.task, i, method, budget, vname)
                        if k in done:
                            continue
                        t0 = time.perf_counter()
                        settings = CompressionSettings(method, budget, args.chunk_size, {**base_retention, **ret})
                        eng = Engine(lm, settings, gen)
                        doc = eng.compress(ex.document, prompt, question=ex.question)
                        a = eng.ask(doc, ex.question)
                        forced = eng.teacher_force(doc, ex.question, ref["ids"]) if ref["ids"] else []
                        gap = statistics.fmean(f - c for f, (c, _) in zip(ref["logp"], forced)) if forced else 0.0
                        agree = statistics.fmean(int(t == r) for (_, t), r in zip(forced, ref["ids"])) if forced else 1.0
                        done[k] = dict(task=ex.task, index=i, method=method, budget=budget, variant=vname,
                                       answer=a.text, score=score(ex, a.text, contains=True), gap=gap, agree=agree,
                                       truncated=truncated(ref["answer"], a.text), kept=doc.stats.kept_per_layer,
                                       seconds=round(time.perf_counter() - t0, 2))  # fmt: skip
                        out.write(json.dumps(done[k]) + "\n")
                        out.flush()
    print(table(list(done.values())))
    return 0


def table(rows: list[dict]) -> str:
    """Accuracy (and as % of full KV's on the same examples), fidelity and truncations per method x
    budget x variant, over tasks."""
    full = {(r["task"], r["index"]): r["score"] for r in rows if r["method"] == "full"}
    full_avg = statistics.fmean(full.values()) if full else 0.0
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["method"] != "full":
            cells.setdefault((r["method"], r["budget"], r["variant"]), []).append(r)
    lines = [f"full KV: {100 * full_avg:.1f}% over {len(full)} examples",
             "| method | budget | variant | n | accuracy | % of full | logp gap | top-1 | truncated |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (m, b, v), rs in sorted(cells.items()):
        acc = statistics.fmean(r["score"] for r in rs)
        ref = statistics.fmean(full[(r["task"], r["index"])] for r in rs)  # full KV on the same examples
        rel = 100 * acc / ref if ref else 0.0
        lines.append(
            f"| {m} | {b} | {v} | {len(rs)} | {100 * acc:.1f} | {rel:.0f} | "
            f"{statistics.fmean(r['gap'] for r in rs):.2f} | {statistics.fmean(r['agree'] for r in rs):.2f} | "
            f"{sum(r['truncated'] for r in rs)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
