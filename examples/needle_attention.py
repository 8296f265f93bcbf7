"""Where a model's attention goes when it is asked for a pass key: from the question, and while answering.

    python examples/needle_attention.py [--model PATH] [--document examples/haystack.txt] [--key 38251]

One plain (eager, uncompressed) forward over the needle profile's prompt around the document: for
every layer, the share of the question's attention (mean over the question's tokens and heads) that
falls on the key's digits. Then a greedy answer, token by token: for each answer token, the largest
share of one head's attention on the key's digits, and in which layer. Question-aware compression
scores tokens by the first number; the answer needs the digits the second finds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from dynkv_cli.profiles import load_profile

from dynkv_cli import load_model
from dynkv_cli.prompt import encode, prompt_ids

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a .gguf file or model folder (default: the default model)")
    ap.add_argument("--document", default=str(HERE / "haystack.txt"))
    ap.add_argument("--key", default="38251", help="the pass key in the document")
    ap.add_argument("--question", default="What is the pass key?")
    ap.add_argument("--answer-tokens", type=int, default=10)
    args = ap.parse_args()

    lm = load_model(args.model, dtype="fp32")
    lm.model.set_attn_implementation("eager")
    tok, text = lm.tokenizer, Path(args.document).read_text(encoding="utf-8")
    start = text.index(args.key)
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    key_tokens = [t for t, (a, b) in enumerate(offsets) if a < start + len(args.key) and b > start]
    p = prompt_ids(tok, load_profile("needle").prompt, args.question)
    doc = encode(tok, text)
    ids = p.prefix + doc + p.suffix
    lo, hi = len(p.prefix) + key_tokens[0], len(p.prefix) + key_tokens[-1] + 1
    print(f"{len(doc):,} document tokens; the key {args.key} is tokens {key_tokens}")
    with torch.no_grad():
        out = lm.model(torch.tensor([ids], device=lm.device), output_attentions=True)
        print("share of the question's attention on the key, per layer:")
        for layer, att in enumerate(out.attentions):
            share = att[0, :, -len(p.suffix) :, lo:hi].sum(-1).mean().item()
            print(f"  layer {layer:2d}: {share:.4f}")
        print("while answering (greedy): the largest share of one head's attention on the key")
        cur = list(ids)
        for _ in range(args.answer_tokens):
            o = lm.model(torch.tensor([cur], device=lm.device), output_attentions=True)
            nxt = int(o.logits[0, -1].argmax())
            best, layer = max((a[0, :, -1, lo:hi].sum(-1).max().item(), i) for i, a in enumerate(o.attentions))
            print(f"  {tok.decode([nxt])!r:8} {best:.3f} (layer {layer})")
            cur.append(nxt)


if __name__ == "__main__":
    main()
