"""Engine behaviour on tiny random models (never downloaded): exactness, bounded memory, files, positions."""

from __future__ import annotations

import copy

import pytest
import torch
from method_matrix import method_matrix
from tiny import make_model, text_of

from dynkv_cli import CompressionSettings, Engine, GenerationSettings, TaskPrompt, load_model
from dynkv_cli.errors import CacheFileError, UsageError
from dynkv_cli.model import rotate_keys
from dynkv_cli.prompt import encode, prompt_ids

PROMPT = TaskPrompt(before_document="Read this.\n", after_document="\nquestion: {question}\nanswer:")
QUESTION = "what is the key number"


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {arch: make_model(root / arch, arch) for arch in ("llama", "mistral", "qwen2", "qwen3", "phi3")}


@pytest.fixture(scope="session")
def llama(models):
    return load_model(models["llama"])


def plain_logits(lm, ids: list[int]) -> torch.Tensor:
    """One plain transformers SDPA forward over the whole prompt."""
    lm.model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            return lm.model(torch.tensor([ids])).logits[0, -1]
    finally:
        lm.model.set_attn_implementation("dynkv")


def plain_greedy(lm, ids: list[int], n: int) -> list[int]:
    lm.model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            out = lm.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None)
        return out[0, len(ids) :].tolist()
    finally:
        lm.model.set_attn_implementation("dynkv")


def doc_ids(lm, n_words=260, seed=1):
    return encode(lm.tokenizer, text_of(n_words, seed))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "phi3"])
def test_full_budget_equals_plain_forward(models, arch):
    lm = load_model(models[arch])
    ids = doc_ids(lm)
    p = prompt_ids(lm.tokenizer, PROMPT, QUESTION)
    full = p.prefix + ids + p.suffix
    ref = plain_logits(lm, full)
    ref_answer = plain_greedy(lm, full, 6)
    gen = GenerationSettings(max_new_tokens=6)
    for chunk in (1 if arch == "llama" else 13, 64, 4096):
        for method in ("dynamickv", "snapkv", "full", "adakv"):
            eng = Engine(lm, CompressionSettings(method=method, budget="100%", chunk_size=chunk), gen)
            doc = eng.compress(ids, PROMPT, question=QUESTION)
            ans = eng.ask(doc, QUESTION, keep_logits=True)
            assert (ans.first_logits - ref).abs().max().item() < 1e-4, (arch, chunk, method)
            assert ans.token_ids == ref_answer[: len(ans.token_ids)] and len(ans.token_ids) == 6
    # the compressing code path with a budget that keeps everything (length unknown: no shortcut to `full`)
    for method in ("dynamickv", "adakv", "h2o"):
        eng = Engine(lm, CompressionSettings(method=method, budget="100000", chunk_size=37), gen)
        doc = eng.compress(iter([ids[:100], ids[100:]]), PROMPT, question=QUESTION)
        assert doc.stats.method == method and doc.stats.kept_per_layer == [len(ids)] * lm.shape.num_layers
        ans = eng.ask(doc, QUESTION, keep_logits=True)
        assert (ans.first_logits - ref).abs().max().item() < 1e-4
        assert ans.token_ids == ref_answer


def _head_entries(layer, h):
    """Keys [n, d], values [n, d] and positions [n] of KV head ``h`` of a uniform or ragged layer."""
    if getattr(layer, "ragged", False):
        k, v, pos, _ = layer.head(h)
        return k, v, pos
    return layer.keys[0, h], layer.values[0, h], layer.positions[h]


