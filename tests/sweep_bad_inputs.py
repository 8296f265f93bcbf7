"""The bad-input sweep: every kind of bad input through the installed `dynkv`, one table of what it says.

    python tests/sweep_bad_inputs.py --out docs/bad-inputs.md [--model-gguf PATH] [--keep DIR]

Each case runs `dynkv ...` as a subprocess in a scratch folder (a tiny random model built here,
small documents and PDFs made here; the default model's GGUF file when installed, for the GGUF
cases) and records the exit code, the lines on stderr and whether they are what dynkv promises: one
line starting with `error:` (or `warning:` lines before it), no traceback, a non-zero exit code.
Not a test (pytest does not collect it): a record for people, rerun after changing messages.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from pdfmaker import corrupt_pdf, drawing_pdf, encrypted_copy, text_pdf  # noqa: E402
from tiny import make_model, text_of  # noqa: E402


def build(root: Path, gguf: Path | None) -> dict[str, str]:
    """Make every input the cases use; return names -> paths (as strings)."""
    p: dict[str, str] = {}
    model = make_model(root / "model", layers=2)
    p["model"] = str(model)
    short = make_model(root / "short-model", layers=2, max_pos=160)
    p["short_model"] = str(short)
    p["other_model"] = str(make_model(root / "other-model", layers=2, seed=1))
    doc = root / "doc.txt"
    doc.write_text(text_of(200) + "\nThe pass key is 4711.\n", encoding="utf-8")
    p["doc"] = str(doc)
    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text("   \n\n  \n")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (root / "notes.docx").write_bytes(b"PK\x03\x04 not really a docx")
    (root / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me, the pass key is 4711.\n".encode("latin-1"))
    long_doc = root / "long.txt"
    long_doc.write_text(text_of(600), encoding="utf-8")
    p["long"] = str(long_doc)
    text_pdf(root / "ok.pdf", [text_of(80), text_of(80, seed=2)])
    drawing_pdf(root / "images.pdf", 3)
    encrypted_copy(root / "ok.pdf", root / "locked.pdf", "secret")
    corrupt_pdf(root / "corrupt.pdf")
    (root / "fake.pdf").write_text("this is not a pdf")
    (root / "records.jsonl").write_text(json.dumps({"context": text_of(60)}) + "\n{not json\n", encoding="utf-8")
    (root / "folder").mkdir()
    (root / "not-a-model").mkdir()
    (root / "not-a-model" / "readme.txt").write_text("hello")
    pickle_model = make_model(root / "pickle-model", layers=1)
    for f in pickle_model.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    broken = make_model(root / "broken-model", layers=1)
    st = next(broken.glob("*.safetensors"))
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    (root / "text.gguf").write_text("not a gguf file")
    if gguf is not None:
        data = gguf.read_bytes()
        (root / "truncated.gguf").write_bytes(data[: len(data) // 2])
        (root / "header-only.gguf").write_bytes(data[:1000])
    (root / "bad-profile.yaml").write_text("extends: qa\nbudgett: 2%\n")
    (root / "notyaml.yaml").write_text("budget: [2%\n")
    (root / "not-a-cache.dkv").write_text("hello")
    (root / "docs").mkdir()
    (root / "docs" / "a.txt").write_text(text_of(80), encoding="utf-8")
    (root / "docs" / "b.txt").write_text("", encoding="utf-8")
    (root / "docs" / "c.png").write_bytes(b"\x89PNG\r\n")
    return p


def cases(p: dict[str, str], gguf: Path | None) -> list[tuple[str, str]]:
    """(what is bad, the command's arguments after `dynkv`)."""
    m = f"--model {p['model']}"
    fast = "--max-new-tokens 2 --chunk-size 64"
    q = '-q "What is the pass key?"'
    out = [
        ("missing document", f"qa missing.txt {q} {m} {fast}"),
        ("a folder as the document", f"qa folder {q} {m} {fast}"),
        ("empty document", f"qa empty.txt {q} {m} {fast}"),
        ("blank document (whitespace only)", f"summarize blank.txt {m} {fast}"),
        ("binary file named .txt", f"qa binary.txt {q} {m} {fast}"),
        ("unknown suffix (.docx)", f"summarize notes.docx {m} {fast}"),
        ("Latin-1 text (read with a warning)", f"qa latin1.txt {q} {m} {fast}"),
        ("image-only PDF", f"summarize images.pdf {m} {fast}"),
        ("encrypted PDF, no password", f"summarize locked.pdf {m} {fast}"),
        ("encrypted PDF, wrong password", f"summarize locked.pdf --password nope {m} {fast}"),
        ("corrupt PDF", f"summarize corrupt.pdf {m} {fast}"),
        ("text file named .pdf", f"summarize fake.pdf {m} {fast}"),
        ("JSONL record that is not JSON", f"qa 'records.jsonl#2' {q} {m} {fast}"),
        ("JSONL record out of range", f"qa 'records.jsonl#9' {q} {m} {fast}"),
        ("empty stdin", f"qa - {q} {m} {fast}"),
        ("no question", f"qa doc.txt {m}"),
        ("budget word wrong", f"qa doc.txt {q} --budget lots {m} {fast}"),
        ("budget negative", f"qa doc.txt {q} --budget -5% {m} {fast}"),
        ("budget zero", f"qa doc.txt {q} --budget 0 {m} {fast}"),
        ("budget over 100%", f"qa doc.txt {q} --budget 150% {m} {fast}"),
        ("unknown method", f"qa doc.txt {q} --method magic {m} {fast}"),
        ("unknown profile", f"qa doc.txt {q} --profile nope {m} {fast}"),
        ("profile with a mistyped key", f"qa doc.txt {q} --profile bad-profile.yaml {m} {fast}"),
        ("profile that is not YAML", f"qa doc.txt {q} --profile notyaml.yaml {m} {fast}"),
        ("chunk size zero", f"qa doc.txt {q} --chunk-size 0 {m}"),
        ("max new tokens zero", f"qa doc.txt {q} --max-new-tokens 0 {m}"),
        ("unknown device", f"qa doc.txt {q} --device tpu {m} {fast}"),
        ("CUDA asked, none here", f"qa doc.txt {q} --device cuda {m} {fast}"),
        ("unknown dtype", f"qa doc.txt {q} --dtype int3 {m} {fast}"),
        ("model path missing", f"qa doc.txt {q} --model ./no-such-model {fast}"),
        ("model folder without config.json", f"qa doc.txt {q} --model not-a-model {fast}"),
        ("model with pickle weights only", f"qa doc.txt {q} --model pickle-model {fast}"),
        ("model with truncated safetensors", f"qa doc.txt {q} --model broken-model {fast}"),
        ("a text file as the model", f"qa doc.txt {q} --model doc.txt {fast}"),
        ("a text file named .gguf", f"qa doc.txt {q} --model text.gguf {fast}"),
        ("hub id while offline", f"qa doc.txt {q} --model some-org/no-such-model {fast}"),
        (
            "a document longer than the model's positions",
            f"qa long.txt {q} --model {p['short_model']} --max-new-tokens 2 --chunk-size 32",
        ),
        ("a cache file that is not a cache", f"qa not-a-cache.dkv {q} {m} {fast}"),
        ("a cache made with another model", f"qa cache.dkv {q} --model {p['other_model']} {fast}"),
        ("a cache whose tensor bytes were overwritten", f"qa damaged.dkv {q} {m} {fast}"),
        ("info --verify of that damaged cache", "info damaged.dkv --verify"),
        ("a cache that cannot fit --max-cache", f"qa doc.txt {q} --budget full --max-cache 1KiB {m} {fast}"),
        ("-o is the input document", f"qa doc.txt {q} -o doc.txt {m} {fast}"),
        ("-o in a folder that does not exist", f"qa doc.txt {q} -o nowhere/a.txt {m} {fast}"),
        ("compress -o onto its own input", f"compress doc.txt -o doc.txt {m} {fast}"),
        ("batch --out is a document", f"batch docs --out docs/a.txt {m} {fast}"),
        ("batch --out inside the input folder", f"batch docs --out docs/results.jsonl {m} {fast}"),
        ("batch over a folder with bad documents", f"batch docs --out results.jsonl {m} {fast}"),
        ("batch --task unknown", f"batch docs --task poem --out r2.jsonl {m} {fast}"),
        ("info of a file that is not a cache", "info not-a-cache.dkv"),
        ("info of a missing file", "info missing.dkv"),
        ("unknown command", "summarise doc.txt"),
        ("unknown option", f"qa doc.txt {q} --budjet 2% {m}"),
    ]
    if gguf is not None:
        out += [
            ("truncated GGUF (half the file)", f"qa doc.txt {q} --model truncated.gguf {fast}"),
            ("GGUF cut after its first 1000 bytes", f"qa doc.txt {q} --model header-only.gguf {fast}"),
        ]
    return out


def run_case(cmd: str, cwd: Path, env: dict[str, str], timeout: int) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    argv = [sys.executable, "-c", "from dynkv_cli.cli import main; main()", *shlex.split(cmd)]
    try:
        r = subprocess.run(
            argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        return r.returncode, r.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        return -1, "(timed out)", time.perf_counter() - t0


def verdict(code: int, stderr: str, cmd: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    if cmd.startswith("batch") and code == 1 and "Traceback" not in stderr:
        # a batch reports each document on its own line and goes on; exit 1 when any failed
        return "ok" if any("failed" in line for line in lines) else "not one error line"
    if code == 0:
        return "ok" if not any(line.startswith("error:") for line in lines) else "error but exit 0"
    if "Traceback" in stderr:
        return "TRACEBACK"
    errors = [line for line in lines if line.startswith("error:")]
    if len(errors) != 1 or not lines[-1].startswith("error:"):
        return "not one error line"
    if "a bug?" in errors[0]:
        return "reported as a bug"
    return "ok"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/bad-inputs.md")
    ap.add_argument("--model-gguf", default=None, help="a GGUF file for the GGUF cases (default: SmolLM2 if installed)")
    ap.add_argument("--keep", default=None, help="build the inputs in this folder and keep it")
    ap.add_argument("--timeout", type=int, default=300)
    args = ap.parse_args()
    if args.model_gguf:
        gguf = Path(args.model_gguf)
    else:
        from dynkv_cli.catalog import default_model_file

        gguf = default_model_file()
    root = Path(args.keep or tempfile.mkdtemp(prefix="dynkv-sweep-"))
    root.mkdir(parents=True, exist_ok=True)
    paths = build(root, gguf)
    env = {
        **os.environ,
        "DYNKV_CONFIG_DIR": str(root / "config"),
        "DYNKV_CACHE_DIR": str(root / "cache"),
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("DYNKV_MODEL", None)
    # the cache made with one model, for the "another model" case
    code, err, _ = run_case(
        f"compress doc.txt -o cache.dkv --model {paths['model']} --chunk-size 64", root, env, args.timeout
    )
    if code != 0:
        raise SystemExit(f"could not make cache.dkv: {err}")
    data = bytearray((root / "cache.dkv").read_bytes())
    data[-64:] = bytes(64)  # the last tensor's bytes, the header untouched
    (root / "damaged.dkv").write_bytes(bytes(data))
    rows = []
    for what, cmd in cases(paths, gguf):
        code, err, secs = run_case(cmd, root, env, args.timeout)
        said = ("error:", "warning:") if not cmd.startswith("batch") else ("error:", "warning:", "[")
        shown = [line for line in err.splitlines() if line.startswith(said)] or err.splitlines()[-1:]
        msg = " / ".join(shown).replace(str(root) + "/", "").replace(str(root), ".")
        rows.append((what, cmd.replace(str(root) + "/", ""), msg, code, verdict(code, err, cmd), secs))
        print(f"{code:>4}  {verdict(code, err, cmd):<20} {what}", file=sys.stderr)
    bad = [r for r in rows if r[4] != "ok"]
    lines = [
        "# Bad inputs: what dynkv says",
        "",
        "Every row ran `dynkv COMMAND` in a scratch folder of inputs made by the sweep (a tiny random model",
        "`model/`, `short-model/` with 160 positions, small documents and PDFs; the GGUF rows use the default",
        "model's file), with `HF_HUB_OFFLINE=1`. `--model model` stands for the tiny model's folder. The",
        "verdict is `ok` when dynkv kept its promise: one `error:` line on stderr (warnings may come first),",
        "no traceback, a non-zero exit code for a failure (2: usage, 1: runtime), or exit 0 with at most",
        "warnings for an input it can read. Regenerate it with:",
        "",
        "    python tests/sweep_bad_inputs.py --out docs/bad-inputs.md",
        "",
        f"{len(rows)} cases, {len(rows) - len(bad)} ok, {len(bad)} not ok.",
        "",
        "| input | command | what it says | exit | verdict |",
        "| --- | --- | --- | ---: | --- |",
    ]
    for what, cmd, msg, code, v, _ in rows:
        cell = msg.replace("|", "\\|")
        lines.append(f"| {what} | `dynkv {cmd}` | {cell} | {code} | {v} |")
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{len(rows)} cases, {len(bad)} not ok -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
