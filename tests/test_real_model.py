"""The real model: SmolLM2-135M-Instruct from its GGUF file, where a tiny random model cannot show the behaviour.

One session fixture (``smollm2``, conftest.py) converts the GGUF file into a session model cache and
loads it once; every test here reuses it (the bad-file tests need no model at all). Settings chosen
for SmolLM2 (greedy decoding, fp32 on CPU, so the outputs are deterministic):

* exactness: a 504-token document, chunks of 64, 100, 257 and one chunk, next-token logits within
  ``ATOL`` of one plain SDPA forward (measured: at most about 6e-5).
* pass key: the needle profile's prompt, 25% of a 1,257-token haystack, question-aware, pooling
  kernel 7 (the needle profile's kernel 5 drops a middle digit of the key on SmolLM2 at 25-50%).
* summary: examples/docs/river-report.md with the whole document kept (``--budget 100%``: the output is
  a plain forward's, whatever the chunking), stopping at EOS after 98 tokens (cap 200). Compressed
  summaries of a 180-token document by a 135M model depend on the chunking: at 10% it ends at EOS
  in one chunk or chunks of 64-257, but in chunks of 32 it loops (stop reason ``repetition``).
"""

from __future__ import annotations

import gc
import hashlib
import json
import re
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import invoke, one_error_line
from dynkv_cli.profiles import load_profile
from real_model import (
    INSTALL_HINT,
    PASS_KEY,
    PASS_QUESTION,
    flip_one_weight,
    haystack,
    prose,
    smollm2_missing,
    write_gguf,
)

from dynkv_cli import CompressionSettings, Engine, GenerationSettings, load_model
from dynkv_cli.errors import CacheFileError, ModelLoadError
from dynkv_cli.ggufmodel import SOURCE_FILE
from dynkv_cli.prompt import encode, prompt_ids

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "docs"
LEASE = EXAMPLES / "lease.txt"
RIVER = EXAMPLES / "river-report.md"
LEASE_QUESTIONS = ["Who is the tenant?", "How much is the monthly rent?"]
#: the CLI runs as the settings were chosen: fp32 on the CPU (on a GPU the default would be bf16)
CPU32 = ["--device", "cpu", "--dtype", "fp32"]
#: fp32 logits of chunked prefill vs one plain forward through 30 layers (measured max |diff| ~6e-5)
ATOL = 5e-4


