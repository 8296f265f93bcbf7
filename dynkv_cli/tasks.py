"""The tasks: summarize, qa and rag, from documents and a profile to result records.

    runner = TaskRunner(load_model("path/to/model"), load_profile("qa"))
    result = runner.qa(open_document("report.pdf"), ["Who signed the lease?"])
    print(result.answers[0].text); print(result.to_dict())

How questions meet the cache (``profile.questions``):

* ``shared``: the document is compressed once, observed by the profile's question-agnostic probe, and
  every question is asked from that cache. A single question is compressed question-aware (nothing to
  share, and the question is the best probe there is).
* ``separate``: every question gets its own question-aware pass (the question observes each chunk).

A summary is a question too: the profile's ``instruction``, asked question-aware. RAG reads many
documents as one context; each passage starts with the profile's ``passage_header`` naming its
source, and the answer's ``[n]`` citations are mapped back to those sources.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from .config import CompressionSettings
from .documents import Document, DocumentError
from .engine import Answer, CompressedDocument, CompressStats, Engine, Progress
from .model import LoadedModel
from .profiles import Profile

DEFAULT_INSTRUCTION = "Summarize the document above in a few sentences."
DEFAULT_COMBINE = (
    "The text above holds summaries of consecutive parts of one long document, in order. Write one summary "
    "of the whole document in a few sentences. Name the main topics, people and conclusions."
)
#: sections: auto divides a document longer than this many sections (or the model's positions)
SECTIONS_FACTOR = 4


@dataclass
class Hooks:
    """Callbacks for a front end; all optional."""

    progress: Callable[[Progress], None] | None = None  # after each prefill chunk
    phase: Callable[[str, str], None] | None = None  # ("compress", source) or ("answer", question)
    token: Callable[[str], None] | None = None  # answer text as it is generated
    warning: Callable[[str], None] | None = None  # a problem that did not stop the task


@dataclass
class TaskResult:
    """One document's (or one RAG context's) result. ``to_dict()`` is the JSON record."""

    source: str
    task: str
    profile: str
    model: str = ""
    method: str = ""
    budget: str = ""
    answers: list[Answer] = field(default_factory=list)
    stats: CompressStats | None = None
    passes: int = 0
    prefill_seconds: float = 0.0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # rag: passage i+1 came from sources[i]
    error: str | None = None
    error_type: str | None = None
    compactions: int = 0  # times the positions were compressed (compact mode: longer than max_positions)
    max_positions: int | None = None  # the model's positions
    sections: list[dict] = field(default_factory=list)  # divide-conquer-combine: one entry per section summary

    @property
    def ok(self) -> bool:
        return self.error is None

    def cited(self, answer: Answer) -> list[str]:
        """The sources an answer cites as ``[n]`` (rag), in order of first mention."""
        out: list[str] = []
        for m in re.finditer(r"\[(\d+)\]", answer.text):
            i = int(m.group(1))
            if 1 <= i <= len(self.sources) and self.sources[i - 1] not in out:
                out.append(self.sources[i - 1])
        return out

    def to_dict(self) -> dict:
        answers = []
        for a in self.answers:
            d = a.to_dict()
            if self.task == "rag":
                d["cited_sources"] = self.cited(a)
            answers.append(d)
        s = self.stats
        record = {
            "source": self.source,
            "task": self.task,
            "profile": self.profile,
            "model": self.model,
            "method": self.method,
            "budget": self.budget,
            "answer": self.answers[0].text if self.answers else None,
            "answers": answers,
            "doc_tokens": s.doc_tokens if s else None,
            "budget_tokens": s.budget_tokens if s else None,
            "kept_tokens": round(sum(s.kept_per_layer) / len(s.kept_per_layer), 1) if s and s.kept_per_layer else None,
            "kept_per_layer": s.kept_per_layer if s else None,
            "bytes_used": s.bytes_used if s else None,
            "full_kv_bytes": s.full_kv_bytes if s else None,
            "compression_ratio": round(s.compression_ratio, 3) if s else None,
            "passes": self.passes,
            "prefill_seconds": round(self.prefill_seconds, 4),
            "prefill_tokens_per_s": round(s.prefill_tokens_per_s, 1) if s else None,
            "decode_seconds": round(sum(a.decode_seconds + a.first_token_seconds for a in self.answers), 4),
            "seconds": round(self.seconds, 4),
            "peak_memory_bytes": s.peak_memory_bytes if s else None,
            "compactions": self.compactions,
            "max_positions": self.max_positions,
            "warnings": self.warnings,
            "error": self.error,
        }
        if self.task == "rag":
            record["sources"] = self.sources
        if self.sections:
            record["sections"] = self.sections
        if self.error_type:
            record["error_type"] = self.error_type
        return record


def _part_texts(parts: Sequence[dict]) -> list[str]:
    out = []
    for p in parts:
        head = f"Part {p['index']}" + (f" ({p['where']})" if p.get("where") else "")
        head += f": {p['title']}" if p.get("title") else ""
        out.append(f"{head}\n{p['summary']}")
    return out


def _joined_parts(parts: Sequence[dict]) -> str:
    return "\n\n".join(_part_texts(parts))


def failed(source: str, task: str, profile: str, err: BaseException) -> TaskResult:
    """A result that records why a document could not be done."""
    kind = type(err).__name__
    return TaskResult(source=source, task=task, profile=profile, error=str(err) or kind, error_type=kind)


class TaskRunner:
    """Runs tasks with one loaded model and one profile (flags already applied to the profile)."""

    def __init__(
        self, lm: LoadedModel, profile: Profile, hooks: Hooks | None = None, *, max_cache: int | str | None = None
    ):
        """``max_cache``: the most bytes a cache may take (``2GiB``; ``off``); None: see Engine.memory_limit."""
        self.lm = lm
        self.profile = profile
        self.engine = Engine(lm, profile.compression, profile.generation, max_cache=max_cache)
        self.hooks = hooks or Hooks()

    # ---- pieces --------------------------------------------------------------------------------
    def _result(self, source: str, task: str) -> TaskResult:
        return TaskResult(
            source=source,
            task=task,
            profile=self.profile.name,
            model=self.lm.name,
            method=self.profile.method,
            budget=str(self.profile.budget),
            max_positions=self.lm.max_positions,
        )

    def _note(self, result: TaskResult, msg: str) -> None:
        """A warning of the task itself (not of a document), recorded once and shown once."""
        if msg in result.warnings:
            return
        result.warnings.append(msg)
        if self.hooks.warning:
            self.hooks.warning(msg)

    def _compacted(self, result: TaskResult, stats: CompressStats) -> None:
        """Record compact mode (the document did not fit the model's positions) on the result."""
        result.compactions = max(result.compactions, stats.compactions)
        if not stats.compactions:
            return
        n, m = stats.doc_tokens, self.lm.max_positions
        where = "is longer than" if n > m else "with the prompt does not fit"
        self._note(
            result,
            f"the document ({n:,} tokens) {where} the model's {m:,} positions; "
            f"read in compact mode (positions compressed {stats.compactions} time(s))",
        )

    def _warn(self, result: TaskResult, doc: Document, seen: int) -> int:
        for w in doc.warnings[seen:]:
            msg = f"{doc.source}: {w}"
            result.warnings.append(msg)
            if self.hooks.warning:
                self.hooks.warning(msg)
        return len(doc.warnings)

    def compress(
        self,
        doc: Document,
        *,
        question: str | None = None,
        probe: str | None = None,
        result: TaskResult | None = None,
        low_level: float | None = None,
    ) -> CompressedDocument:
        """Stream ``doc``'s segments through the engine into a compressed cache (``low_level``: keep a low
        level for selective reload, this share of each block; default: the profile's, when it reloads)."""
        if self.hooks.phase:
            self.hooks.phase("compress", doc.source)
        result = result or self._result(doc.source, self.profile.task)
        seen = self._warn(result, doc, 0)
        segments = (s.text for s in doc.segments())
        cdoc = self._compress_segments(segments, doc.fingerprint, doc.source, question, probe, result, low_level)
        self._warn(result, doc, seen)
        self._compacted(result, cdoc.stats)
        result.stats = cdoc.stats
        result.passes += 1
        result.prefill_seconds += cdoc.stats.prefill_seconds
        return cdoc

    def _compress_segments(
        self,
        segments,
        fingerprint: str | None,
        source: str,
        question: str | None,
        probe: str | None,
        result: TaskResult | None = None,
        low_level: float | None = None,
    ) -> CompressedDocument:
        def warn(msg: str) -> None:
            if result is not None:
                self._note(result, f"{source}: {msg}")
            elif self.hooks.warning:
                self.hooks.warning(f"{source}: {msg}")

        return self.engine.compress(
            segments,
            self.profile.prompt,
            question=question,
            probe=probe,
            fingerprint=fingerprint,
            source=source,
            on_progress=self.hooks.progress,
            on_warning=warn,
            low_level=low_level if low_level is not None else (self.profile.reload_level if self.profile.reload else None),
        )

    def reload_tokens(self, cdoc: CompressedDocument) -> int | None:
        """The profile's ``reload`` budget in entries per KV head for ``cdoc`` (None: off or no low level)."""
        if not self.profile.reload or cdoc.settings.spec.keeps_all:
            return None  # off, or a full cache: nothing was dropped, nothing to bring back
        if cdoc.low_level is None:
            from .errors import UsageError

            raise UsageError(
                f"{cdoc.source or 'this cache'} was read without a low level: make the .dkv file with "
                "`dynkv compress --low-level 0.25` to ask it with --reload"
            )
        from .reload import reload_entries

        return reload_entries(self.profile.reload, cdoc.stats.doc_tokens)

    def ask(self, cdoc: CompressedDocument, question: str) -> Answer:
        if self.hooks.phase:
            self.hooks.phase("answer", question)
        return self.engine.ask(cdoc, question, on_token=self.hooks.token, reload=self.reload_tokens(cdoc))

    # ---- tasks ---------------------------------------------------------------------------------
    def summarize(self, doc: Document) -> TaskResult:
        """Summarize one document with the profile's instruction (question-aware).

        With the profile's ``sections`` on (or auto, for a long document) the summary is divided,
        conquered and combined: :meth:`summarize_sections`.
        """
        if self.profile.sections != "off":
            sections = self.plan_sections(doc)
            if sections is not None:
                return self.summarize_sections(doc, sections)
        t0 = time.perf_counter()
        result = self._result(doc.source, "summarize")
        instruction = self.profile.instruction or DEFAULT_INSTRUCTION
        cdoc = self.compress(doc, question=instruction, result=result)
        result.answers.append(self.ask(cdoc, instruction))
        result.seconds = time.perf_counter() - t0
        return result

    # ---- divide, conquer, combine --------------------------------------------------------------
    def section_tokens(self) -> int:
        """Tokens per section: the profile's ``section_tokens``, else min(4096, the model's positions / 4)."""
        return self.profile.section_tokens or max(64, min(4096, self.lm.max_positions // 4))

    def _count(self, text: str) -> int:
        return len(self.lm.tokenizer(text, add_special_tokens=False)["input_ids"])

    def plan_sections(self, doc: Document):
        """The sections of ``doc`` (:mod:`dynkv_cli.sections`), or None when ``auto`` reads it in one pass
        (it is no longer than ``SECTIONS_FACTOR`` sections and fits the model's positions)."""
        from .sections import blocks_of, divide

        blocks = blocks_of(doc)
        for b in blocks:
            b.tokens = self._count(b.text)
        total = sum(b.tokens for b in blocks)
        limit = self.section_tokens()
        if self.profile.sections == "auto" and total <= SECTIONS_FACTOR * limit and total < self.lm.max_positions:
            return None
        return divide(blocks, self._count, limit)

    def summarize_sections(self, doc: Document, sections) -> TaskResult:
        """Divide-conquer-combine: a compressed pass per section gives its summary (the profile's method,
        budget and instruction), then one full-KV pass over the section summaries (each headed with its
        pages and title) writes the summary. Summaries too long for one section are combined in stages.
        ``result.sections`` keeps each section's pages, title, tokens and summary."""
        t0 = time.perf_counter()
        result = self._result(doc.source, "summarize")
        instruction = self.profile.instruction or DEFAULT_INSTRUCTION
        seen = self._warn(result, doc, 0)
        parts = self._conquer(doc.source, sections, instruction, result)
        self._warn(result, doc, seen)
        limit = self.section_tokens()
        level = 1
        from .sections import PARAGRAPH, Block, divide

        while self._count(_joined_parts(parts)) > limit and len(parts) > 1:  # combine in stages
            blocks = [Block(text, PARAGRAPH) for text in _part_texts(parts)]
            groups = divide(blocks, self._count, limit)
            if len(groups) >= len(parts):  # summaries too long to pack two per pass: combine what there is
                break
            level += 1
            parts = self._conquer(doc.source, groups, instruction, result, level=level)
        combine = self.profile.combine_instruction or DEFAULT_COMBINE
        full = Engine(
            self.lm,
            CompressionSettings(method="full", budget="full", chunk_size=self.engine.chunk_size),
            self.profile.generation,
            max_cache=self.engine.max_cache,
        )
        if self.hooks.phase:
            self.hooks.phase("compress", f"{doc.source}: the {len(parts)} section summaries")
        cdoc = full.compress(_joined_parts(parts), self.profile.prompt, question=combine, source=doc.source)
        if self.hooks.phase:
            self.hooks.phase("answer", combine)
        result.answers.append(full.ask(cdoc, combine, on_token=self.hooks.token))
        result.passes += 1
        result.prefill_seconds += cdoc.stats.prefill_seconds
        result.seconds = time.perf_counter() - t0
        return result

    def _conquer(self, source: str, sections, instruction: str, result: TaskResult, level: int = 1) -> list[dict]:
        """One compressed pass per section: its summary, recorded on ``result`` (level 1: the document's)."""
        from dataclasses import replace

        parts: list[dict] = []
        biggest: CompressStats | None = None
        total = 0
        for i, sec in enumerate(sections, start=1):
            label = f"section {i}/{len(sections)}" + (f" ({sec.where})" if sec.where else "")
            if level > 1:
                label = f"combining, stage {level}: {label}"
            if self.hooks.phase:
                self.hooks.phase("compress", f"{source} {label}")
            t = time.perf_counter()
            cdoc = self._compress_segments([sec.text], None, source, instruction, None, result)
            self._compacted(result, cdoc.stats)
            answer = self.engine.ask(cdoc, instruction)
            result.passes += 1
            result.prefill_seconds += cdoc.stats.prefill_seconds
            total += cdoc.stats.doc_tokens
            if biggest is None or cdoc.stats.peak_memory_bytes > biggest.peak_memory_bytes:
                biggest = cdoc.stats
            entry = {"index": i, **sec.to_dict(), "summary": answer.text.strip(), "seconds": round(time.perf_counter() - t, 3)}
            if level > 1:
                entry["stage"] = level
            result.sections.append(entry)
            parts.append(entry)
        if level == 1 and biggest is not None:  # the record's numbers: the largest pass, the whole document
            scale = total / biggest.doc_tokens if biggest.doc_tokens else 1.0
            result.stats = replace(
                biggest,
                doc_tokens=total,
                full_kv_bytes=int(biggest.full_kv_bytes * scale),
                prefill_seconds=result.prefill_seconds,
            )
        return parts

    def qa(self, doc: Document | CompressedDocument, questions: Sequence[str]) -> TaskResult:
        """Answer ``questions`` about one document (or a cache loaded from a ``.dkv`` file)."""
        if not questions:
            raise ValueError("qa needs at least one question")
        t0 = time.perf_counter()
        if isinstance(doc, CompressedDocument):
            result = self._result(doc.source, "qa")
            result.stats, result.method, result.budget = doc.stats, doc.stats.method, str(doc.settings.budget)
            self._compacted(result, doc.stats)
            for q in questions:
                result.answers.append(self.ask(doc, q))
        elif self.profile.questions == "separate" or len(questions) == 1:
            result = self._result(doc.source, "qa")
            for q in questions:
                cdoc = self.compress(doc, question=q, result=result)
                result.answers.append(self.ask(cdoc, q))
        else:
            result = self._result(doc.source, "qa")
            cdoc = self.compress(doc, probe=self.profile.probe, result=result)
            for q in questions:
                result.answers.append(self.ask(cdoc, q))
        result.seconds = time.perf_counter() - t0
        return result

    def rag(self, docs: Sequence[Document], questions: Sequence[str]) -> TaskResult:
        """Answer ``questions`` from all ``docs`` read as one context, each passage marked with its source."""
        if not docs:
            raise DocumentError("no documents to read: pass files or folders")
        if not questions:
            raise ValueError("rag needs at least one question")
        t0 = time.perf_counter()
        sources = [d.source for d in docs]
        name = sources[0] if len(sources) == 1 else f"{len(sources)} documents"
        result = self._result(name, "rag")
        result.sources = sources
        fingerprint = hashlib.sha256("\0".join(d.fingerprint for d in docs).encode()).hexdigest()[:16]

        def passages() -> Iterator[str]:
            for i, d in enumerate(docs, start=1):
                yield self.profile.passage_header.format(index=i, source=d.source)
                seen = self._warn(result, d, 0)
                for s in d.segments():
                    yield s.text
                self._warn(result, d, seen)

        shared = self.profile.questions == "shared" and len(questions) > 1
        plans = [(None, self.profile.probe)] if shared else [(q, None) for q in questions]
        for q, probe in plans:
            if self.hooks.phase:
                self.hooks.phase("compress", name)
            result.warnings.clear()
            cdoc = self._compress_segments(passages(), fingerprint, name, q, probe, result)
            self._compacted(result, cdoc.stats)
            result.stats = cdoc.stats
            result.passes += 1
            result.prefill_seconds += cdoc.stats.prefill_seconds
            for question in questions if shared else [q]:
                result.answers.append(self.ask(cdoc, question))
        result.seconds = time.perf_counter() - t0
        return result

    def run(self, task: str, doc: Document, questions: Sequence[str] = ()) -> TaskResult:
        """One document through ``task`` (what ``dynkv batch`` does per document)."""
        if task == "summarize":
            return self.summarize(doc)
        if task == "qa":
            return self.qa(doc, questions)
        if task == "rag":
            return self.rag([doc], questions)
        raise ValueError(f"unknown task {task!r}")
