"""Trust: damaged cache files and model weights are refused in one line, and answers that loop are stopped."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from cli_helpers import invoke, one_error_line
from tiny import text_of

from dynkv_cli import CompressionSettings, Engine, GenerationSettings, TaskPrompt, load_model
from dynkv_cli.cache import FORMAT, FORMAT_V1, _write_safetensors, verify_file
from dynkv_cli.errors import CacheFileError, UsageError
from dynkv_cli.repetition import find_loop, guard_settings, pending_repeat

PROMPT = TaskPrompt(before_document="Read this.\n", after_document="\nquestion: {question}\nanswer:")
QUESTION = "what is the key number"
GUARD = {"ngram": 8, "repeats": 3}


@pytest.fixture(scope="module")
def lm(model):
    return load_model(model)


@pytest.fixture(scope="module")
def saved(lm, tmp_path_factory):
    """A compressed document saved once; tests copy the file before they damage it."""
    eng = Engine(lm, CompressionSettings(budget="20", chunk_size=64), GenerationSettings(max_new_tokens=4))
    doc = eng.compress(text_of(200), PROMPT, question=QUESTION, source="doc.txt")
    path = doc.save(tmp_path_factory.mktemp("trust") / "book.dkv")
    return eng, path, eng.ask(doc, QUESTION)


def _copy(path: Path, tmp_path: Path, name: str = "book.dkv") -> Path:
    out = tmp_path / name
    shutil.copyfile(path, out)
    return out


def _layout(path: Path) -> tuple[int, dict, dict]:
    """(start of the tensor bytes, safetensors header, dynkv metadata) of a cache file."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8 : 8 + n])
    return 8 + n, head, json.loads(head["__metadata__"]["dynkv"])


def _rewrite(path: Path, edit, meta_edit=None, v1: bool = False) -> None:
    """Read a cache file's tensors and header, change them, write the file again (checksums recomputed)."""
    from safetensors.torch import load_file, save_file

    _, _, meta = _layout(path)
    tensors = {k: v.clone() for k, v in load_file(str(path)).items()}  # not views of the file rewritten below
    tensors = edit(tensors) or tensors
    meta.pop("checksums")
    meta.pop("checksum")
    if meta_edit:
        meta_edit(meta)
    if v1:  # the layout dynkv wrote before checksums
        meta["format"] = FORMAT_V1
        save_file(tensors, str(path), metadata={"dynkv": json.dumps(meta)})
    else:
        _write_safetensors(path, tensors, meta)


# ---- cache files ---------------------------------------------------------------------------------------


def test_saved_file_has_a_checksum_per_tensor_and_round_trips(saved, lm):
    eng, path, before = saved
    _, head, meta = _layout(path)
    tensors = {k for k in head if k != "__metadata__"}
    assert meta["format"] == FORMAT == "dynkv-cache/2" and meta["checksum"] == "sha256"
    assert set(meta["checksums"]) == tensors and all(len(v) == 64 for v in meta["checksums"].values())
    assert verify_file(path) == len(tensors)
    after = eng.ask(eng.load(path), QUESTION)
    assert after.token_ids == before.token_ids