def _explicit_mask_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
    """Reference: eager attention per KV head with an explicit mask from original positions (key pos <= query pos).

    It reads the kept entries straight from the cache layer (after this call's tokens were appended).
    """
    layer = kw["ref_cache"].layers[module.layer_idx]
    qpos = kw["ref_qpos"]  # [q]
    G = len(layer.lens) if getattr(layer, "ragged", False) else layer.keys.shape[1]
    g = query.shape[1] // G
    outs = []
    for h in range(G):
        k, v, kpos = _head_entries(layer, h)
        logits = query[0, h * g : (h + 1) * g].float() @ k.float().T * scaling  # [g, q, n]
        logits = logits.masked_fill(~(kpos[None, :] <= qpos[:, None])[None], float("-inf"))
        outs.append(torch.softmax(logits, -1) @ v.float())
    out = torch.cat(outs, 0)  # [H, q, d]
    return out.to(query.dtype).transpose(0, 1)[None].contiguous(), None


@pytest.mark.parametrize("method", method_matrix())
def test_suffix_and_decode_match_explicit_masks(llama, method):
    from transformers import AttentionInterface

    AttentionInterface.register("dynkv_ref", _explicit_mask_attention)
    lm = llama
    eng = Engine(lm, CompressionSettings(method=method, budget="12", chunk_size=40), GenerationSettings(3))
    doc = eng.compress(doc_ids(lm), PROMPT, question=QUESTION)
    lengths = doc.cache.lengths()
    if "adakv" in method:  # heads of a layer hold different numbers of tokens
        assert doc.cache.ragged and any(len(set(n)) > 1 for n in lengths)
    elif method == "dynamickv":
        assert len(set(lengths)) > 1, "layers should hold different numbers of tokens"
    ref_cache = copy.deepcopy(doc.cache)
    suffix = prompt_ids(lm.tokenizer, PROMPT, QUESTION).suffix
    ans = eng.ask(doc, QUESTION, keep_logits=True)
    assert doc.cache.lengths() == lengths  # the question left the cache
    # reference: same kept tokens, explicit position masks, eager attention, token by token through the answer
    lm.model.set_attn_implementation("dynkv_ref")
    try:
        with torch.no_grad():
            ids = suffix
            for step in range(len(ans.token_ids)):
                qpos = torch.arange(ref_cache.next_pos, ref_cache.next_pos + len(ids))
                ref_cache.pending_positions = qpos
                out = lm.model(
                    torch.tensor([ids]),
                    position_ids=qpos[None],
                    past_key_values=ref_cache,
                    use_cache=True,
                    ref_cache=ref_cache,
                    ref_qpos=qpos,
                )
                ref_cache.next_pos += len(ids)
                logits = out.logits[0, -1]
                if step == 0:
                    assert (logits - ans.first_logits).abs().max().item() < 1e-4
                assert int(logits.argmax()) == ans.token_ids[step]
                ids = [ans.token_ids[step]]
    finally:
        lm.model.set_attn_implementation("dynkv")


@pytest.mark.parametrize("method", method_matrix(full=False))
@pytest.mark.parametrize("observation", ["probe", "tail"])
def test_memory_bounded_after_every_chunk(llama, method, observation):
    lm = llama
    B, w, C = 16, 4, 48
    ret = dict(observation=observation, window=w, r_max=3.0, update_interval=3)
    settings = CompressionSettings(method=method, budget=str(B), chunk_size=C, retention=ret)
    eng = Engine(lm, settings)
    seen = []
    doc = eng.compress(doc_ids(lm, 500), PROMPT, question=QUESTION, on_progress=seen.append)
    L = lm.shape.num_layers
    G = lm.shape.num_kv_heads
    pin = settings.spec.create(B, L, G).pinned_window  # tail observation and H2O keep the last window
    assert len(seen) == doc.stats.chunks > 5
    for p in seen:
        assert sum(p.kept_per_layer) <= B * L + pin * L + L  # (+L: a ragged layer's mean is rounded)
        assert max(p.kept_per_layer) <= 3 * B + pin + 1
    per_head = doc.cache.kept_per_head()
    for layer, heads in zip(doc.cache.layers, per_head):
        assert len(heads) == G == 2  # KV heads, never repeated query heads
        for h in range(G):
            pos = _head_entries(layer, h)[2]
            assert torch.all(pos[1:] > pos[:-1])  # ascending, no duplicates
    if "adakv" in method:
        assert doc.cache.ragged and sum(sum(h) for h in per_head) <= G * (B + pin) * L
        # flat storage: bytes are exactly the kept entries, no padding to the longest head
        es = 2 * lm.shape.head_dim * 4 + 8 + 4
        assert doc.cache.bytes_used() == es * sum(sum(h) + G * doc.stats.prefix_tokens for h in per_head)
    assert doc.stats.bytes_used == doc.cache.bytes_used() < doc.stats.full_kv_bytes
    if method == "dynamickv":
        assert sum(sum(h) for h in per_head) == B * L * G
    if pin:  # the document's last window is kept in every layer and head
        last = doc.stats.prefix_tokens + doc.stats.doc_tokens - 1
        for layer in doc.cache.layers:
            for h in range(G):
                assert torch.isin(torch.arange(last - w + 1, last + 1), _head_entries(layer, h)[2]).all()


