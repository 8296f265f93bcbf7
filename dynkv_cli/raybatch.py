"""`dynkv batch --workers N`: the batch's documents done by a pool of Ray workers.

The driver (the ``dynkv batch`` process) keeps every contract of :mod:`dynkv_cli.batch`: it reads
and locks ``--out``, decides what is to be done, and writes every line itself (flushed and fsynced).
Workers only compute: each is a Ray actor that loads the model once (:class:`WorkerSpec`) and is
given one document at a time; it returns the :class:`~dynkv_cli.tasks.TaskResult`.

* ``address=None`` starts a local Ray instance (stopped again by :meth:`RayPool.close`); an address
  (``auto``, ``ray://host:10001``, ``host:6379``) joins a running cluster, which is left running.
* A worker process that dies (killed, out of memory, a crash in native code) is replaced by a new
  actor (it loads the model again) and its document is given out again once; a second death on the
  same document records it as failed (:class:`WorkerDiedError`).
* A document that cannot be opened never reaches a worker: its error record is made by the driver.
* Ray is imported only here and only when a pool starts; without it :func:`import_ray` says how
  to install it.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from .batch import _source, batch_settings, run_one
from .documents import DocumentError
from .errors import DynkvError, ModelLoadError, UsageError
from .tasks import TaskResult, failed

RAY_INSTALL = "pip install 'dynkv[ray]'"
ATTEMPTS = 2  # a document is given to a worker at most this many times when workers die on it
START_TIMEOUT = 600.0  # seconds for every worker to be placed and load the model


class WorkerDiedError(DynkvError):
    """A worker process died twice while it worked on this document (killed, out of memory, a crash)."""


def import_ray():
    """The ``ray`` module, or a :class:`UsageError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"--workers and --ray-address need Ray, which is not installed: run `{RAY_INSTALL}`") from None
    return ray


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its :class:`~dynkv_cli.tasks.TaskRunner` (sent to every worker)."""

    model: str | None
    profile: object  # a Profile (flags already applied)
    device: str | None = None
    dtype: str | None = None
    trust_remote_code: bool = False
    max_cache: str | None = None
    threads: int | None = None  # torch CPU threads in each worker; None: torch's default
    debug: bool = False


@dataclass
class WorkerInfo:
    """One worker as the driver sees it (for progress and for tests)."""

    index: int
    pid: int | None = None
    node: str | None = None
    current: str | None = None  # the source of the document it works on
    started: float | None = None
    done: int = 0
    restarts: int = 0


@dataclass
class PoolStats:
    started_seconds: float = 0.0  # ray.init plus every worker's model load (the pool's start-up cost)
    restarts: int = 0  # workers replaced after they died
    retried: int = 0  # documents given out again after a worker died on them
    workers_lost: list[str] = field(default_factory=list)  # why each replaced worker died (Ray's words)


class _Worker:
    """The actor's body: one model, one runner, one document at a time (wrapped by ``ray.remote``)."""

    def __init__(self, spec: WorkerSpec):
        self.error: tuple[str, str] | None = None
        self.runner = None
        try:
            from .documents import set_debug
            from .model import load_model
            from .tasks import TaskRunner

            set_debug(spec.debug)
            if not spec.debug:
                import warnings

                warnings.filterwarnings("ignore")
            if spec.threads:
                import torch

                torch.set_num_threads(spec.threads)
            lm = load_model(spec.model, device=spec.device, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code)
            self.runner = TaskRunner(lm, spec.profile, max_cache=spec.max_cache)
        except Exception as e:  # noqa: BLE001 - reported by ready(), raised in the driver
            self.error = (type(e).__name__, str(e) or type(e).__name__)

    def ready(self) -> dict:
        import socket

        return {"pid": os.getpid(), "node": socket.gethostname(), "error": self.error}

    def settings(self, task: str, questions: Sequence[str]) -> dict:
        return batch_settings(self.runner, task, questions)

    def run(self, item, task: str, questions: Sequence[str], debug: bool) -> TaskResult:
        return run_one(self.runner, item, task, questions, debug)


class RayPool:
    """``workers`` Ray actors running ``spec``'s runner; see the module doc.

    ``on_event(kind, worker, text)`` is told ``"start"`` (the worker took document ``text``),
    ``"done"``, ``"lost"`` (the worker died: Ray's reason) and ``"ready"`` (a worker, new or
    replacing one, has loaded the model).
    """

    def __init__(
        self,
        spec: WorkerSpec,
        workers: int,
        *,
        address: str | None = None,
        gpus_per_worker: float | None = None,
        cpus_per_worker: float | None = None,
        on_event: Callable[[str, WorkerInfo, str], None] | None = None,
    ):
        if workers < 1:
            raise UsageError(f"--workers {workers}: give at least 1 worker")
        self.spec = spec
        self.workers = workers
        self.address = address
        self.gpus_per_worker = gpus_per_worker
        self.cpus_per_worker = cpus_per_worker
        self.on_event = on_event
        self.info = [WorkerInfo(i) for i in range(workers)]
        self.stats = PoolStats()
        self._ray = None
        self._actor_cls = None
        self._actors: list = []
        self._started_ray = False
        self.started_once = False  # start() succeeded (the stats mean something)

    # ---- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> RayPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def started(self) -> bool:
        return bool(self._actors)

    def start(self) -> RayPool:
        """Start (or join) Ray and the workers; returns when every worker has loaded the model."""
        if self._actors:
            return self
        ray = self._ray = import_ray()
        t0 = time.perf_counter()
        local = self.address is None
        if local:
            _prepare_model(self.spec.model)  # a GGUF is converted once here, not by every worker at once
        cpus = self.cpus_per_worker
        if cpus is None:
            cpus = max(1, (os.cpu_count() or 1) // self.workers) if local else 1
        if not self.spec.debug:  # Ray's own notes (token authentication, ...) are not the user's business
            import logging

            logging.getLogger("ray").setLevel(logging.ERROR)
        try:
            if not ray.is_initialized():
                kwargs = dict(include_dashboard=False, log_to_driver=self.spec.debug, configure_logging=False)
                if local:
                    kwargs.update(num_cpus=max(os.cpu_count() or 1, int(cpus * self.workers)))
                    kwargs.update(object_store_memory=_LOCAL_OBJECT_STORE)
                ray.init(address=self.address, **kwargs)
                self._started_ray = local
        except Exception as e:  # noqa: BLE001 - ConnectionError, RuntimeError, ...
            where = "a local Ray instance" if local else f"the Ray cluster at {self.address}"
            raise DynkvError(f"cannot start {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        gpus = self.gpus_per_worker
        if gpus is None:
            gpus = 1 if (self.spec.device or "").lower() != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1 else 0
        self._actor_cls = ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=0)(_Worker)
        if not self.spec.threads and not gpus:  # CPU workers: as many torch threads as Ray CPUs
            self.spec = replace(self.spec, threads=max(1, int(cpus)))
        try:
            self._actors = [self._actor_cls.remote(self.spec) for _ in range(self.workers)]
            readies = ray.get([a.ready.remote() for a in self._actors], timeout=START_TIMEOUT)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise DynkvError(
                f"the {self.workers} worker(s) did not start within {START_TIMEOUT:.0f} s: Ray has no room for "
                f"{self.workers} x {cpus:g} CPU(s){f' and {gpus:g} GPU(s)' if gpus else ''} (free: "
                f"{_free(ray)}); use fewer --workers or a smaller --cpus-per-worker"
            ) from None
        except BaseException:
            self.close()
            raise
        for info, ready in zip(self.info, readies):
            if ready["error"]:
                self.close()
                kind, msg = ready["error"]
                raise (ModelLoadError if kind == "ModelLoadError" else DynkvError)(f"worker {info.index}: {msg}")
            info.pid, info.node = ready["pid"], ready["node"]
            self._event("ready", info, "")
        self.stats.started_seconds = time.perf_counter() - t0
        self.started_once = True
        return self

    def close(self) -> None:
        """Stop the workers, and the local Ray instance if this pool started it."""
        ray = self._ray
        if ray is None:
            return
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001, S110 - already dead
                pass
        self._actors = []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
        self._ray = None

    # ---- work ----------------------------------------------------------------------------------
    def settings(self, task: str, questions: Sequence[str]) -> dict:
        """The record settings (model, fingerprint, chunk size, ...), as a worker computes them."""
        self.start()
        return self._ray.get(self._actors[0].settings.remote(task, list(questions)))

    def run(
        self,
        jobs: Sequence,
        task: str,
        questions: Sequence[str],
        debug: bool,
        item_of: Callable[[object], object],
        started: Callable[[object], None] | None = None,
    ) -> Iterator[tuple[object, TaskResult]]:
        """Yield ``(job, result)`` as workers finish; ``item_of(job)`` is the Document (or DocumentError)."""
        self.start()
        ray = self._ray
        from ray.exceptions import RayTaskError

        died = _died_errors(ray)
        queue = deque(jobs)
        attempts: dict[int, int] = {}
        idle = deque(range(self.workers))
        busy: dict = {}  # ref -> ("run", worker, job) or ("ready", worker, None)
        profile = getattr(self.spec.profile, "name", "")
        while queue or busy:
            while idle and queue:
                job = queue.popleft()
                item = item_of(job)
                source = _source(item)
                if isinstance(item, DocumentError):  # nothing for a worker to do
                    yield job, failed(source, task, profile, item)
                    continue
                w = idle.popleft()
                info = self.info[w]
                info.current, info.started = source, time.perf_counter()
                busy[self._actors[w].run.remote(item, task, list(questions), debug)] = ("run", w, job)
                if started:
                    started(job)
                self._event("start", info, source)
            if not busy:
                break
            ready, _ = ray.wait(list(busy), num_returns=1)
            ref = ready[0]
            kind, w, job = busy.pop(ref)
            info = self.info[w]
            if kind == "ready":
                try:
                    answer = ray.get(ref)
                except died as e:
                    raise DynkvError(f"worker {w} could not be restarted: {_first_line(e)}") from e
                if answer["error"]:
                    raise DynkvError(f"worker {w} could not be restarted: {answer['error'][1]}")
                info.pid, info.node = answer["pid"], answer["node"]
                self._event("ready", info, "")
                idle.append(w)
                continue
            source = info.current or ""
            info.current = info.started = None
            try:
                result = ray.get(ref)
            except died as e:  # the process is gone: replace it, give the document out again (once)
                why = _first_line(e)
                self.stats.restarts += 1
                self.stats.workers_lost.append(why)
                info.restarts += 1
                self._event("lost", info, why)
                key = id(job)
                attempts[key] = attempts.get(key, 1) + 1
                if attempts[key] <= ATTEMPTS:
                    self.stats.retried += 1
                    queue.appendleft(job)
                else:
                    err = WorkerDiedError(
                        f"the worker died {ATTEMPTS} times while on this document ({why}); "
                        "it may need more memory than a worker has: run it alone or with fewer --workers"
                    )
                    yield job, failed(source, task, profile, err)
                busy[self._replace(w)] = ("ready", w, None)
                continue
            except RayTaskError as e:  # an exception the worker's run() let through (--debug)
                cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else e
                result = failed(source, task, profile, cause)
            info.done += 1
            self._event("done", info, source)
            idle.append(w)
            yield job, result

    def _replace(self, w: int):
        """A new actor for worker ``w``; returns the ref of its ready() (it loads the model meanwhile)."""
        try:
            self._ray.kill(self._actors[w], no_restart=True)
        except Exception:  # noqa: BLE001, S110 - it is dead already
            pass
        self._actors[w] = self._actor_cls.remote(self.spec)
        return self._actors[w].ready.remote()

    def _event(self, kind: str, info: WorkerInfo, text: str) -> None:
        if self.on_event:
            self.on_event(kind, info, text)


_LOCAL_OBJECT_STORE = 256 * 2**20  # documents and results are small; Ray's default takes 30% of memory


def _prepare_model(model: str | None) -> None:
    """Convert a GGUF model before the workers start (they would otherwise all convert it at once)."""
    from pathlib import Path

    from . import catalog, ggufmodel

    path = Path(model).expanduser() if model else catalog.default_model_file()
    if path is None:
        return  # the workers say the default model is not installed
    path = Path(path)
    gguf = None
    if path.is_file() and ggufmodel.is_gguf(path):
        gguf = path
    elif path.is_dir() and not (path / "config.json").is_file():
        try:
            gguf = ggufmodel.find_gguf(path)
        except ModelLoadError:
            return  # the workers say what is wrong
    if gguf is not None:
        try:
            ggufmodel.dequantized_folder(gguf, None)
        except ModelLoadError:
            return  # the workers say what is wrong, as a single process would


def _free(ray) -> str:
    try:
        free = ray.available_resources()
    except Exception:  # noqa: BLE001
        return "unknown"
    return ", ".join(f"{free.get(k, 0):g} {k}" for k in ("CPU", "GPU"))


def _died_errors(ray) -> tuple[type[BaseException], ...]:
    """The Ray errors that mean a worker process is gone (not an exception inside a document)."""
    from ray import exceptions as rx

    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "OutOfMemoryError")
    return tuple(getattr(rx, n) for n in names if isinstance(getattr(rx, n, None), type))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line[:300]
    return type(e).__name__