def plain_forward(lm, ids: list[int], new_tokens: int) -> tuple[torch.Tensor, list[int]]:
    """Next-token logits of one plain transformers SDPA forward over ``ids``, and its greedy continuation."""
    x = torch.tensor([ids], device=lm.device)
    lm.model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            logits = lm.model(x).logits[0, -1].float().cpu()
            out = lm.model.generate(x, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
        return logits, out[0, len(ids) :].tolist()
    finally:
        lm.model.set_attn_implementation("dynkv")


def next_logits(lm, text: str) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(torch.tensor([encode(lm.tokenizer, text)], device=lm.device)).logits[0, -1].cpu()


def cli_json(args: list) -> dict:
    r = invoke(args)
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def models_left(cache: Path) -> list[str]:
    """What a failed load left in the model cache besides the hash memo (nothing, if it failed cleanly)."""
    folder = cache / "models"
    return sorted(p.name for p in folder.iterdir() if p.name != "hashes.json") if folder.is_dir() else []


# ---- the fixture itself ----------------------------------------------------------------------------


def test_missing_smollm2_skips_here_and_fails_in_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("DYNKV_REQUIRE_SMOLLM2", raising=False)
    with pytest.raises(pytest.skip.Exception, match=re.escape(INSTALL_HINT)):
        smollm2_missing()
    for var, value in (("CI", "true"), ("DYNKV_REQUIRE_SMOLLM2", "1")):
        with monkeypatch.context() as m:
            m.setenv(var, value)
            with pytest.raises(pytest.fail.Exception, match=re.escape(INSTALL_HINT)):
                smollm2_missing()


# ---- the GGUF path end to end ----------------------------------------------------------------------


def test_gguf_converted_once_then_loaded_from_the_cache(smollm2, tmp_path):
    lm, gguf = smollm2.lm, smollm2.gguf
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert smollm2.sha256 == sha and lm.gguf == str(gguf)
    assert len(smollm2.notes) == 1 and "dequantizing" in smollm2.notes[0]  # converted here, this session
    folder = smollm2.cache_dir / "models" / sha
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", SOURCE_FILE):
        assert (folder / name).is_file(), name
    source = json.loads((folder / SOURCE_FILE).read_text())
    assert source["sha256"] == sha and source["gguf"] == str(gguf.resolve())
    assert source["architecture"] == "llama" and source["quantization"] == "Q4_1"
    assert not [p.name for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    # the model: SmolLM2-135M's shape, RoPE base 100000, fp32 weights with dynkv's attention
    s, cfg = lm.shape, lm.config
    assert (s.model_type, s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim) == ("llama", 30, 9, 3, 64)
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", None)}
    assert rope["rope_theta"] == 100000.0 and lm.max_positions == 8192
    assert lm.dtype == torch.float32 and cfg._attn_implementation == "dynkv"

    # a second load of the same file: no conversion, quick, the same logits
    notes = []
    t0 = time.perf_counter()
    again = load_model(gguf, dtype="fp32", note=notes.append)
    seconds = time.perf_counter() - t0
    assert notes == [] and seconds < 8.0, (notes, seconds)
    assert again.shape.fingerprint() == lm.shape.fingerprint()
    text = "The lighthouse keeper climbed the stairs"
    assert torch.equal(next_logits(again, text), next_logits(lm, text))
    del again
    gc.collect()

    # a folder holding the one .gguf file (a link to it) loads the same model, from the same conversion
    holder = tmp_path / "smollm2"
    holder.mkdir()
    (holder / gguf.name).symlink_to(gguf)
    linked = load_model(holder, dtype="fp32", note=notes.append)
    assert notes == [] and linked.shape.fingerprint() == lm.shape.fingerprint()
    assert torch.equal(next_logits(linked, text), next_logits(lm, text))
    del linked
    gc.collect()


def test_models_lists_the_default_gguf(smollm2):
    r = invoke(["models", "--json"])
    assert r.exit_code == 0, r.stderr
    found = json.loads(r.stdout)
    default = found[0]
    assert default["origin"] == "default" and default["name"] == "SmolLM2-135M-Instruct" and not default["error"]
    assert Path(default["path"]) == smollm2.gguf and default["kind"] == "gguf"
    assert (default["architecture"], default["layers"], default["heads"], default["kv_heads"]) == ("llama", 30, 9, 3)
    assert default["positions"] == 8192 and default["quantization"] == "Q4_1"
    assert default["size_bytes"] == smollm2.gguf.stat().st_size
    text = invoke(["models"])
    assert text.exit_code == 0 and "SmolLM2-135M-Instruct" in text.stdout and "9/3" in text.stdout


def test_qa_from_the_cli_with_the_gguf_file(smollm2):
    rec = cli_json(
        ["qa", LEASE, "-q", LEASE_QUESTIONS[0], "--model", smollm2.gguf, *CPU32, "--budget", "50%"]
        + ["--max-new-tokens", "24", "--json"]
    )
    assert rec["model"] == str(smollm2.gguf) and rec["passes"] == 1 and rec["method"] == "dynamickv"
    assert len(rec["kept_per_layer"]) == 30 and rec["bytes_used"] < rec["full_kv_bytes"]
    assert "Ada Moreau" in rec["answer"], rec["answer"]


# ---- exactness of chunked prefill -----------------------------------------------------------------


def test_chunked_prefill_at_full_budget_equals_one_plain_forward(smollm2):
    lm = smollm2.lm
    profile = load_profile("qa")
    question = "Who designed the lens made of rings of glass prisms?"
    ids = encode(lm.tokenizer, prose(4))
    assert 300 <= len(ids) <= 600
    p = prompt_ids(lm.tokenizer, profile.prompt, question)
    ref, ref_tokens = plain_forward(lm, p.prefix + ids + p.suffix, 6)
    gen = GenerationSettings(max_new_tokens=6)
    runs = [("100000", c) for c in (64, 100, 257, 4096)] + [("100%", 100)]
    for budget, chunk in runs:
        engine = Engine(lm, CompressionSettings(method="dynamickv", budget=budget, chunk_size=chunk), gen)
        # a token budget with the length unknown (one piece of ids) takes the compressing code path;
        # 100% of a known length is the `full` shortcut
        doc = engine.compress([ids] if budget == "100000" else ids, profile.prompt, question=question)
        assert doc.stats.method == ("dynamickv" if budget == "100000" else "full")
        assert doc.stats.chunks == -(-len(ids) // chunk)
        assert doc.stats.kept_per_layer == [len(ids)] * 30
        answer = engine.ask(doc, question, keep_logits=True)
        diff = (answer.first_logits - ref).abs().max().item()
        assert diff < ATOL, (budget, chunk, diff)
        assert answer.token_ids == ref_tokens, (budget, chunk)


# ---- a pass key kept by the compressed cache -------------------------------------------------------


def test_pass_key_answered_whole_from_the_compressed_cache(smollm2):
    lm = smollm2.lm
    profile = load_profile("needle").with_overrides(chunk_size=512)
    profile.compression.retention["kernel"] = 7
    text = haystack()
    n = len(encode(lm.tokenizer, text))
    assert 800 <= n <= 1500
    answers = {}
    for budget in ("100%", "25%"):
        settings = profile.with_overrides(budget=budget).compression
        engine = Engine(lm, settings, profile.generation)
        doc = engine.compress(text, profile.prompt, question=PASS_QUESTION)
        answers[budget] = engine.ask(doc, PASS_QUESTION).text
        assert re.search(rf"(?<!\d){PASS_KEY}(?!\d)", answers[budget]), (budget, answers[budget])
    s = doc.stats  # the 25% cache: compressed in every layer, DynamicKV's budget shared between layers
    assert s.method == "dynamickv" and s.doc_tokens == n and s.budget_tokens == -(-n // 4)
    assert max(s.kept_per_layer) < n and sum(s.kept_per_layer) <= s.budget_tokens * 30
    assert len(set(s.kept_per_layer)) > 1  # layers keep different numbers of tokens
    assert s.bytes_used < s.full_kv_bytes / 2


# ---- summarize through the CLI ---------------------------------------------------------------------


def test_summarize_stops_at_eos(smollm2):
    args = ["--model", smollm2.gguf, *CPU32, "--json", "--budget", "100%", "--max-new-tokens", "200"]
    r = invoke(["summarize", RIVER, *args])
    assert r.exit_code == 0, r.stderr
    assert "dequantizing" not in r.stderr  # the session's conversion is reused
    rec = json.loads(r.stdout)
    answer = rec["answers"][0]
    assert rec["task"] == "summarize" and rec["error"] is None and rec["model"] == str(smollm2.gguf)
    assert answer["stop_reason"] == "eos" and 0 < answer["tokens"] < 200, answer
    assert rec["answer"].strip() and "river" in rec["answer"].lower(), rec["answer"]
    assert rec["budget_tokens"] is None and rec["kept_per_layer"] == [rec["doc_tokens"]] * 30  # all kept


# ---- .dkv files ------------------------------------------------------------------------------------


def test_dkv_round_trip_answers_as_asking_directly(smollm2, tmp_path):
    gguf, dkv = smollm2.gguf, tmp_path / "lease.dkv"
    common = ["--model", gguf, *CPU32, "--max-new-tokens", "24"]
    r = invoke(["compress", LEASE, "-o", dkv, "--budget", "50%", *common])
    assert r.exit_code == 0, r.stderr
    assert dkv.is_file() and "compressed" in r.stderr and "dequantizing" not in r.stderr
    info = invoke(["info", dkv])
    assert info.exit_code == 0, info.stderr
    assert str(gguf) in info.stdout and "dynamickv" in info.stdout
    header = cli_json(["info", dkv, "--json"])
    assert header["model"] == str(gguf) and header["model_fingerprint"] == smollm2.lm.shape.fingerprint()
    assert len(header["stats"]["kept_per_layer"]) == 30
    # several questions share one pass observed by the profile's probe, as `compress` does
    questions = [a for q in LEASE_QUESTIONS for a in ("-q", q)]
    from_file = cli_json(["qa", dkv, *questions, *common, "--json"])
    direct = cli_json(["qa", LEASE, *questions, "--budget", "50%", *common, "--json"])
    assert from_file["passes"] == 0 and direct["passes"] == 1
    assert from_file["kept_per_layer"] == direct["kept_per_layer"]
    assert [a["answer"] for a in from_file["answers"]] == [a["answer"] for a in direct["answers"]]
    assert [a["tokens"] for a in from_file["answers"]] == [a["tokens"] for a in direct["answers"]]
    assert "Ada Moreau" in from_file["answers"][0]["answer"]


def test_dkv_from_other_weights_is_refused(smollm2, tmp_path):
    lm, gguf = smollm2.lm, smollm2.gguf
    other_gguf = tmp_path / "SmolLM2-changed.gguf"
    offset = flip_one_weight(gguf, other_gguf)
    assert offset > 0 and other_gguf.stat().st_size == gguf.stat().st_size
    notes = []
    other = load_model(other_gguf, dtype="fp32", note=notes.append)  # another sha256: converted again
    assert len(notes) == 1 and "dequantizing" in notes[0]
    assert other.shape.num_layers == lm.shape.num_layers and other.shape.fingerprint() != lm.shape.fingerprint()
    engine = Engine(lm, CompressionSettings(budget="25%", chunk_size=256), GenerationSettings(max_new_tokens=4))
    dkv = engine.compress(prose(2), load_profile("qa").prompt, question="What makes a cloud?").save(tmp_path / "x.dkv")
    assert engine.load(dkv).stats.doc_tokens > 0
    with pytest.raises(CacheFileError, match="was compressed with model"):
        Engine(other).load(dkv)
    del other
    gc.collect()
    r = invoke(["qa", dkv, "-q", "What makes a cloud?", "--model", other_gguf, *CPU32, "--max-new-tokens", "4"])
    assert r.exit_code == 1
    err = one_error_line(r)
    assert "was compressed with model" in err and str(gguf) in err


# ---- bad GGUF files: one clear line each ------------------------------------------------------------


def _refused(model: Path, tmp_path: Path, expected: str) -> None:
    """load_model raises ModelLoadError, and `dynkv qa` says it in one line with exit code 1."""
    with pytest.raises(ModelLoadError, match=expected):
        load_model(model)
    doc = tmp_path / "doc.txt"
    doc.write_text("The pass key is 12345.\n", encoding="utf-8")
    r = invoke(["qa", doc, "-q", "What is the pass key?", "--model", model])
    assert r.exit_code == 1, (r.stdout, r.stderr)
    assert re.search(expected, one_error_line(r)), r.stderr
    assert r.stdout == ""


@pytest.fixture
def model_cache(tmp_path, monkeypatch):
    """A model cache of the test's own, so a refused file can be shown to leave nothing behind."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DYNKV_CACHE_DIR", str(cache))
    return cache


@pytest.mark.parametrize("size", [50 * 2**20, 1000], ids=["50MB", "1000B"])
def test_truncated_gguf_is_refused(smollm2_gguf, tmp_path, model_cache, size):
    bad = tmp_path / "truncated.gguf"
    with open(smollm2_gguf, "rb") as src:
        bad.write_bytes(src.read(size))
    _refused(bad, tmp_path, r"truncated.*download it again")
    assert models_left(model_cache) == []


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("text", r"x\.gguf is not a GGUF file \(it does not start with 'GGUF'\); give a \.gguf model file"),
        ("architecture", r"GGUF architecture 'gpt2' is not supported; dynkv loads GGUF models of architecture llama"),
        ("Q8_K", r"tensor type\(s\) Q8_K cannot be dequantized by the gguf package; use a file quantized as"),
        ("I8", r"tensor type\(s\) I8 cannot be dequantized"),
        ("tokenizer", r"carries no tokenizer \(no tokenizer\.ggml\.\* fields\)"),
    ],
    ids=["text", "architecture", "Q8_K", "I8", "tokenizer"],
)
def test_bad_gguf_is_refused(tmp_path, model_cache, kind, expected):
    from gguf import GGMLQuantizationType as Q

    bad = tmp_path / "x.gguf"
    if kind == "text":
        bad.write_text("this is a text file, not a model\n", encoding="utf-8")
    elif kind == "architecture":
        write_gguf(bad, "gpt2")
    elif kind == "tokenizer":
        write_gguf(bad, tokenizer=False)
    else:  # Q8_K: a real GGML type the gguf package cannot dequantize; I8: not a quantization at all
        write_gguf(bad, tensor_type=Q[kind])
    _refused(bad, tmp_path, expected)
    assert models_left(model_cache) == []


def test_gguf_transformers_cannot_read_leaves_no_conversion(tmp_path, model_cache):
    """A header that passes every check, tensors transformers cannot build a model from: refused cleanly."""
    bad = write_gguf(tmp_path / "odd.gguf")
    with pytest.raises(ModelLoadError, match="transformers cannot load this GGUF file"):
        load_model(bad)
    assert models_left(model_cache) == []  # the temporary conversion folder is gone
