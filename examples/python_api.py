"""Compress a bundled document with a model, answer from the compressed cache, print the memory saved.

python examples/python_api.py [--model PATH] [--document examples/katrina-forecast.txt] [--budget 20%]

The model is --model, else chosen as the CLI chooses it ($DYNKV_MODEL, the config file, the default model).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dynkv_cli import CompressionSettings, Engine, GenerationSettings, TaskPrompt, load_model
from dynkv_cli.userconfig import resolve_model

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a model path or hub id [env: DYNKV_MODEL]")
    ap.add_argument("--document", default=str(HERE / "katrina-forecast.txt"))
    ap.add_argument("--question", default="Who wrote the warning?")
    ap.add_argument("--budget", default="20%")
    ap.add_argument("--method", default="dynamickv")
    args = ap.parse_args()

    lm = load_model(resolve_model(args.model))
    engine = Engine(
        lm,
        CompressionSettings(method=args.method, budget=args.budget),
        GenerationSettings(max_new_tokens=32, stop=["\n"]),
    )
    # the model's chat template around the document and the question, as the CLI's profiles do
    prompt = TaskPrompt(before_document="Document:\n", after_document="\n\nQuestion: {question}")
    doc = engine.compress(Path(args.document).read_text(encoding="utf-8"), prompt, question=args.question)
    answer = engine.ask(doc, args.question)
    s = doc.stats
    print(f"answer: {answer.text.strip()}")
    print(
        f"document: {s.doc_tokens:,} tokens in {s.chunks} chunks of {s.chunk_size}, {s.prefill_tokens_per_s:,.0f} tok/s"
    )
    print(f"budget {s.budget}: {s.budget_tokens} tokens per layer per KV head on average ({s.method})")
    print(f"kept per layer: {s.kept_per_layer}")
    print(
        f"cache: {s.bytes_used / 2**20:.2f} MiB compressed vs {s.full_kv_bytes / 2**20:.2f} MiB full KV "
        f"({s.compression_ratio:.0f}x smaller); peak memory {s.peak_memory_bytes / 2**20:.0f} MiB ({s.peak_memory_kind})"
    )


if __name__ == "__main__":
    main()
