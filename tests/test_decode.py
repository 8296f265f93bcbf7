"""The decode loop (dynkv_cli/decode.py) and the cache's preallocated storage.

Incremental detokenizing equals a full decode (tiny tokenizer, SmolLM2's), stays linear in the answer,
streams exactly the final text; a layer's buffer is written in place and grows O(log n) times.
"""

from __future__ import annotations

import random

import pytest
import torch
from tiny import make_tokenizer

from dynkv_cli.cache import CompressedCache
from dynkv_cli.config import GenerationSettings
from dynkv_cli.decode import IncrementalDetokenizer, decode

SAMPLES = [
    "The tenant paid 1,250.75 EUR on 2024-03-01, then 17 more.",
    "Zürich — naïve café, Ünïcödé façade; 東京 タワー 北京 😀🎉👍🏽 done.",
    "  leading spaces,   runs   of spaces\tand tabs\n\nnew lines  ",
    "emoji only: 🧑‍🚀🏳️‍🌈 and digits 0123456789 9876543210",
]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _check_incremental(tokenizer, ids: list[int]) -> None:
    """Token by token: settled pieces concatenate to the settled text, and every prefix's text is exact."""
    detok = IncrementalDetokenizer(tokenizer)
    pieces = []
    for i, t in enumerate(ids):
        pieces.append(detok.add(t))
        full = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
        assert detok.current() == full
        assert full.startswith(detok.text) and "".join(pieces) == detok.text
    assert detok.current() == tokenizer.decode(ids, skip_special_tokens=True)
    for m in range(0, len(ids) + 1, 3):
        assert detok.text_upto(m) == tokenizer.decode(ids[:m], skip_special_tokens=True)


@pytest.fixture(scope="module")
def tiny_tok():
    return make_tokenizer()


@pytest.mark.parametrize("text", SAMPLES)
def test_incremental_equals_full_decode_on_the_tiny_tokenizer(tiny_tok, text):
    _check_incremental(tiny_tok, _ids(tiny_tok, text))


def test_incremental_equals_full_decode_on_random_ids_and_special_tokens(tiny_tok):
    rnd = random.Random(0)
    vocab = len(tiny_tok)
    for _ in range(5):  # random byte-level ids: split multi-byte characters, special tokens between them
        _check_incremental(tiny_tok, [rnd.randrange(vocab) for _ in range(60)])


@pytest.mark.parametrize("text", SAMPLES)
def test_incremental_equals_full_decode_on_smollm2(smollm2, text):
    tok = smollm2.lm.tokenizer
    _check_incremental(tok, _ids(tok, text))
    eos = tok.eos_token_id
    _check_incremental(tok, _ids(tok, text) + [eos] + _ids(tok, " after"))  # a special token is skipped


def test_decoding_is_linear_in_the_answer(tiny_tok):
    ids = (_ids(tiny_tok, " ".join(SAMPLES)) * 20)[:300]
    assert len(ids) == 300
    detok = IncrementalDetokenizer(tiny_tok)
    for t in ids:
        detok.add(t)
    assert detok.current() == tiny_tok.decode(ids, skip_special_tokens=True)
    assert detok.decoded_tokens <= 12 * len(ids)  # a whole re-decode per token would be ~45,000


