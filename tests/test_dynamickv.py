"""DynamicKV allocation arithmetic on hand-made scores (no model)."""

from __future__ import annotations

import random

import pytest
import torch

from dynkv_cli.cache import CompressedCache
from dynkv_cli.engine import _Pass
from dynkv_cli.methods.dynamickv import DynamicKVMethod, DynamicKVSettings, apportion, progressive_counts


def test_apportion_exact_sum_proportional():
    assert apportion(6, [2, 2], [0, 0], [4, 4]) == [3, 3]
    assert apportion(10, [1, 1, 1], [0, 0, 0], [10, 10, 10]) in ([4, 3, 3], [3, 4, 3], [3, 3, 4])
    assert sum(apportion(10, [1, 1, 1], [0, 0, 0], [10, 10, 10])) == 10
    # caps: a full layer gives its surplus to those that can take it
    assert apportion(12, [10, 1, 1], [0, 0, 0], [4, 10, 10]) == [4, 4, 4]
    # floors hold even for a layer nobody voted for
    assert apportion(10, [1, 0], [3, 3], [10, 10]) == [7, 3]
    # everything fits: every layer keeps all it has; too little: floors win
    assert apportion(100, [1, 2], [0, 0], [5, 7]) == [5, 7]
    assert apportion(1, [1, 2], [2, 2], [5, 7]) == [2, 2]


@pytest.mark.parametrize("seed", range(40))
def test_apportion_random_invariants(seed):
    rnd = random.Random(seed)
    n = rnd.randint(1, 9)
    hi = [rnd.randint(0, 50) for _ in range(n)]
    lo = [rnd.randint(0, h) for h in hi]
    w = [rnd.choice([0, 0.5, 1, 3, 7]) for _ in range(n)]
    total = rnd.randint(0, 300)
    x = apportion(total, w, lo, hi)
    assert all(a <= v <= b for a, v, b in zip(lo, x, hi))
    assert sum(x) == min(max(total, sum(lo)), sum(hi))


def test_progressive_counts_budget_exact_with_window_and_floor():
    torch.manual_seed(0)
    scores = [torch.rand(2, 30) for _ in range(5)]
    for s in scores:
        s[:, -3:] = float("-inf")  # 3 pinned window entries per layer
    counts = progressive_counts(scores, pinned=[3] * 5, available=50, budget=10, num_kv_heads=2, floor=5)
    assert sum(counts) == 50
    assert all(5 <= c <= 30 for c in counts)


def _fake_cache(L: int, n: int, G: int = 1) -> CompressedCache:
    """A cache whose layers are still empty, as in a one-shot prefill before each layer's attention."""
    cache = CompressedCache(L)
    for layer in cache.layers:
        layer.lazy_initialization(torch.zeros(1, G, 0, 4), torch.zeros(1, G, 0, 4))
    return cache


def _arrive(cache: CompressedCache, l: int, n: int, G: int = 1) -> None:
    """Layer ``l``'s attention appends the ``n`` document tokens (what ``cache.update`` does in a forward)."""
    k = torch.randn(1, G, n, 4)
    cache.pending_positions = torch.arange(n)
    cache.layers[l].update(k, k.clone())


def _run_one_shot(scores, B, L, r_max, m, monkeypatch):
    """Drive the engine's real per-layer step with hand-made observation scores (pooling off)."""
    n = len(scores[0])
    cache = _fake_cache(L, n)
    settings = DynamicKVSettings(pooling="none", r_max=r_max, update_interval=m, observation="probe")
    method = DynamicKVMethod(settings, B, L, 1)
    table = {l: torch.tensor([scores[l]]) for l in range(L)}
    state = _Pass(cache, method, n_chunk=n, n_probe=0, pin_from=None, n_obs=1)
    calls = []

    def fake_scores(query, keys, scaling, n_candidates):
        calls.append(n_candidates)
        return table[len(calls) - 1][:, :n_candidates]

    monkeypatch.setattr("dynkv_cli.engine.observation_scores", fake_scores)
    sizes_after = []
    for l in range(L):
        _arrive(cache, l, n)
        state.after_attention(l, torch.zeros(1, 1, 1, 4), 1.0)
        sizes_after.append(cache.kept_per_layer())
    return cache, sizes_after


