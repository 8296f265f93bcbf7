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


def _bar(console: Console, *fields: str) -> Progress:
    """A started, transient progress display: description, bar, n/m, ``fields``, elapsed time."""
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *(TextColumn(f) for f in fields),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        redirect_stdout=False,
        redirect_stderr=False,
    )
    bar.start()
    return bar


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
            self.bar = _bar(self.console, "{task.fields[unit]}", "{task.fields[rate]}")
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


class PoolView:
    """Progress of a batch on Ray workers (stderr): documents done/total, failures, throughput, and
    each worker's current document. A live display on a terminal; plain lines otherwise."""

    def __init__(self, workers: int, *, quiet: bool = False, warn=None):
        self.console = Console(stderr=True, highlight=False)
        self.enabled = not quiet and sys.stderr.isatty()
        self.quiet = quiet
        self.warn = warn
        self.workers = workers
        self.bar: Progress | None = None
        self.total_task = None
        self.worker_tasks: dict[int, object] = {}
        self.done = 0
        self.failed = 0
        self.total: int | None = None
        self.t0: float | None = None

    def _start(self) -> Progress:
        if self.bar is None:
            self.bar = _bar(self.console, "{task.fields[info]}")
            self.total_task = self.bar.add_task("documents", total=self.total, info="")
        return self.bar

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
            self.worker_tasks.clear()

    def print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def note(self, text: str) -> None:
        if self.enabled:
            self.print(text)

    # ---- run_batch callbacks ---------------------------------------------------------------------
    def start_document(self, i: int, n: int, source: str) -> None:
        import time

        if self.total is None:
            self.total, self.t0 = n, time.perf_counter()

    def finished(self, i: int, n: int, result: TaskResult) -> None:
        import time

        self.done += 1
        self.failed += not result.ok
        if not self.enabled:
            return
        bar = self._start()
        minutes = (time.perf_counter() - (self.t0 or time.perf_counter())) / 60
        rate = f"{self.done / minutes:.1f}/min" if minutes > 0 else ""
        info = ", ".join(x for x in (f"{self.failed} failed" if self.failed else "", rate) if x)
        bar.update(self.total_task, completed=self.done, total=self.total, info=info)

    # ---- pool events -------------------------------------------------------------------------------
    def event(self, kind: str, worker, text: str) -> None:
        if kind == "lost":
            msg = f"worker {worker.index} died ({text}); a new one loads the model and its document is given out again"
            if self.bar is not None:
                self.print(f"warning: {msg}")
            elif self.warn and not self.quiet:
                self.warn(msg)
            return
        if not self.enabled:
            return
        bar = self._start()
        task = self.worker_tasks.get(worker.index)
        if task is None:
            task = self.worker_tasks[worker.index] = bar.add_task(f"  worker {worker.index}", total=None, info="")
        if kind == "start":
            bar.update(task, description=f"  worker {worker.index}: {text}", info="")
            bar.reset(task, total=None)
        elif kind == "done":
            bar.update(task, description=f"  worker {worker.index}: idle", info=f"{worker.done} done")
        elif kind == "ready":
            bar.update(task, description=f"  worker {worker.index}: ready", info="")