def test_overwritten_tensor_bytes_are_refused(saved, tmp_path):
    eng, path, _ = saved
    bad = _copy(path, tmp_path)
    start, head, _ = _layout(bad)
    a, b = head["layer.3.keys"]["data_offsets"]
    with open(bad, "r+b") as fh:  # the header stays intact
        fh.seek(start + a + (b - a) // 2)
        fh.write(b"\x7f" * 16)
    msg = f"{bad} is damaged: tensor layer.3.keys does not match its checksum; compress the document again"
    with pytest.raises(CacheFileError) as e:
        eng.load(bad)
    assert str(e.value) == msg
    r = invoke(["info", bad, "--verify"])
    assert r.exit_code == 1 and one_error_line(r) == f"error: {msg}"
    ok = invoke(["info", path, "--verify"])
    assert ok.exit_code == 0, ok.stderr
    assert ok.stdout.rstrip().splitlines()[-1] == f"verified: {len(head) - 1} tensors, all checksums match"
    assert json.loads(invoke(["info", path, "--verify", "--json"]).stdout)["verified_tensors"] == len(head) - 1


def test_qa_from_a_damaged_file_says_so(saved, model, tmp_path):
    _, path, _ = saved
    bad = _copy(path, tmp_path)
    start, head, _ = _layout(bad)
    a, _ = head["layer.0.scores"]["data_offsets"]
    with open(bad, "r+b") as fh:
        fh.seek(start + a)
        fh.write(b"\x00\x01\x02\x03")
    r = invoke(["qa", bad, "-q", QUESTION, "--model", model, "--max-new-tokens", "2"])
    assert r.exit_code == 1
    assert one_error_line(r) == (
        f"error: {bad} is damaged: tensor layer.0.scores does not match its checksum; compress the document again"
    )


@pytest.mark.parametrize(
    "edit, meta_edit, expected",
    [
        (lambda t: {k: (v[..., :8] if k.endswith(("keys", "values")) else v) for k, v in t.items()}, None,
         "layer 0 has head dim 8 (values 8), the model has 16"),
        (lambda t: {k: v[:1] for k, v in t.items()}, None, "layer 0 has 1 KV heads, the model has 2"),
        (lambda t: {k: v for k, v in t.items() if not k.startswith("layer.3.")}, lambda m: m.update(num_layers=3),
         "the cache holds 3 layers, the model has 4"),
    ],
    ids=["head_dim", "kv_heads", "layers"],
)  # fmt: skip
def test_a_header_whose_shapes_do_not_match_the_model_is_refused(saved, tmp_path, edit, meta_edit, expected):
    eng, path, _ = saved
    bad = _copy(path, tmp_path)
    _rewrite(bad, edit, meta_edit)  # the model fingerprint still matches: only the shapes are wrong
    with pytest.raises(CacheFileError) as e:
        eng.load(bad)
    assert str(e.value) == (
        f"{bad} does not match model {eng.lm.name!r}: {expected}; compress the document again with this model"
    )


def test_inconsistent_tensors_are_refused_without_a_model(saved, tmp_path):
    _, path, _ = saved
    bad = _copy(path, tmp_path)
    _rewrite(bad, lambda t: t.update({"layer.1.positions": t["layer.1.positions"][:, :-1]}))
    with pytest.raises(CacheFileError, match=r"is damaged: layer 1: keys .* do not fit together"):
        verify_file(bad)
    bad2 = _copy(path, tmp_path, "b2.dkv")
    _rewrite(bad2, lambda t: t.update({"layer.2.keys": t["layer.2.keys"].to(torch.int64)}))
    r = invoke(["info", bad2, "--verify"])
    assert r.exit_code == 1 and "tensor layer.2.keys has dtype I64, not a floating-point type" in one_error_line(r)


def test_old_format_file_loads_with_a_warning(saved, model, tmp_path):
    eng, path, before = saved
    old = _copy(path, tmp_path, "old.dkv")
    _rewrite(old, lambda t: None, v1=True)
    assert _layout(old)[2]["format"] == "dynkv-cache/1"
    warned = []
    doc = eng.load(old, on_warning=warned.append)
    assert eng.ask(doc, QUESTION).token_ids == before.token_ids
    assert warned == [
        f"{old} was written by an older dynkv (dynkv-cache/1) without checksums, so it cannot be verified; "
        "compress the document again to get a verifiable file"
    ]
    with pytest.warns(UserWarning, match="cannot be verified"):
        eng.load(old)
    r = invoke(["qa", old, "-q", QUESTION, "--model", model, "--max-new-tokens", "2"])
    assert r.exit_code == 0, r.stderr
    assert f"warning: {warned[0]}" in r.stderr
    info = invoke(["info", old])
    assert info.exit_code == 0 and "dynkv-cache/1" in info.stdout
    v = invoke(["info", old, "--verify"])
    assert v.exit_code == 1 and "cannot be verified" in one_error_line(v)


# ---- model weights ----------------------------------------------------------------------------------------


def _truncated_copy(model: Path, dest: Path) -> Path:
    shutil.copytree(model, dest)
    weights = dest / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return weights


def test_truncated_model_safetensors_is_one_line_and_exit_1(model, tmp_path):
    weights = _truncated_copy(Path(model), tmp_path / "broken")
    doc = tmp_path / "doc.txt"
    doc.write_text(text_of(50), encoding="utf-8")
    r = invoke(["summarize", doc, "--model", tmp_path / "broken"])
    assert r.exit_code == 1
    assert one_error_line(r) == (
        f"error: {weights} is damaged or truncated (SafetensorError: Error while deserializing header: "
        "incomplete metadata, file not fully covered); download or save the model again"
    )


def test_damaged_gguf_conversion_is_deleted_and_converted_again(model, tmp_path, monkeypatch):
    from dynkv_cli import ggufmodel

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    broken = tmp_path / "cache" / "models" / "abc"
    _truncated_copy(Path(model), broken)
    good = tmp_path / "good"
    calls = []

    def fake_dequantized(path, note=None):
        calls.append(path)
        if broken.exists():
            return broken, "abc"
        shutil.copytree(model, good)
        return good, "abc"

    monkeypatch.setattr(ggufmodel, "dequantized_folder", fake_dequantized)
    notes = []
    lm = load_model(gguf, note=notes.append)
    assert lm.shape.num_layers == 4 and len(calls) == 2 and not broken.exists()
    assert notes == [
        f"{broken / 'model.safetensors'} was damaged or truncated (SafetensorError: Error while deserializing "
        f"header: incomplete metadata, file not fully covered); deleted {broken}, converting m.gguf again"
    ]


# ---- repetition ---------------------------------------------------------------------------------------------

SPAN = list(range(100, 110))  # 10 distinct tokens
PREFIX = list(range(1, 21))


def _first_loop(ids, **kw):
    """Feed ``ids`` one token at a time, as decoding does: (tokens seen, loop) at the first loop, else None."""
    for n in range(1, len(ids) + 1):
        loop = find_loop(ids[:n], **kw)
        if loop is not None:
            return n, loop
    return None


def test_a_loop_stops_after_three_copies_and_trims_to_one():
    ids = PREFIX + SPAN * 6
    n, (start, period) = _first_loop(ids)
    assert n == len(PREFIX) + 3 * len(SPAN)  # stopped when the third copy is complete
    assert (start, period) == (len(PREFIX), len(SPAN))
    assert ids[: start + period] == PREFIX + SPAN


def test_a_loop_that_began_inside_the_text_before_it_is_found_where_it_began():
    ids = PREFIX + SPAN[5:] + SPAN * 3  # the prefix ends like the span: the repetition starts there
    n, (start, period) = _first_loop(ids)
    assert period == len(SPAN) and start == len(PREFIX)
    assert n == start + 3 * period


def test_long_digit_runs_separators_and_lists_are_not_loops(lm):
    assert _first_loop([5] + [0] * 300) is None  # 1000000...
    assert _first_loop([7, 8] * 150) is None  # "| --- | --- ..." style short units
    assert _first_loop(list(range(50)) + [9, 9, 9, 4] * 40) is None
    tok = lm.tokenizer
    items = "\n".join(f"{i}. the river report of the year and the month" for i in range(1, 60))
    assert _first_loop(tok.encode(items, add_special_tokens=False)) is None
    digits = tok.encode("The total was 1" + "0" * 60 + " dollars.", add_special_tokens=False)
    assert _first_loop(digits) is None
    assert _first_loop(PREFIX + SPAN * 2) is None  # said twice: not a loop
    assert _first_loop(PREFIX + SPAN * 3, ngram=11) is None  # span shorter than ngram
    assert _first_loop(PREFIX + SPAN * 2, repeats=2) == (len(PREFIX) + 20, (len(PREFIX), 10))


def test_pending_repeat_counts_a_repetition_in_progress():
    assert pending_repeat(PREFIX + SPAN) == 0
    assert pending_repeat(PREFIX + SPAN + SPAN[:4]) == 4
    assert pending_repeat(PREFIX + SPAN + [0]) == 0


def test_guard_settings_are_checked():
    assert guard_settings(None) is None
    assert guard_settings({}) == GUARD and guard_settings({"repeats": 4}) == {"ngram": 8, "repeats": 4}
    with pytest.raises(UsageError, match="unknown repetition_guard key.*valid keys: ngram, repeats"):
        guard_settings({"n": 3})
    with pytest.raises(UsageError, match="repetition_guard.ngram must be an integer >= 2"):
        GenerationSettings(repetition_guard={"ngram": 1}).validate()


def test_profiles_set_or_switch_off_the_guard(tmp_path):
    from dynkv_cli.profiles import load_profile

    on = tmp_path / "on.yaml"
    on.write_text("extends: qa\ngeneration:\n  repetition_guard: {ngram: 12, repeats: 4}\n", encoding="utf-8")
    assert load_profile(str(on)).generation.repetition_guard == {"ngram": 12, "repeats": 4}
    off = tmp_path / "off.yaml"
    off.write_text("extends: summarize\ngeneration:\n  repetition_guard: null\n", encoding="utf-8")
    assert load_profile(str(off)).generation.repetition_guard is None
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: qa\ngeneration:\n  repetition_guard: {span: 3}\n", encoding="utf-8")
    with pytest.raises(UsageError, match="unknown repetition_guard key"):
        load_profile(str(bad))
    worse = tmp_path / "worse.yaml"
    worse.write_text("extends: qa\ngeneration:\n  repetition_guard: 8\n", encoding="utf-8")
    with pytest.raises(UsageError, match="repetition_guard must be a mapping"):
        load_profile(str(worse))


def test_engine_stops_a_forced_loop_with_stop_reason_repetition(lm, monkeypatch):
    import dynkv_cli.engine as engine_mod

    tok = lm.tokenizer
    head = tok.encode("The owner of the garden", add_special_tokens=False)
    sentence = tok.encode(" paid the tenant a letter in the month.", add_special_tokens=False)
    assert len(sentence) >= 8
    script = head + sentence * 20

    def forced(gen):
        stream = iter(script)
        monkeypatch.setattr(engine_mod, "_pick", lambda logits, g, rng: next(stream))

    eng = Engine(lm, CompressionSettings(budget="20", chunk_size=64))
    doc = eng.compress(text_of(120), PROMPT, question=QUESTION)
    forced(None)
    shown = []
    a = eng.ask(doc, QUESTION, generation=GenerationSettings(max_new_tokens=120, repetition_guard=GUARD),
                on_token=shown.append)  # fmt: skip
    assert a.stop_reason == "repetition"
    assert a.token_ids == head + sentence
    assert a.text == tok.decode(head + sentence, skip_special_tokens=True)
    assert "".join(shown) == a.text  # the copies being checked were held back, never shown
    forced(None)
    b = eng.ask(doc, QUESTION, generation=GenerationSettings(max_new_tokens=120))
    assert b.stop_reason == "max_new_tokens" and len(b.token_ids) == 120
    forced(None)
    c = eng.ask(doc, QUESTION, generation=GenerationSettings(max_new_tokens=120, repetition_guard=GUARD))
    assert c.to_dict()["stop_reason"] == "repetition"


def test_loop_cut_moves_to_the_end_of_the_sentence(lm, monkeypatch):
    import dynkv_cli.engine as engine_mod

    tok = lm.tokenizer
    sentence = tok.encode(" the river was a stone in the garden.", add_special_tokens=False)
    # the text before the loop ends like the looping sentence: the repetition begins mid-sentence
    head = tok.encode("A report", add_special_tokens=False) + sentence[-3:]
    script = iter(head + sentence * 10)
    monkeypatch.setattr(engine_mod, "_pick", lambda logits, g, rng: next(script))
    eng = Engine(lm, CompressionSettings(budget="20", chunk_size=64))
    doc = eng.compress(text_of(100), PROMPT, question=QUESTION)
    a = eng.ask(doc, QUESTION, generation=GenerationSettings(max_new_tokens=100, repetition_guard=GUARD))
    assert a.stop_reason == "repetition"
    assert a.token_ids == head + sentence  # the sentence said once, whole


def test_a_loop_without_a_sentence_end_is_cut_after_its_last_clause(lm, monkeypatch):
    import dynkv_cli.engine as engine_mod

    tok = lm.tokenizer
    head = tok.encode("The report was also read on", add_special_tokens=False)
    clause = tok.encode(' the river show "the garden letter" and read on', add_special_tokens=False)
    script = iter(head + clause * 10)
    monkeypatch.setattr(engine_mod, "_pick", lambda logits, g, rng: next(script))
    eng = Engine(lm, CompressionSettings(budget="20", chunk_size=64))
    doc = eng.compress(text_of(100), PROMPT, question=QUESTION)
    a = eng.ask(doc, QUESTION, generation=GenerationSettings(max_new_tokens=100, repetition_guard=GUARD))
    assert a.stop_reason == "repetition"
    assert a.text == 'The report was also read on the river show "the garden letter"'
