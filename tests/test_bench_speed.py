"""`dynkv bench speed`: the harness runs end to end on the tiny preset; behaviour, never speed, is asserted."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, fields

import pytest
import torch
from typer.testing import CliRunner

from dynkv_bench import speed
from dynkv_bench.presets import PRESETS, SpeedTokenizer, build_model, preset_config
from dynkv_bench.speed import (
    REFERENCE,
    SpeedReport,
    SpeedRow,
    add_ratios,
    median_row,
    parse_lengths,
    run_speed,
)
from dynkv_cli.prompt import TaskPrompt, prompt_ids

METHODS = ["full", "dynamickv", "snapkv", "streamingllm"]
LENGTHS = [160, 230]
BUDGET_TOKENS = 24


@pytest.fixture(scope="module")
def report():
    return run_speed(
        "tiny",
        methods=METHODS,
        lengths=LENGTHS,
        budget=str(BUDGET_TOKENS),
        decode_tokens=5,
        device="cpu",
        threads=1,
        chunk_size=64,
        isolate=False,
        warmup=True,
        measure_matmul=True,
    )


def rows_of(report, n):
    return {r.method: r for r in report.rows if r.doc_tokens == n}


def test_every_method_and_length_measured(report):
    assert [(r.doc_tokens, r.method) for r in report.rows] == [(n, m) for n in LENGTHS for m in [REFERENCE, *METHODS]]
    for r in report.rows:
        assert r.status == "ok", r.note
        assert r.prefill_seconds > 0 and r.prefill_tokens_per_s == pytest.approx(r.doc_tokens / r.prefill_seconds)
        assert r.ttft_seconds >= r.prefill_seconds
        assert r.decode_tokens == 5 and len(r.tokens) == 5
        assert r.decode_seconds > 0
        assert r.decode_tokens_per_s == pytest.approx(4 / r.decode_seconds)
        assert r.wall_seconds >= r.ttft_seconds
        assert r.peak_memory_kind.startswith("process_peak_rss")
        assert r.peak_total_bytes >= r.baseline_bytes > 0
        assert r.peak_memory_bytes == r.peak_total_bytes - r.baseline_bytes
        assert r.cache_bytes > 0 and r.full_kv_bytes > 0
        assert r.matmul_flops > 0 and r.matmul_bound_seconds > 0
        assert r.matmul_bound_ratio == pytest.approx(r.prefill_seconds / r.matmul_bound_seconds)
        assert len(r.kept_per_layer) == PRESETS["tiny"]["num_hidden_layers"]
    for key in ("cpu_count", "torch", "transformers", "device_name", "dtype", "matmul_flops_per_s", "loadavg_end"):
        assert report.machine[key] is not None, key
    assert report.machine["dtype"] == "float32"
    assert report.model["params"] > 0 and report.model["config"]["num_hidden_layers"] == 2


def test_reference_greedy_tokens_equal_engine_full(report):
    for n in LENGTHS:
        rows = rows_of(report, n)
        assert rows[REFERENCE].tokens == rows["full"].tokens
        # same random model, same document: a full engine cache holds exactly what the plain cache does
        assert rows["full"].kept_per_layer == [n] * 2
        assert rows["full"].score_seconds == 0.0


def test_reference_is_plain_sdpa_and_full_cache(report):
    for n in LENGTHS:
        ref = rows_of(report, n)[REFERENCE]
        assert ref.note == "one prefill forward" and ref.chunks == 1
        assert ref.cache_bytes == ref.full_kv_bytes  # DynamicCache keys + values of the document
        assert ref.score_seconds is None and ref.budget is None


def test_compressing_methods_keep_the_budget(report):
    for n in LENGTHS:
        rows = rows_of(report, n)
        for m in ("dynamickv", "snapkv", "streamingllm"):
            r = rows[m]
            assert r.budget_tokens == BUDGET_TOKENS
            assert sum(r.kept_per_layer) <= BUDGET_TOKENS * len(r.kept_per_layer)
            assert r.cache_bytes < rows[REFERENCE].cache_bytes
            assert r.chunks == math.ceil(n / 64)
            assert 0 <= r.score_share < 1
        assert max(rows["streamingllm"].kept_per_layer) <= BUDGET_TOKENS
        assert len(rows["dynamickv"].chunk_memory_bytes) == math.ceil(n / 64)  # one point per chunk
        assert rows[REFERENCE].chunk_memory_bytes == []


def test_sample_keeps_ends():
    assert speed._sample([1, 2, 3], 64) == [1, 2, 3]
    s = speed._sample(list(range(1000)), 64)
    assert len(s) == 64 and s[0] == 0 and s[-1] == 999 and s == sorted(s)


def test_ratios_in_report_match_rows(report):
    for n in LENGTHS:
        rows = rows_of(report, n)
        ref = rows[REFERENCE]
        assert ref.prefill_speedup is None and ref.decode_speedup is None
        for m in METHODS:
            r = rows[m]
            assert r.prefill_speedup == pytest.approx(r.prefill_tokens_per_s / ref.prefill_tokens_per_s)
            assert r.ttft_speedup == pytest.approx(ref.ttft_seconds / r.ttft_seconds)
            assert r.decode_speedup == pytest.approx(r.decode_tokens_per_s / ref.decode_tokens_per_s)
            assert r.cache_ratio == pytest.approx(r.cache_bytes / ref.cache_bytes)


def test_add_ratios_by_hand():
    ref = SpeedRow(REFERENCE, 100, prefill_tokens_per_s=50.0, ttft_seconds=4.0, decode_tokens_per_s=10.0)
    ref.peak_memory_bytes, ref.cache_bytes = 1000, 800
    a = SpeedRow("dynamickv", 100, prefill_tokens_per_s=100.0, ttft_seconds=2.0, decode_tokens_per_s=25.0)
    a.peak_memory_bytes, a.cache_bytes = 250, 20
    other_len = SpeedRow("dynamickv", 200, prefill_tokens_per_s=1.0, ttft_seconds=1.0, decode_tokens_per_s=1.0)
    failed = SpeedRow("snapkv", 100, status="failed", note="boom")
    add_ratios([ref, a, other_len, failed])
    assert a.prefill_speedup == 2.0
    assert a.ttft_speedup == 2.0
    assert a.decode_speedup == 2.5
    assert a.memory_ratio == 0.25
    assert a.cache_ratio == 0.025
    assert other_len.prefill_speedup is None  # no reference at that length
    assert failed.decode_speedup is None
    assert ref.prefill_speedup is None


def test_median_row_of_repeats():
    runs = [
        SpeedRow("dynamickv", 100, prefill_seconds=p, ttft_seconds=p + 1, decode_tokens=5, decode_seconds=d)
        for p, d in ((2.0, 1.0), (4.0, 2.0), (3.0, 8.0))
    ]
    for r, peak in zip(runs, (10, 30, 20)):
        r.peak_memory_bytes, r.peak_total_bytes, r.baseline_bytes, r.score_seconds = peak, peak + 100, 100, 0.1
    runs.append(SpeedRow("dynamickv", 100, status="failed", note="killed"))
    m = median_row(runs)
    assert (m.prefill_seconds, m.ttft_seconds, m.decode_seconds, m.peak_memory_bytes) == (3.0, 4.0, 2.0, 20)
    assert m.prefill_tokens_per_s == pytest.approx(100 / 3.0)
    assert m.decode_tokens_per_s == pytest.approx(4 / 2.0)
    assert m.score_share == pytest.approx(0.1 / 3.0)
    assert m.repeats == 3 and len(m.samples) == 3 and "1 of 4 runs failed" in m.note


def test_repeats_and_synchronised_score_timer(monkeypatch):
    from dynkv_cli import engine

    synced = []
    init = engine.Engine.__init__

    def spy(self, *args, **kwargs):
        synced.append(kwargs.get("sync_timing", False))
        init(self, *args, **kwargs)

    monkeypatch.setattr(engine.Engine, "__init__", spy)
    rep = run_speed(
        "tiny",
        methods=["dynamickv"],
        lengths=[96],
        budget="16",
        decode_tokens=3,
        device="cpu",
        threads=1,
        chunk_size=32,
        isolate=False,
        warmup=False,
        measure_matmul=False,
        repeats=2,
        sync_score=True,
    )
    ref, dyn = rep.rows
    assert ref.repeats == dyn.repeats == 2 and len(dyn.samples) == 2
    assert dyn.score_timing == "synchronized" and 0 < dyn.score_seconds < dyn.prefill_seconds
    assert rep.settings["repeats"] == 2
    assert synced and all(synced)  # --sync-score: the engine synchronises around each scoring step


def test_json_round_trip(report, tmp_path):
    path = report.save(tmp_path / "speed.json")
    data = json.loads(path.read_text())
    assert set(data) == {"machine", "settings", "model", "rows"}
    assert set(data["rows"][0]) == {f.name for f in fields(SpeedRow)}
    back = SpeedReport.load(path)
    assert back.to_dict() == report.to_dict()
    assert back.rows[1] == report.rows[1]


def test_reference_oom_is_skipped_not_a_crash(monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 128.00 GiB")

    monkeypatch.setattr(speed, "run_reference", oom)
    rep = run_speed(
        "tiny",
        methods=["dynamickv"],
        lengths=[96],
        budget="16",
        decode_tokens=2,
        device="cpu",
        threads=1,
        chunk_size=32,
        isolate=False,
        warmup=False,
        measure_matmul=False,
    )
    ref, dyn = rep.rows
    assert ref.status == "skipped" and "out of memory" in ref.note
    assert dyn.status == "ok" and dyn.prefill_speedup is None and dyn.decode_speedup is None
    speed.render_table(rep)  # renders with a skipped reference


def test_isolated_processes(tmp_path):
    """The CLI default: every run in its own process; the rows come back whole."""
    rep = run_speed(
        "tiny",
        methods=["full"],
        lengths=[64],
        budget="16",
        decode_tokens=3,
        device="cpu",
        threads=1,
        chunk_size=32,
        warmup=False,
        measure_matmul=False,
    )
    ref, full = rep.rows
    assert ref.status == full.status == "ok", (ref.note, full.note)
    assert ref.tokens == full.tokens and len(ref.tokens) == 3
    assert full.peak_memory_kind == "process_peak_rss"
    assert rep.model["name"] == "tiny"


def test_cli_command_writes_json(tmp_path):
    from dynkv_bench.cli import bench_app

    out = tmp_path / "s.json"
    res = CliRunner().invoke(
        bench_app,
        [
            "speed",
            "--preset",
            "tiny",
            "--lengths",
            "80",
            "--methods",
            "dynamickv",
            "--budget",
            "16",
            "--decode-tokens",
            "2",
            "--chunk-size",
            "32",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--in-process",
            "--json",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "full-kv" in res.output and "dynamickv" in res.output
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == [REFERENCE, "dynamickv"]
    assert rows[1]["decode_speedup"] == pytest.approx(rows[1]["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"])


def test_cli_rejects_bad_length():
    from dynkv_bench.cli import bench_app

    res = CliRunner().invoke(bench_app, ["speed", "--preset", "tiny", "--lengths", "lots", "--in-process"])
    assert res.exit_code == 2
    assert "8k" in res.output


def test_parse_lengths():
    assert parse_lengths("8k,32k") == [8192, 32768]
    assert parse_lengths("128k, 1M") == [131072, 1048576]
    assert parse_lengths("1000") == [1000]
    with pytest.raises(ValueError):
        parse_lengths("")
    with pytest.raises(ValueError):
        parse_lengths("0")


def test_presets_have_the_issue_shapes():
    c = preset_config("8b")
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (32, 32, 8, 128)
    assert (c.hidden_size, c.intermediate_size) == (4096, 14336)
    c = preset_config("1b")
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (16, 2048, 32, 8)
    assert (c.head_dim, c.intermediate_size, c.vocab_size) == (64, 8192, 128256)
    assert preset_config("1b", vocab_size=32000).vocab_size == 32000
    assert c.eos_token_id is None and c.max_position_embeddings >= 1 << 20


def test_build_is_seeded_and_accepts_a_config_file(tmp_path):
    a, info = build_model("tiny", seed=3)
    b, _ = build_model("tiny", seed=3)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n
    assert info.params == sum(p.numel() for p in a.model.parameters())
    a.model.config.to_json_file(tmp_path / "config.json")
    c, cinfo = build_model(str(tmp_path), seed=3)
    d, _ = build_model(str(tmp_path / "config.json"), seed=3)
    assert cinfo.config == info.config and cinfo.name == str(tmp_path)
    assert torch.equal(c.model.lm_head.weight, d.model.lm_head.weight)


def test_stand_in_tokenizer_feeds_the_engine_prompt():
    tok = SpeedTokenizer(512)
    q = speed.QUESTION
    ids = tok.encode(q)
    assert ids == tok(q)["input_ids"] and all(0 <= i < 512 for i in ids)
    prompt = TaskPrompt(use_chat_template=False, before_document="", after_document="\n\n{question}")
    p = prompt_ids(tok, prompt, q)
    assert p.prefix == [] and p.suffix == ids  # the reference feeds exactly the engine's question ids


def test_peak_rss_reset():
    if not speed._reset_rss_peak():
        pytest.skip("this kernel does not allow resetting VmHWM")
    mem = speed._Memory(torch.device("cpu"))
    mem.start()
    x = torch.ones(64 * 2**20 // 4)
    x += 1
    grown = mem.peak() - mem.base
    del x
    assert grown >= 48 * 2**20
    row = asdict(SpeedRow("x", 1))
    assert "peak_memory_bytes" in row


def test_kernels_command_writes_rows(tmp_path):
    """`dynkv bench kernels` on the CPU: reference timings only, every kernel measured, JSON written."""
    from dynkv_bench.cli import bench_app

    out = tmp_path / "k.json"
    res = CliRunner().invoke(bench_app, ["kernels", "--no-triton", "--repeats", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["mode"] == "reference only"
    kernels = {r["kernel"] for r in data["rows"]}
    assert len(kernels) >= 2 and all(r["ref_ms"] > 0 and r["triton_ms"] is None for r in data["rows"])