class _Counting:
    """A tokenizer wrapper counting the ids passed to decode."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def decode(self, ids, **kw):
        self.decoded += len(ids)
        return self.tok.decode(ids, **kw)


def _scripted(ids: list[int], vocab: int):
    """A ``step`` and a ``pick`` that replay ``ids`` as greedy logits (one-hot), like a model would."""

    def logits_for(i: int) -> torch.Tensor:
        x = torch.zeros(vocab)
        x[ids[min(i, len(ids) - 1)]] = 1.0
        return x

    calls = {"n": 0}

    def step(token) -> torch.Tensor:
        calls["n"] += 1
        return logits_for(calls["n"])

    return step, logits_for(0), calls


@pytest.mark.parametrize("guard", [None, {"ngram": 8, "repeats": 3}])
def test_decode_loop_is_linear_streams_the_final_text_and_counts_max_new_tokens(tiny_tok, guard):
    ids = (_ids(tiny_tok, " ".join(SAMPLES)) * 20)[:300]
    tok = _Counting(tiny_tok)
    step, first, calls = _scripted(ids, len(tiny_tok))
    shown: list[str] = []
    gen = GenerationSettings(max_new_tokens=300, repetition_guard=guard).validate()
    out = decode(step, first, tok, gen, set(), on_token=shown.append)
    assert out.stop_reason == "max_new_tokens" and out.token_ids == ids and calls["n"] == 299
    assert out.text == tiny_tok.decode(ids, skip_special_tokens=True)
    assert "".join(shown) == out.text
    assert tok.decoded <= 15 * len(ids)  # bounded per token (the old loop decoded ~45,000 ids)


def test_decode_loop_eos_and_stop_string(tiny_tok):
    ids = _ids(tiny_tok, "the report was read. the owner paid") + [tiny_tok.eos_token_id] + _ids(tiny_tok, " more")
    step, first, _ = _scripted(ids, len(tiny_tok))
    out = decode(step, first, tiny_tok, GenerationSettings(max_new_tokens=100).validate(), {tiny_tok.eos_token_id})
    assert out.stop_reason == "eos" and out.text == "the report was read. the owner paid"
    step, first, _ = _scripted(ids, len(tiny_tok))
    shown: list[str] = []
    gen = GenerationSettings(max_new_tokens=100, stop=[". the"]).validate()
    out = decode(step, first, tiny_tok, gen, set(), on_token=shown.append)
    assert out.stop_reason == "stop_string" and out.text == "the report was read"
    assert "".join(shown) == out.text  # the stop string's beginning was held back, never shown


def _layer_states(n: int, G: int = 2, d: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.randn(1, G, n, d)
    return k, k + 1


def test_decode_step_writes_in_place_after_prefill_with_a_capacity():
    cache = CompressedCache(1, capacity=64)
    layer = cache.layers[0]
    layer.update(*_layer_states(40))
    keep = torch.arange(0, 40, 2).expand(2, 20)
    before = layer.keys.clone()
    layer.select(keep)
    assert torch.equal(layer.keys, before[:, :, ::2]) and layer.length == 20
    ptr = (layer.keys.data_ptr(), layer.values.data_ptr(), layer.positions.data_ptr(), layer.scores.data_ptr())
    for _ in range(30):  # a question and an answer
        k, v = layer.update(*_layer_states(1))
        assert k.shape[2] == layer.length and torch.equal(k, layer.keys)
    assert (layer.keys.data_ptr(), layer.values.data_ptr(), layer.positions.data_ptr()) == ptr[:3]
    assert layer.scores.data_ptr() == ptr[3] and layer.growths == 0
    assert cache.bytes_used() == 50 * 2 * (4 * 4 * 2 + 8 + 4)  # kept entries, not the buffer
    assert cache.reserved_bytes() >= 64 * 2 * (4 * 4 * 2 + 8 + 4)
    layer.truncate(20)
    assert layer.keys.data_ptr() == ptr[0] and torch.equal(layer.keys, before[:, :, ::2])


def test_growth_past_the_capacity_is_geometric():
    cache = CompressedCache(1)  # capacity unknown: starts at the first update's size
    layer = cache.layers[0]
    ref_k = []
    for _ in range(2000):
        k, v = _layer_states(1)
        layer.update(k, v)
        cache.next_pos += 1
        ref_k.append(k)
    assert torch.equal(layer.keys, torch.cat(ref_k, dim=2))
    assert layer.positions[0].tolist() == list(range(2000))
    assert layer.growths <= 20  # 1.5x: ~19 growths for 2,000 entries, not 2,000


def test_positions_and_scores_follow_select_and_load(tmp_path):
    cache = CompressedCache(2, capacity=16)
    for layer in cache.layers:
        cache.pending_positions = torch.arange(10, 18)
        layer.update(*_layer_states(8))
        cache.pending_positions = None
    idx = torch.tensor([[0, 3, 5], [1, 2, 7]])
    cache.layers[0].select(idx, torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    assert cache.layers[0].positions.tolist() == [[10, 13, 15], [11, 12, 17]]
    assert cache.layers[0].scores.tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    cache.next_pos = 18
    path = tmp_path / "c.dynkv"
    cache.save(path, {"model_fingerprint": "x"})
    loaded, _ = CompressedCache.load(path)
    for a, b in zip(cache.layers, loaded.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.positions, b.positions)
        assert torch.equal(a.scores, b.scores) and torch.equal(a.values, b.values)
    loaded.layers[0].update(*_layer_states(1))  # a loaded layer grows on its first question token
    assert loaded.layers[0].length == 4 and loaded.layers[0].growths == 1


@pytest.mark.parametrize("stop,expected", [("😀", "café "), ("é 😀", "caf"), (" done", "café 😀")])
def test_stop_strings_with_multi_byte_characters(tiny_tok, stop, expected):
    ids = _ids(tiny_tok, "café 😀 done. next")
    step, first, _ = _scripted(ids, len(tiny_tok))
    shown: list[str] = []
    gen = GenerationSettings(max_new_tokens=100, stop=[stop]).validate()
    out = decode(step, first, tiny_tok, gen, set(), on_token=shown.append)
    assert out.stop_reason == "stop_string" and out.text == expected and "".join(shown) == expected


def test_fit_drops_the_prefill_headroom_and_keeps_the_entries():
    cache = CompressedCache(2, capacity=100)
    for layer in cache.layers:
        layer.update(*_layer_states(30))
    before = [layer.keys.clone() for layer in cache.layers]
    cache.layers[0].select(torch.arange(10).expand(2, 10))
    cache.fit(8)
    assert [layer.capacity for layer in cache.layers] == [18, 38]
    assert torch.equal(cache.layers[0].keys, before[0][:, :, :10]) and torch.equal(cache.layers[1].keys, before[1])
    ptr = cache.layers[0].keys.data_ptr()
    for _ in range(8):  # a question and an answer fit the headroom
        cache.layers[0].update(*_layer_states(1))
    assert cache.layers[0].keys.data_ptr() == ptr and cache.layers[0].growths == 0
    assert cache.reserved_bytes() == (18 + 38) * 2 * (4 * 4 * 2 + 8 + 4)


@pytest.mark.parametrize(
    "tail,gen_kw",
    [
        ("eos", {}),
        ("", {"stop": [" owner"]}),
        ("", {"repetition_guard": {"ngram": 8, "repeats": 3}}),
        ("", {"max_new_tokens": 21}),
    ],
)
def test_grouped_schedule_gives_the_same_answer_and_stream(tiny_tok, tail, gen_kw):
    """The CUDA schedule (the host looks every 8 tokens) run on the CPU: same ids, text, stop reason, stream."""
    sentence = _ids(tiny_tok, " the report was read by the owner of the garden in the month.")
    ids = _ids(tiny_tok, "A tenant") + sentence * 4
    eos = {tiny_tok.eos_token_id}
    if tail == "eos":
        ids = ids[:13] + [tiny_tok.eos_token_id] + ids[13:]
    results = []
    for every in (1, 8):
        step, first, calls = _scripted(ids, len(tiny_tok))
        shown: list[str] = []
        gen = GenerationSettings(**{"max_new_tokens": 200, **gen_kw}).validate()
        out = decode(step, first, tiny_tok, gen, eos, on_token=shown.append, every=every)
        assert "".join(shown) == out.text
        results.append((out.token_ids, out.text, out.stop_reason))
    assert results[0] == results[1]
