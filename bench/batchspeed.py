"""Batch throughput: documents per minute in-process against N Ray workers, and Ray's start-up cost.

    python -m dynkv_bench.batchspeed --docs 16 --workers 2 --json docs/results/batch-ray-smollm2.json

Writes ``--docs`` news documents (the shipped LongBench multi_news slice, ``--words`` words each)
into a temporary folder and runs ``dynkv batch --task summarize`` on them twice, as a user would
(a subprocess each, same model and settings): in-process, then with ``--workers N`` (one CPU each
unless ``--cpus-per-worker``). For each run: the wall time of the command, the time spent on the
documents themselves (``seconds`` of the batch's ``--json`` summary), documents per minute on both,
and for Ray the start-up (``ray.init`` plus every worker's model load). Both runs must produce the
same answers (greedy decoding, the same threads per model); the table says whether they did.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path


def news_documents(n: int, words: int) -> list[str]:
    """``n`` documents of about ``words`` words from the shipped news text, one record each."""
    out = []
    with (resources.files("dynkv_bench") / "data/news.jsonl.gz").open("rb") as raw, gzip.open(raw, "rt") as f:
        for line in f:
            text = "\n\n".join(" ".join(p) for p in json.loads(line)["paragraphs"])
            out.append(" ".join(text.split(" ")[:words]))
            if len(out) == n:
                break
    return out


def run(folder: Path, out: Path, extra: list[str], model: str | None, max_new: int) -> dict:
    cmd = [sys.executable, "-c", "from dynkv_cli.cli import main; main()", "batch", str(folder), "--out", str(out),
           "--task", "summarize", "--max-new-tokens", str(max_new), "--json", "--quiet", *extra]  # fmt: skip
    if model:
        cmd += ["--model", model]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"dynkv batch failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    answers = {}
    for line in out.read_text().splitlines():
        rec = json.loads(line)
        answers[Path(rec["source"]).name] = rec["answers"][0]["answer"] if not rec["error"] else rec["error"]
    n = summary["done"]
    return {
        "documents": n,
        "wall_seconds": round(wall, 2),
        "work_seconds": summary["seconds"],
        "docs_per_min_wall": round(60 * n / wall, 2),
        "docs_per_min_work": round(60 * n / summary["seconds"], 2) if summary["seconds"] else None,
        "ray_startup_seconds": summary.get("ray_startup_seconds"),
        "answers": answers,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--words", type=int, default=600, help="words per document (SmolLM2 reads ~2k tokens well)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cpus-per-worker", type=int, default=None, help="default: this machine's cores / workers")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in-process (default: all cores)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--model", default=None, help="default: dynkv's default model (SmolLM2-135M-Instruct)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    import os

    cores = os.cpu_count() or 1
    cpus = args.cpus_per_worker or max(1, cores // args.workers)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "docs"
        folder.mkdir()
        for i, text in enumerate(news_documents(args.docs, args.words)):
            (folder / f"news{i:03d}.txt").write_text(text + "\n")
        env_threads = str(args.threads or cores)
        os.environ["OMP_NUM_THREADS"] = env_threads  # in-process: torch uses this many threads
        here = run(folder, Path(tmp) / "here.jsonl", [], args.model, args.max_new_tokens)
        ray_run = run(
            folder,
            Path(tmp) / "ray.jsonl",
            ["--workers", str(args.workers), "--cpus-per-worker", str(cpus)],
            args.model,
            args.max_new_tokens,
        )
    same = here["answers"] == ray_run["answers"]
    rows = [("in-process", f"{env_threads} threads", here), (f"{args.workers} Ray workers", f"{cpus} CPU each", ray_run)]
    print(f"{args.docs} documents of {args.words} words, summarize, {args.max_new_tokens} new tokens, {cores} cores")
    print(f"{'run':<16} {'threads':<12} {'wall s':>8} {'work s':>8} {'docs/min (wall)':>16} {'docs/min (work)':>16} {'start-up s':>11}")
    for name, threads, r in rows:
        start = "" if r["ray_startup_seconds"] is None else f"{r['ray_startup_seconds']:.1f}"
        print(f"{name:<16} {threads:<12} {r['wall_seconds']:>8.1f} {r['work_seconds']:>8.1f} "
              f"{r['docs_per_min_wall']:>16.2f} {r['docs_per_min_work'] or 0:>16.2f} {start:>11}")  # fmt: skip
    ratio_wall = ray_run["docs_per_min_wall"] / here["docs_per_min_wall"]
    ratio_work = (ray_run["docs_per_min_work"] or 0) / (here["docs_per_min_work"] or 1)
    print(f"ratio Ray / in-process: {ratio_wall:.2f} (wall), {ratio_work:.2f} (documents only); same answers: {same}")
    if args.json:
        result = {
            "docs": args.docs,
            "words": args.words,
            "max_new_tokens": args.max_new_tokens,
            "cores": cores,
            "workers": args.workers,
            "cpus_per_worker": cpus,
            "in_process": {k: v for k, v in here.items() if k != "answers"},
            "ray": {k: v for k, v in ray_run.items() if k != "answers"},
            "ratio_wall": round(ratio_wall, 3),
            "ratio_work": round(ratio_work, 3),
            "same_answers": same,
            "command": "python -m dynkv_bench.batchspeed " + " ".join(argv if argv is not None else sys.argv[1:]),
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
