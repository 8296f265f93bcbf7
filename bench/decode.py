"""Decode speed and memory of a real model through the task runner (one thread, greedy, no EOS stop).

    python -m dynkv_bench.decode examples/katrina-forecast.txt --budget 20% --json decode.json

Loads the model (default: SmolLM2-135M-Instruct), summarizes the document with the ``summarize``
profile at the budget and at full KV, once to warm up and once measured, with the repetition guard
off and ``max_new_tokens`` tokens allowed; prints decode tokens/s, the time to the first token, the
prefill peak RSS (the engine's) and the peak RSS of the measured task (prefill + decode, from
``VmHWM`` after resetting it through ``/proc/self/clear_refs``; 0 where that is not available).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dynkv_bench.speed import _proc_status_kib, _reset_rss_peak


def measure(doc_path: str, budgets: list[str], model: str | None, max_new_tokens: int) -> list[dict]:
    import torch
    from dynkv_cli.profiles import load_profile

    from dynkv_cli import load_model
    from dynkv_cli.documents import open_document
    from dynkv_cli.tasks import TaskRunner

    torch.set_num_threads(1)
    lm = load_model(model)
    rows = []
    for budget in budgets:
        profile = load_profile("summarize").with_overrides(budget=budget, max_new_tokens=max_new_tokens)
        profile.generation.repetition_guard = None
        runner = TaskRunner(lm, profile)
        runner.summarize(open_document(doc_path))  # warm-up
        _reset_rss_peak()
        result = runner.summarize(open_document(doc_path))
        task_peak = (_proc_status_kib("VmHWM") or 0) * 1024
        a = result.answers[0]
        rows.append(
            {
                "budget": budget,
                "tokens": len(a.token_ids),
                "stop": a.stop_reason,
                "decode_tokens_per_s": round(a.decode_tokens_per_s, 2),
                "first_token_seconds": round(a.first_token_seconds, 4),
                "prefill_peak_rss": result.stats.peak_memory_bytes,
                "task_peak_rss": task_peak,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dynkv_bench.decode", description=__doc__.splitlines()[0])
    ap.add_argument("document")
    ap.add_argument("--budget", action="append", help="budget word (repeatable; default 20%% and full)")
    ap.add_argument("--model", default=None, help="model path (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--json", default=None, help="write the rows to this file")
    args = ap.parse_args(argv)
    rows = measure(args.document, args.budget or ["20%", "full"], args.model, args.max_new_tokens)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
