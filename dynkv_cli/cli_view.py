"""What the CLI shows on stderr while it works: rich progress bars over prefill chunks and decoding.

Off when stderr is not a terminal or with ``--quiet``. Streamed answer text goes to stdout (the CLI
decides when: stdout is a terminal and no ``--json``/``-o``); while it streams, no bar is drawn.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .engine import Progress as EngineProgress
from .tasks import Hooks, TaskResult


class View:
    def __init__(self, quiet: bool = False):
        self.console = Console(stderr=True, highlight=False)
        self.enabled = not quiet and sys.stderr.isatty()
        self.bar: Progress | None = None
        self.task = None
        self.prefix = ""

    # ---- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> View:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self) -> Progress:
        if self.bar is None:
            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[unit]}"),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self.bar.start()
        return self.bar

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar, self.task = None, None

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(f"[dim]{text}[/dim]", markup=True, soft_wrap=True)

    def start_document(self, i: int, n: int, source: str) -> None:
        self.prefix = f"[{i}/{n}] "

    # ---- engine callbacks ----------------------------------------------------------------------
    def hooks(self, max_new_tokens: int, *, stream: bool, warn) -> Hooks:
        def phase(kind: str, what: str) -> None:
            if not self.enabled:
                return
            if kind == "compress":
                bar = self._start()
                if self.task is not None:
                    bar.remove_task(self.task)
                self.task = bar.add_task(f"{self.prefix}reading {what}", total=None, unit="tokens", rate="")
            elif stream:
                self.stop()
            elif max_new_tokens:
                bar = self._start()
                if self.task is not None:
                    bar.remove_task(self.task)
                self.task = bar.add_task(f"{self.prefix}answering", total=max_new_tokens, unit="tokens", rate="")

        def progress(p: EngineProgress) -> None:
            if self.enabled and self.bar is not None and self.task is not None:
                self.bar.update(self.task, completed=p.done, total=p.total, rate=f"{p.tokens_per_s:,.0f} tok/s")

        def token(text: str) -> None:
            if stream:
                sys.stdout.write(text)
                sys.stdout.flush()
            elif self.enabled and self.bar is not None and self.task is not None:
                self.bar.advance(self.task, 1)

        def warning(msg: str) -> None:
            if self.bar is not None:
                self.bar.console.print(f"warning: {msg}", markup=False, highlight=False, soft_wrap=True)
            else:
                warn(msg)

        return Hooks(progress=progress, phase=phase, token=token, warning=warning)

    def done(self, result: TaskResult) -> None:
        """One line about what the cache cost (terminal only)."""
        self.stop()
        s = result.stats
        if not self.enabled or s is None:
            return
        from .report import human_bytes

        kept = sum(s.kept_per_layer) / max(1, len(s.kept_per_layer))
        dec = [a.decode_tokens_per_s for a in result.answers if a.decode_tokens_per_s]
        self.note(
            f"{s.doc_tokens:,} tokens -> {kept:,.0f} kept per layer, {human_bytes(s.bytes_used)} of cache "
            f"({s.compression_ratio:,.1f}x smaller); prefill {s.prefill_tokens_per_s:,.0f} tok/s"
            + (f", decode {sum(dec) / len(dec):,.1f} tok/s" if dec else "")
        )
