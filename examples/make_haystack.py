"""Write examples/haystack.txt: a 30,000-token pass-key haystack from dynkv's task suite (seeded).

    python examples/make_haystack.py [--tokens 30000] [--seed 20261123]

The pass key of the bundled file (seed 20261123) is 81025.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import AutoTokenizer

from dynkv_cli.bench.tasks import format_prompt, make_example

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=30000)
    ap.add_argument("--seed", type=int, default=20261123)
    ap.add_argument("--model", default=str(HERE / "model"), help="whose tokenizer measures the length")
    ap.add_argument("--out", default=str(HERE / "haystack.txt"))
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    ex = make_example("niah_single", args.tokens, args.seed, tok)
    document, _ = format_prompt(ex)
    Path(args.out).write_text(document, encoding="utf-8")
    print(f"{args.out}: {len(tok(document)['input_ids']):,} tokens; question {ex.question!r}, answer {ex.answer}")


if __name__ == "__main__":
    main()
