"""The peer: NVIDIA's kvpress on the quality benchmark's own examples, scored by the same rules.

kvpress needs ``transformers<5.3`` and dynkv needs 5.x, so kvpress runs in a venv of its own and the
two meet through files:

    # 1. dynkv's venv: the examples as token ids (the chat prompt `dynkv bench quality` uses)
    python -m dynkv_bench.peer export --model Q.gguf --tasks passkey,multikey --lengths 4k --examples 4 --out ex.jsonl
    # 2. kvpress's venv (python -m venv kv && kv/bin/pip install torch==2.13.0 && kv/bin/pip install -c <(echo torch==2.13.0) kvpress==0.5.5 'transformers<5.3'):
    kv/bin/python bench/peer_kvpress.py --examples ex.jsonl --presses snapkv,expected,pyramidkv,snapkv-question,none --kept 10% --out peer.jsonl
    # 3. dynkv's venv: score and compare with dynkv's rows on the same examples
    python -m dynkv_bench.peer score --examples ex.jsonl --peer peer.jsonl --results docs/results/quality-....jsonl

``export`` writes, per example, what both tools are given: the prompt before the document (system
text and chat template), the document and the prompt after it (the question and the task's answer
prefix), as ids of the model's tokenizer, plus the answer-token allowance. kvpress compresses the
context (prefix + document; with ``snapkv-question`` the question is in the context too) in one
prefill, as its pipeline does, then the question is fed and the answer decoded greedily.
``score`` rebuilds each example from its seed and scores the peer's answers exactly as
``dynkv bench quality`` scores its own; it prints one table (accuracy per task, average, percent
of each tool's own full KV, peak RSS) with dynkv's rows for the same examples from a results file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def _tokenizer(model: str):
    from transformers import AutoTokenizer

    from dynkv_cli import ggufmodel

    path = Path(model)
    folder = ggufmodel.dequantized_folder(path, None)[0] if ggufmodel.is_gguf(path) else path
    return AutoTokenizer.from_pretrained(str(folder)), folder


def export(args) -> None:
    from dynkv_bench.quality import answer_budget, example_for, parse_length, resolve_tasks

    tok, folder = _tokenizer(args.model)
    n = 0
    with open(args.out, "w", encoding="utf-8") as out:
        for length in [parse_length(w) for w in args.lengths.split(",")]:
            for i in range(args.examples):
                for task in resolve_tasks(args.tasks):
                    prep = example_for(task, length, i, args.seed, tok, "chat")
                    if prep is None:
                        continue
                    row = {
                        "task": prep.example.task,
                        "length": length,
                        "example_index": i,
                        "seed": prep.seed,
                        "prefix_ids": prep.prefix_ids,
                        "doc_ids": prep.doc_ids,
                        "suffix_ids": prep.suffix_ids,
                        "max_new_tokens": answer_budget(prep),
                        "eos_ids": sorted(_eos_ids(tok)),
                        "model_folder": str(folder),
                    }
                    out.write(json.dumps(row) + "\n")
                    n += 1
    print(f"{n} examples -> {args.out} (model folder for the peer: {folder})")


def _eos_ids(tok) -> set[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for word in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        t = tok.convert_tokens_to_ids(word)
        if isinstance(t, int) and t >= 0 and t != tok.unk_token_id:
            ids.add(t)
    return ids


def _load_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def score_rows(args) -> dict:
    from dynkv_bench.quality import example_for
    from dynkv_bench.tasks import score

    examples = {(r["task"], r["length"], r["example_index"]): r for r in _load_jsonl(args.examples)}
    tok, _ = _tokenizer(args.model) if args.model else _tokenizer(next(iter(examples.values()))["model_folder"])
    table: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    peaks: dict[str, list[int]] = defaultdict(list)
    seen: set[tuple] = set()
    cache: dict[tuple, object] = {}
    for row in _load_jsonl(args.peer):
        key = (row["task"], row["length"], row["example_index"])
        if key not in examples:
            continue
        if key not in cache:
            cache[key] = example_for(row["task"], row["length"], row["example_index"], args.seed, tok, "chat").example
        name = f"kvpress {row['press']}" + ("" if row["press"] == "none" else f" {row['kept']}")
        table[name][row["task"]].append(float(score(cache[key], row["prediction"], contains=True)))
        peaks[name].append(int(row.get("peak_rss_bytes") or 0))
        seen.add(key)
    if args.results:  # dynkv's own rows on the same examples
        for row in _load_jsonl(args.results):
            key = (row["task"], row["length"], row["example_index"])
            if key not in seen or row.get("seed") != examples[key]["seed"]:
                continue
            if args.protocol and row.get("protocol", "aware") != args.protocol and row["method"] != "full":
                continue
            name = "dynkv full" if row["method"] == "full" else f"dynkv {row['method']} {row['budget']}"
            table[name][row["task"]].append(float(row["score"]))
    return {"table": table, "peaks": peaks, "examples": len(seen)}


def score_cmd(args) -> None:
    got = score_rows(args)
    table, peaks = got["table"], got["peaks"]
    tasks = sorted({t for cells in table.values() for t in cells})
    full = {"kvpress": _avg(table.get("kvpress none", {})), "dynkv": _avg(table.get("dynkv full", {}))}
    head = ["method", *tasks, "avg", "% of own full", "n", "peak RSS GiB"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    out_rows = []
    for name in sorted(table):
        cells = table[name]
        avg = _avg(cells)
        own = full["kvpress" if name.startswith("kvpress") else "dynkv"]
        pct = None if not own or avg is None else 100 * avg / own
        n = min(len(v) for v in cells.values()) if cells else 0
        peak = max(peaks[name]) / 2**30 if peaks.get(name) else None
        row = [name, *[_f(100 * statistics.mean(cells[t])) if t in cells else "-" for t in tasks]]
        row += [_f(None if avg is None else 100 * avg), _f(pct), str(n), "-" if peak is None else f"{peak:.2f}"]
        lines.append(" | ".join(row))
        out_rows.append({"method": name, "tasks": {t: statistics.mean(v) for t, v in cells.items()}, "avg": avg,
                         "pct_of_own_full": pct, "n": n, "peak_rss_gib": peak})  # fmt: skip
    print(f"{got['examples']} examples; accuracy in percent")
    print("\n".join("| " + line + " |" for line in lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": out_rows, "command": " ".join(sys.argv)}, indent=2) + "\n")


def memory(args) -> None:
    """dynkv's peak RSS on the first exported example, measured as the peer's is (``VmHWM`` after
    ``/proc/self/clear_refs``, model weights included), question-agnostic at ``--budget``."""
    import torch

    from dynkv_bench.quality import AGNOSTIC_PROBE, chat_prompt, example_for
    from dynkv_bench.speed import _proc_status_kib, _reset_rss_peak
    from dynkv_cli.config import CompressionSettings, GenerationSettings
    from dynkv_cli.engine import Engine
    from dynkv_cli.model import load_model

    torch.set_num_threads(args.threads)
    row = _load_jsonl(args.examples)[0]
    lm = load_model(args.model or row["model_folder"])
    prep = example_for(row["task"], row["length"], row["example_index"], args.seed, lm.tokenizer, "chat")
    assert prep.prefix_ids + prep.doc_ids + prep.suffix_ids == row["prefix_ids"] + row["doc_ids"] + row["suffix_ids"]
    out = []
    for budget in args.budgets.split(","):
        method = "full" if budget == "full" else args.method
        engine = Engine(lm, CompressionSettings(method=method, budget=budget), GenerationSettings(max_new_tokens=row["max_new_tokens"]))
        prompt = chat_prompt(prep.example, answer_prefix=False)
        _reset_rss_peak()
        doc = engine.compress(prep.doc_ids, prompt, probe=AGNOSTIC_PROBE)
        doc.prompt = prep.prompt
        engine.ask(doc, prep.example.question)
        peak = (_proc_status_kib("VmHWM") or 0) * 1024
        out.append({"method": method, "budget": budget, "peak_rss_bytes": peak, "cache_bytes": doc.stats.bytes_used})
        print(f"dynkv {method} {budget}: peak RSS {peak / 2**30:.2f} GiB, cache {doc.stats.bytes_used / 2**20:.1f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": out, "example": {k: row[k] for k in ("task", "length", "example_index", "seed")},
                                               "command": " ".join(sys.argv)}, indent=2) + "\n")  # fmt: skip


def _avg(cells: dict[str, list[float]]) -> float | None:
    if not cells:
        return None
    return statistics.mean(statistics.mean(v) for v in cells.values())


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write the examples as token ids for the peer")
    e.add_argument("--model", required=True)
    e.add_argument("--tasks", default="passkey,multikey,multivalue,vartrack")
    e.add_argument("--lengths", default="4k")
    e.add_argument("--examples", type=int, default=4)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", required=True)
    s = sub.add_parser("score", help="score the peer's answers and compare")
    s.add_argument("--examples", required=True)
    s.add_argument("--peer", required=True)
    s.add_argument("--results", default=None, help="dynkv's results file with the same examples")
    s.add_argument("--protocol", default="agnostic", help="dynkv's rows of this protocol (full KV: any)")
    s.add_argument("--model", default=None, help="default: the model folder the export names")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", default=None)
    m = sub.add_parser("memory", help="dynkv's peak RSS on the first exported example, as the peer measures its own")
    m.add_argument("--examples", required=True)
    m.add_argument("--model", default=None)
    m.add_argument("--method", default="dynamickv")
    m.add_argument("--budgets", default="10%,full")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--threads", type=int, default=1)
    m.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    {"export": export, "score": score_cmd, "memory": memory}[args.cmd](args)


if __name__ == "__main__":
    main()
