"""Write examples/haystack.txt: a pass-key haystack of real news text from dynkv's task suite (seeded).

    python examples/make_haystack.py [--model PATH] [--tokens 6000] [--seed 20261123]

The length is counted with the tokenizer of --model (else $DYNKV_MODEL); with neither, with the task
generator's approximate count (about 10% fewer tokens than SmolLM2's). The bundled file was made
with SmolLM2-135M-Instruct's tokenizer (about 6,000 tokens; SmolLM2 reads up to 8,192 positions); its
pass key (seed 20261123) is 12730.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from dynkv_bench.tasks import count_tokens, format_prompt, make_example

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=20261123)
    ap.add_argument(
        "--model", default=os.environ.get("DYNKV_MODEL"), help="whose tokenizer counts the tokens [env: DYNKV_MODEL]"
    )
    ap.add_argument("--out", default=str(HERE / "haystack.txt"))
    args = ap.parse_args()
    tok = None
    if args.model:
        from dynkv_cli import load_model

        tok = load_model(args.model).tokenizer
    ex = make_example("niah_single", args.tokens, args.seed, tok)
    document, _ = format_prompt(ex)
    Path(args.out).write_text(document, encoding="utf-8")
    n = len(tok(document)["input_ids"]) if tok is not None else count_tokens([document])[0]
    how = f"{args.model}'s tokenizer" if tok is not None else "approximate count"
    print(f"{args.out}: {n:,} tokens ({how}); question {ex.question!r}, pass key {ex.answer}")


if __name__ == "__main__":
    main()