def test_heads_keep_their_own_tokens(llama):
    eng = Engine(llama, CompressionSettings(method="snapkv", budget="10", chunk_size=64))
    doc = eng.compress(doc_ids(llama, 400), PROMPT, question=QUESTION)
    assert any(not torch.equal(layer.positions[0], layer.positions[1]) for layer in doc.cache.layers)


def test_several_questions_one_cache(llama):
    eng = Engine(llama, CompressionSettings(budget="20", chunk_size=64), GenerationSettings(max_new_tokens=5))
    doc = eng.compress(doc_ids(llama), PROMPT, probe="a general question")
    before = (doc.cache.lengths(), doc.cache.next_pos)
    a1 = eng.ask(doc, QUESTION)
    a2 = eng.ask(doc, "who owns the garden")
    a3 = eng.ask(doc, QUESTION)
    assert a1.token_ids == a3.token_ids and len(a1.token_ids) == 5
    assert (doc.cache.lengths(), doc.cache.next_pos) == before
    assert a2.question == "who owns the garden"


@pytest.mark.parametrize("method", method_matrix())
def test_save_load_ask_again(llama, models, tmp_path, method):
    eng = Engine(llama, CompressionSettings(method=method, budget="3%", chunk_size=50), GenerationSettings(6))
    doc = eng.compress(text_of(300), PROMPT, question=QUESTION, source="doc.txt")
    a = eng.ask(doc, QUESTION, keep_logits=True)
    path = doc.save(tmp_path / "doc.dkv")
    loaded = eng.load(path)
    b = eng.ask(loaded, QUESTION, keep_logits=True)
    assert a.token_ids == b.token_ids and torch.equal(a.first_logits, b.first_logits)
    assert loaded.stats.kept_per_layer == doc.stats.kept_per_layer and loaded.fingerprint == doc.fingerprint
    assert loaded.cache.kept_per_head() == doc.cache.kept_per_head()
    assert loaded.source == "doc.txt" and str(loaded.settings.budget) == "3%"
    # the file is safetensors with a JSON header, never pickle
    assert path.read_bytes()[8:9] == b"{"
    other = Engine(load_model(models["qwen3"]))
    with pytest.raises(CacheFileError, match="compressed with model"):
        other.load(path)
    (tmp_path / "bad.dkv").write_bytes(b"not a cache")
    with pytest.raises(CacheFileError, match="not a"):
        eng.load(tmp_path / "bad.dkv")


def test_rotate_keys_equals_rope_at_new_position(llama):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rot = llama.model.model.rotary_emb
    torch.manual_seed(0)
    k = torch.randn(1, 2, 5, llama.shape.head_dim)
    p = torch.tensor([[3, 10, 50, 51, 300]])
    new = torch.tensor([[1, 4, 20, 21, 100]])
    cos, sin = rot(k, p)
    k_at_p = apply_rotary_pos_emb(k, k, cos, sin)[1]
    cos2, sin2 = rot(k, new)
    k_at_new = apply_rotary_pos_emb(k, k, cos2, sin2)[1]
    moved = rotate_keys(k_at_p, (new - p).expand(2, 5), llama.inv_freq)
    assert torch.allclose(moved, k_at_new, atol=1e-5)


