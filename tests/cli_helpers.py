"""Shared pieces of the CLI tests: one tiny model per session (built on disk once), a runner, small documents."""

from __future__ import annotations

import json
from pathlib import Path

from tiny import make_model, text_of
from typer.testing import CliRunner

from dynkv_cli.cli import app

FAST = ["--max-new-tokens", "3", "--chunk-size", "128"]


def tiny_model(tmp_path_factory, name: str = "dynkv-cli-model", layers: int = 4) -> Path:
    """A tiny random Llama saved under the session's base temp folder (built once, shared by test files)."""
    path = tmp_path_factory.getbasetemp() / name
    if not (path / "config.json").is_file():
        make_model(path, layers=layers)
    return path


def write_docs(folder: Path, n: int = 2, words: int = 160) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"doc{i + 1}.txt"
        p.write_text(text_of(words, seed=i + 1) + f"\nThe pass key is {4711 + i}.\n", encoding="utf-8")
        out.append(p)
    return out


def invoke(args: list[str], input: str | None = None):
    """Run `dynkv ARGS` in-process; the result has exit_code, stdout and stderr apart."""
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def one_error_line(result) -> str:
    """The stderr of a failed command: exactly one line starting with `error: `."""
    err = result.stderr.strip()
    assert err.startswith("error: "), err
    assert "\n" not in err, err
    assert "Traceback" not in err
    return err


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
