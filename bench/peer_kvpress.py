"""kvpress on the examples `python -m dynkv_bench.peer export` wrote: run in kvpress's own venv.

    kv/bin/python bench/peer_kvpress.py --examples ex.jsonl --presses none,snapkv,expected,pyramidkv,snapkv-question \
        --kept 10% --threads 2 --out peer.jsonl

This file imports neither dynkv nor its benchmark package (kvpress needs ``transformers<5.3``).
For each example and press: the context (the prompt before the document + the document; for
``snapkv-question`` the question and answer prefix too) is prefilled in one forward pass inside the
press's context manager, which compresses each layer's cache as kvpress does; then the question is
fed at its original positions (what kvpress's pipeline does) and the answer decoded greedily, up
to the export's allowance or an end-of-turn token. ``--kept 10%`` is kvpress's
``compression_ratio=0.9`` (the fraction of the context removed). Peak RSS of the process during
the example (``VmHWM`` after ``/proc/self/clear_refs``) is recorded, as dynkv's benchmark records
its own. The output is JSON lines, one per (example, press), appended as made; a rerun skips what is
there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

PRESSES = ("none", "snapkv", "expected", "pyramidkv", "snapkv-question", "tova", "knorm")


def make_press(name: str, ratio: float):
    import kvpress

    if name == "none":
        return None
    if name in ("snapkv", "snapkv-question"):
        return kvpress.SnapKVPress(compression_ratio=ratio)
    if name == "expected":
        return kvpress.ExpectedAttentionPress(compression_ratio=ratio)
    if name == "pyramidkv":
        return kvpress.PyramidKVPress(compression_ratio=ratio)
    if name == "tova":
        return kvpress.TOVAPress(compression_ratio=ratio)
    if name == "knorm":
        return kvpress.KnormPress(compression_ratio=ratio)
    raise SystemExit(f"unknown press {name!r}; choose from {', '.join(PRESSES)}")


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


@torch.inference_mode()
def answer(model, ids_context: list[int], ids_question: list[int], press, max_new: int, eos: set[int]) -> tuple[list[int], int]:
    from transformers import DynamicCache

    cache = DynamicCache()
    ctx = torch.tensor([ids_context])
    # logits of the last context token only (kvpress's pipeline runs the context through the base model,
    # without the head): logits for every context token would be the largest tensor of the pass
    if press is None:
        out = model(input_ids=ctx, past_key_values=cache, use_cache=True, logits_to_keep=1)
    else:
        with press(model):
            out = model(input_ids=ctx, past_key_values=cache, use_cache=True, logits_to_keep=1)
    kept = cache.get_seq_length()
    n = len(ids_context)
    if ids_question:
        pos = torch.arange(n, n + len(ids_question)).unsqueeze(0)
        out = model(
            input_ids=torch.tensor([ids_question]), past_key_values=cache, position_ids=pos, use_cache=True, logits_to_keep=1
        )
        n += len(ids_question)
    logits = out.logits[0, -1]
    tokens: list[int] = []
    for i in range(max_new):
        t = int(torch.argmax(logits))
        if t in eos:
            break
        tokens.append(t)
        if i == max_new - 1:
            break
        pos = torch.tensor([[n + i]])
        out = model(input_ids=torch.tensor([[t]]), past_key_values=cache, position_ids=pos, use_cache=True)
        logits = out.logits[0, -1]
    return tokens, kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", required=True)
    ap.add_argument("--presses", default="none,snapkv,expected,pyramidkv,snapkv-question")
    ap.add_argument("--kept", default="10%", help="the fraction of the context kept: 10%% is compression_ratio 0.9")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, default=None, help="at most this many examples")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = float(args.kept.rstrip("%")) / 100
    ratio = round(1.0 - kept, 6)
    presses = [p.strip() for p in args.presses.split(",") if p.strip()]
    rows = [json.loads(line) for line in Path(args.examples).read_text().splitlines() if line.strip()]
    if args.limit:
        rows = rows[: args.limit]
    out = Path(args.out)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["task"], r["length"], r["example_index"], r["press"], r["kept"]))
    import kvpress
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = rows[0]["model_folder"]
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    version = getattr(kvpress, "__version__", "?")
    for row in rows:
        for name in presses:
            word = "full" if name == "none" else args.kept
            key = (row["task"], row["length"], row["example_index"], name, word)
            if key in done:
                continue
            press = make_press(name, ratio)
            context = row["prefix_ids"] + row["doc_ids"]
            question = row["suffix_ids"]
            if name == "snapkv-question":  # the question in the context: kvpress's query-aware setting
                context, question = context + question, []
            _reset_peak()
            t0 = time.perf_counter()
            ids, kv_len = answer(model, context, question, press, row["max_new_tokens"], set(row["eos_ids"]))
            seconds = time.perf_counter() - t0
            text = tok.decode(ids, skip_special_tokens=True).strip()
            rec = {
                "task": row["task"],
                "length": row["length"],
                "example_index": row["example_index"],
                "seed": row["seed"],
                "press": name,
                "kept": word,
                "compression_ratio": 0.0 if name == "none" else ratio,
                "context_tokens": len(context),
                "cache_tokens_after_prefill": kv_len,
                "prediction": text,
                "seconds": round(seconds, 2),
                "peak_rss_bytes": (_status_kib("VmHWM") or 0) * 1024,
                "kvpress": version,
            }
            with out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"{row['task']} #{row['example_index']} {name} {word}: {text[:60]!r} ({seconds:.1f}s)", flush=True)


if __name__ == "__main__":
    main()