def test_document_longer_than_positions_completes_in_compact_mode(tmp_path):
    lm = load_model(make_model(tmp_path / "short", "qwen2", max_pos=160))
    gen = GenerationSettings(max_new_tokens=4)
    eng = Engine(lm, CompressionSettings(method="dynamickv", budget="12", chunk_size=32), gen)
    ids = doc_ids(lm, 700)
    assert len(ids) > 3 * lm.max_positions
    doc = eng.compress(ids, PROMPT, question=QUESTION)
    assert doc.stats.compact_positions and doc.stats.compactions >= 2
    for layer in doc.cache.layers:
        assert int(layer.positions.max()) < lm.max_positions
        assert torch.all(layer.positions[:, 1:] >= layer.positions[:, :-1])
    ans = eng.ask(doc, QUESTION)
    assert len(ans.token_ids) == 4 or ans.stop_reason == "eos"
    tight = Engine(lm, CompressionSettings(budget="12", chunk_size=150), GenerationSettings(max_new_tokens=64))
    with pytest.raises(UsageError, match="position limit"):
        tight.compress(ids, PROMPT, question=QUESTION)


def test_generation_sampling_stop_and_streaming(llama):
    eng = Engine(llama, CompressionSettings(budget="16", chunk_size=64))
    doc = eng.compress(doc_ids(llama), PROMPT, question=QUESTION)
    hot = GenerationSettings(max_new_tokens=8, temperature=1.5, top_p=0.9, seed=7)
    a, b = eng.ask(doc, QUESTION, generation=hot), eng.ask(doc, QUESTION, generation=hot)
    assert a.token_ids == b.token_ids
    pieces = []
    greedy = eng.ask(doc, QUESTION, generation=GenerationSettings(max_new_tokens=8), on_token=pieces.append)
    assert "".join(pieces) == greedy.text
    if len(greedy.text) > 2:
        stop = greedy.text[1:3]
        cut = eng.ask(doc, QUESTION, generation=GenerationSettings(max_new_tokens=8, stop=[stop]))
        assert cut.stop_reason == "stop_string" and stop not in cut.text


def test_empty_document_is_an_error(llama):
    with pytest.raises(UsageError, match="empty"):
        Engine(llama).compress([], PROMPT, question=QUESTION)


def test_chunking_regroups_pieces_exactly():
    import random

    from dynkv_cli.engine import _chunked

    rnd = random.Random(0)
    for _ in range(200):
        pieces = [list(range(rnd.randint(0, 30))) for _ in range(rnd.randint(0, 6))]
        size = rnd.randint(1, 10)
        out = list(_chunked(iter(pieces), size))
        assert [x for c in out for x in c] == [x for p in pieces for x in p]
        assert all(len(c) == size for c in out[:-1]) and (not out or 0 < len(out[-1]) <= size)


@pytest.mark.parametrize("method", ["full", "snapkv"])
def test_teacher_force_scores_the_greedy_answer_and_leaves_the_cache(llama, method):
    eng = Engine(llama, CompressionSettings(method=method, budget="24", chunk_size=40), GenerationSettings(6))
    doc = eng.compress(doc_ids(llama), PROMPT, question=QUESTION)
    lengths = doc.cache.lengths()
    ans = eng.ask(doc, QUESTION)
    forced = eng.teacher_force(doc, QUESTION, ans.token_ids)
    assert doc.cache.lengths() == lengths
    assert [top for _, top in forced] == ans.token_ids  # greedy: each token was the argmax where it stands
    assert all(lp <= 0 for lp, _ in forced)
    assert eng.teacher_force(doc, QUESTION, ans.token_ids[:1])[0][1] == ans.token_ids[0]