def test_one_shot_worked_example(monkeypatch):
    """DynamicKV's update (docs/algorithms.md) by hand: L=3, B=2 (T=6), r_max=2, m=2, one KV head, 6 tokens."""
    scores = [
        [0.90, 0.80, 0.10, 0.05, 0.02, 0.01],
        [0.50, 0.40, 0.30, 0.20, 0.02, 0.01],
        [0.97, 0.96, 0.95, 0.94, 0.03, 0.01],
    ]
    cache, sizes = _run_one_shot(scores, B=2, L=3, r_max=2, m=2, monkeypatch=monkeypatch)
    # layer 0 keeps its top r_max*B = 4; no update yet (m = 2)
    assert sizes[0] == [4, 0, 0]
    # update after layer 1: global top k = B*G*(l+1) = 4 of the kept scores = .9 .8 (L0) .5 .4 (L1) -> c = [2, 2];
    # the budget available to layers 0..1 is all of T = 6 (layer 2 holds nothing yet) -> shares 3, 3
    assert sizes[1] == [3, 3, 0]
    # layer 2 keeps 4, then the last layer always updates: top 6 of all = .97 .96 .95 .94 (L2) .9 .8 (L0)
    # -> c = [2, 0, 4] -> shares of 6 = [2, 0, 4]: budgets sum exactly to T
    assert sizes[2] == [2, 0, 4]
    assert cache.layers[0].positions[0].tolist() == [0, 1]
    assert cache.layers[1].positions[0].tolist() == []
    assert cache.layers[2].positions[0].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("L,m", [(4, 4), (5, 4), (7, 3), (3, 1), (6, 10)])
def test_any_layers_and_interval(monkeypatch, L, m):
    torch.manual_seed(L * 10 + m)
    scores = [torch.rand(40).tolist() for _ in range(L)]
    cache, sizes = _run_one_shot(scores, B=5, L=L, r_max=3, m=m, monkeypatch=monkeypatch)
    assert sum(sizes[-1]) == 5 * L  # the last layer always re-allocates, even when L % m != 0
    assert all(c <= 15 for step in sizes for c in step)
    method = DynamicKVMethod(DynamicKVSettings(update_interval=m), 5, L, 1)
    updates = [l for l in range(L) if method.is_update_layer(l)]
    assert updates[-1] == L - 1 and all((l + 1) % m == 0 for l in updates[:-1])


def test_floor_enforced(monkeypatch):
    scores = [[1.0] * 20, [0.001] * 20, [0.9] * 20]
    settings = DynamicKVSettings(pooling="none", r_max=4, r_min=0.5, update_interval=1, observation="probe")
    cache = _fake_cache(3, 20)
    method = DynamicKVMethod(settings, 4, 3, 1)
    table = [torch.tensor([s]) for s in scores]
    calls = []

    def fake(q, k, s, n):
        calls.append(n)
        return table[len(calls) - 1]

    monkeypatch.setattr("dynkv_cli.engine.observation_scores", fake)
    state = _Pass(cache, method, n_chunk=20, n_probe=0, pin_from=None, n_obs=1)
    for l in range(3):
        _arrive(cache, l, 20)
        state.after_attention(l, torch.zeros(1, 1, 1, 4), 1.0)
    kept = cache.kept_per_layer()
    assert sum(kept) == 12 and min(kept) >= 2  # r_min * B = 2 even for the layer with no votes


def test_normalize_lets_a_layer_of_flat_attention_compete():
    flat = torch.full((1, 10), 0.01)
    peaky = torch.tensor([[1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])
    raw = DynamicKVMethod(DynamicKVSettings(update_interval=1), 4, 2, 1).reallocate(1, [10, 10], [flat, peaky], [0, 0])
    norm = DynamicKVMethod(DynamicKVSettings(update_interval=1, normalize=True), 4, 2, 1)
    shared = norm.reallocate(1, [10, 10], [flat, peaky], [0, 0])
    assert raw == [0, 8]  # raw mass: the flat layer loses every vote and falls to nothing
    assert sum(shared) == 8 and shared[0] > 0
