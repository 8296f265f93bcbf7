"""`dynkv --help`, `--version` and `<cmd> --help` stay light: no torch, no transformers, no benchmarks.

Each command runs in a fresh interpreter (an in-process run would see the modules other tests
imported); the child prints which of the heavy modules ended up in ``sys.modules``.
"""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "dynkv_bench")

CHILD = """
import json, sys
from dynkv_cli.cli import main
sys.argv = ["dynkv", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    code = e.code
else:
    code = 0
sys.stdout.flush()
print("\\n@@" + json.dumps({"code": code, "loaded": [m for m in HEAVY if m in sys.modules]}))
""".replace("HEAVY", repr(HEAVY))


def run_dynkv(*args: str, tmp_path) -> tuple[str, dict]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    out, _, tail = proc.stdout.rpartition("\n@@")
    assert tail, proc.stdout + proc.stderr
    return out, json.loads(tail)


@pytest.mark.parametrize(
    "args", [["--help"], ["--version"], ["summarize", "--help"], ["qa", "--help"], ["profiles", "--help"]]
)
def test_help_and_version_import_no_torch_transformers_or_benchmarks(args, tmp_path):
    out, res = run_dynkv(*args, tmp_path=tmp_path)
    assert res["code"] == 0, out
    assert res["loaded"] == [], f"dynkv {' '.join(args)} imported {res['loaded']}"


def test_help_still_lists_bench(tmp_path):
    out, _ = run_dynkv("--help", tmp_path=tmp_path)
    from dynkv_cli.cli import BENCH_HELP

    assert any(line.split() == ["bench", *BENCH_HELP.split()] for line in out.splitlines()), out


def test_package_exports_load_lazily(tmp_path):
    code = (
        "import sys, dynkv_cli; assert 'torch' not in sys.modules; "
        "from dynkv_cli import Engine, parse_budget; from dynkv_cli import *; "
        "assert Engine.__module__ == 'dynkv_cli.engine' and 'torch' in sys.modules; "
        "print(sorted(n for n in dynkv_cli.__all__ if n not in globals()))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_lazy_bench_help_is_dynkv_bench_help():
    from dynkv_bench.cli import bench_app
    from dynkv_cli.cli import BENCH_HELP

    assert bench_app.info.help == BENCH_HELP
