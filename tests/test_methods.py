"""Method pieces without a model: MixKV mixing, AdaKV head counts, H2O accumulation, PyramidKV schedule."""

from __future__ import annotations

import pytest
import torch

from dynkv_cli.methods import METHODS
from dynkv_cli.methods.adakv import head_counts
from dynkv_cli.methods.base import Candidates
from dynkv_cli.methods.mixkv import head_redundancy, mix_scores
from dynkv_cli.methods.pyramidkv import PyramidKVMethod, PyramidKVSettings


def test_redundancy_of_identical_and_spread_keys():
    same = torch.ones(1, 10, 8)
    assert head_redundancy(same).item() == pytest.approx(1.0)
    eye = torch.eye(8)[None]  # orthogonal unit keys: mean pairwise cosine 0
    assert head_redundancy(eye).item() == pytest.approx(0.0, abs=1e-6)


def test_mix_prefers_diverse_keys_in_a_redundant_head_and_keeps_inf():
    keys = torch.ones(1, 6, 4) + 0.01 * torch.randn(1, 6, 4)
    keys[0, 5] = torch.tensor([1.0, -1.0, 1.0, -1.0])  # the odd one out
    a = torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.2, 0.1]])
    mixed = mix_scores(a, keys)
    assert int(mixed.argmax()) == 5  # redundant head: diversity wins over a slightly lower importance
    pinned = a.clone()
    pinned[0, 0] = float("inf")
    assert mix_scores(pinned, keys)[0, 0] == float("inf")
    # a head of orthogonal keys has redundancy 0: the importance order stays
    eye = torch.eye(6)[None]
    assert torch.equal(
        mix_scores(torch.tensor([[0.5, 0.1, 0.2, 0.3, 0.4, 0.6]]), eye).argsort(), torch.tensor([[1, 2, 3, 4, 0, 5]])
    )


def test_head_counts_share_total_with_safeguard():
    strong = torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0, 4.0])
    weak = torch.tensor([0.1, 0.05, 0.04, 0.03, 0.02, 0.01])
    counts = head_counts([strong, weak], [0, 0], total=6, alpha=0.2)
    assert sum(counts) == 6 and counts[0] > counts[1] >= 1  # the safeguard leaves the weak head something
    assert head_counts([strong, weak], [0, 0], total=6, alpha=1.0) == [3, 3]  # alpha 1: uniform
    assert head_counts([strong, weak], [0, 0], total=50, alpha=0.2) == [6, 6]  # everything fits
    pinned = weak.clone()
    pinned[-2:] = float("-inf")
    assert head_counts([strong, pinned], [0, 2], total=6, alpha=0.0)[1] >= 2  # pinned entries always stay


def test_h2o_accumulates_previous_attention():
    h2o = METHODS["h2o"](None, 8, 2, 1)
    c = Candidates(
        0,
        torch.tensor([[0.1, 0.2, 0.3]]),
        torch.tensor([[0, 1, 2]]),
        torch.tensor([[1.0, 0.0, 0.0]]),
        2,
        torch.zeros(1, 3, 4),
        torch.zeros(1, 3, 4),
    )
    assert torch.allclose(h2o.score(c), torch.tensor([[1.1, 0.2, 0.3]]))
    assert h2o.pinned_window == 8 and h2o.observation == "all"


def test_pyramid_schedule_falls_and_averages_to_budget():
    m = PyramidKVMethod(PyramidKVSettings(observation="tail", window=8), 64, 8, 2)
    caps = [m.capacity(l) for l in range(8)]
    assert caps == sorted(caps, reverse=True) and caps[0] > caps[-1]
    assert abs(sum(caps) / 8 - 64) <= 1
    tiny = PyramidKVMethod(PyramidKVSettings(observation="tail", window=8), 6, 4, 2)
    assert [tiny.capacity(l) for l in range(4)] == [6] * 4  # too short for the schedule: uniform


def test_h2o_blockwise_observation_equals_one_block(tmp_path, monkeypatch):
    from tiny import make_model, text_of

    from dynkv_cli import CompressionSettings, Engine, TaskPrompt, load_model
    from dynkv_cli.engine import _Pass

    lm = load_model(make_model(tmp_path / "m", "qwen2", layers=2))
    prompt = TaskPrompt(after_document="\nq: {question}")
    eng = Engine(lm, CompressionSettings(method="h2o", budget="12", chunk_size=40))
    one = eng.compress(text_of(200), prompt, question="x")
    monkeypatch.setattr(_Pass, "OBS_BLOCK", 7)
    many = eng.compress(text_of(200), prompt, question="x")
    for a, b in zip(one.cache.layers, many.cache.layers):
        assert torch.equal(a.positions, b.positions)
        assert torch.allclose(a.scores, b.scores, atol=1e-5)
