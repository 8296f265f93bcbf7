"""Every kernel against its torch reference: dtypes, GQA ratios, head dims and odd shapes.

Without CUDA the Triton kernels run in the interpreter (``TRITON_INTERPRET=1``, set by conftest), so
shapes stay small. bf16 ``tl.dot`` is computed in fp32 under the interpreter (triton-lang/triton#11584);
a GPU run of this file checks the bf16 MMA path.
"""

from __future__ import annotations

import subprocess
import sys

import dynkv_cli.kernels as K
import pytest
import torch
from dynkv_cli.kernels import (
    observation_scores_ref,
    pool_scores_ref,
    ragged_decode_attention_ref,
    triton_available,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

FP32 = {"atol": 1e-5, "rtol": 1e-4}
HALF = {"atol": 1e-4, "rtol": 1e-2}  # relative 1e-2; atol for scores near 0


def _obs_inputs(G: int, g: int, w: int, n: int, d: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(G * g, w, d, generator=gen) * 2.0  # sharper softmax than unit variance
    keys = torch.randn(G, n, d, generator=gen)
    return query.to(DEVICE, dtype), keys.to(DEVICE, dtype)


# --------------------------------------------------------------------------------------------------
# torch references


def test_observation_scores_ref_matches_dense_softmax():
    G, g, w, n, d = 2, 2, 3, 10, 16
    query, keys = _obs_inputs(G, g, w, n, d, torch.float32)
    got = observation_scores_ref(query, keys, d**-0.5, n)
    for kv in range(G):
        want = torch.zeros(n)
        for h in range(kv * g, (kv + 1) * g):
            for i in range(w):
                last = n - w + i
                want[: last + 1] += torch.softmax(query[h, i].cpu() @ keys[kv, : last + 1].cpu().T * d**-0.5, 0)
        torch.testing.assert_close(got[kv].cpu(), want / g, **FP32)
    # Each query's weights sum to 1, so each head's scores over all keys sum to w.
    torch.testing.assert_close(got.sum(-1).cpu(), torch.full((G,), float(w)), **FP32)


def test_observation_scores_ref_query_that_sees_nothing_contributes_zero():
    query, keys = _obs_inputs(1, 1, 5, 2, 16, torch.float32)  # w > n: the first 3 queries see no key
    got = observation_scores_ref(query, keys, 0.25, 2)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.sum().cpu(), torch.tensor(2.0), **FP32)


def test_pool_scores_ref_respects_gaps():
    scores = torch.tensor([[1.0, 5.0, 2.0, 9.0]])
    positions = torch.tensor([[0, 1, 2, 10]])  # key 3 is far from the others
    torch.testing.assert_close(pool_scores_ref(scores, positions, 3, "max"), torch.tensor([[5.0, 5.0, 5.0, 9.0]]))
    torch.testing.assert_close(pool_scores_ref(scores, positions, 3, "avg"), torch.tensor([[6.0, 8.0, 7.0, 9.0]]) / 3)
    with pytest.raises(ValueError, match="unknown pooling"):
        pool_scores_ref(scores[:, :1], positions[:, :1], 3, "mean")


def test_ragged_decode_ref_matches_per_head_sdpa():
    G, g, d = 3, 2, 16
    lens = [4, 0, 7]
    offsets = torch.tensor([0, *lens]).cumsum(0)
    q, k, v = torch.randn(G * g, d), torch.randn(sum(lens), d), torch.randn(sum(lens), d)
    got = ragged_decode_attention_ref(q, k, v, offsets, d**-0.5)
    for h in range(G * g):
        kv = h // g
        lo, hi = int(offsets[kv]), int(offsets[kv + 1])
        if hi == lo:
            assert (got[h] == 0).all()
            continue
        want = torch.nn.functional.scaled_dot_product_attention(
            q[h][None, None, None], k[lo:hi][None, None], v[lo:hi][None, None]
        )[0, 0, 0]
        torch.testing.assert_close(got[h], want, **FP32)


# --------------------------------------------------------------------------------------------------
# observation scores: Triton vs reference


@needs_triton
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("g", [1, 2, 4, 8])
@pytest.mark.parametrize("w", [1, 7, 8, 32])
@pytest.mark.parametrize("n", [1, 37, 130])
def test_observation_scores_triton_fp32(n, w, g, d):
    from dynkv_cli.kernels.obs_scores_triton import observation_scores_triton

    G = 2 if g <= 2 else 1
    query, keys = _obs_inputs(G, g, w, n, d, torch.float32, seed=n * 1000 + w * 10 + g)
    for n_candidates in sorted({n, max(0, n - w)}):
        got = observation_scores_triton(query, keys, d**-0.5, n_candidates)
        want = observation_scores_ref(query, keys, d**-0.5, n_candidates)
        assert got.shape == (G, n_candidates) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, **FP32)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("G", "g", "w", "n", "d"), [(2, 4, 8, 130, 128), (1, 8, 32, 37, 64), (4, 1, 7, 65, 64)])
def test_observation_scores_triton_half(dtype, G, g, w, n, d):
    from dynkv_cli.kernels.obs_scores_triton import observation_scores_triton

    query, keys = _obs_inputs(G, g, w, n, d, dtype)
    got = observation_scores_triton(query, keys, d**-0.5, n)
    want = observation_scores_ref(query, keys, d**-0.5, n)  # same 16-bit inputs, fp32 math
    torch.testing.assert_close(got, want, **HALF)


@needs_triton
def test_observation_scores_triton_query_dtype_follows_keys():
    from dynkv_cli.kernels.obs_scores_triton import observation_scores_triton

    query, keys = _obs_inputs(2, 2, 4, 50, 64, torch.float16)
    got = observation_scores_triton(query.float(), keys, 0.125, 50)  # fp32 query, fp16 keys
    torch.testing.assert_close(got, observation_scores_ref(query, keys, 0.125, 50), **HALF)


@needs_triton
@pytest.mark.parametrize("num_splits", [2, 3])
def test_observation_scores_triton_key_splits_and_strides(num_splits):
    from dynkv_cli.kernels.obs_scores_triton import observation_scores_triton

    G, g, w, n, d = 2, 2, 8, 190, 64
    query, keys = _obs_inputs(G, g, w, n, d, torch.float32)
    query = query.transpose(0, 1).contiguous().transpose(0, 1)  # [H, w, d] view with non-default strides
    keys = torch.cat([keys, keys], dim=-1)[..., :d]  # row stride 2d
    assert not query.is_contiguous() and not keys.is_contiguous()
    got = observation_scores_triton(query, keys, d**-0.5, n - 5, num_splits=num_splits)
    torch.testing.assert_close(got, observation_scores_ref(query, keys, d**-0.5, n - 5), **FP32)


@needs_triton
def test_observation_scores_triton_rejects_bad_shapes():
    from dynkv_cli.kernels.obs_scores_triton import observation_scores_triton

    query, keys = _obs_inputs(3, 1, 2, 10, 16, torch.float32)
    with pytest.raises(ValueError, match="H = G\\*g"):
        observation_scores_triton(query, keys[:2], 0.25, 10)
    with pytest.raises(ValueError, match="n_candidates"):
        observation_scores_triton(query, keys, 0.25, 11)


# --------------------------------------------------------------------------------------------------
# pooling: Triton vs reference


@needs_triton
@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("kernel", [3, 5, 7])
@pytest.mark.parametrize("n", [1, 5, 300])
def test_pool_scores_triton(kind, kernel, n):
    from dynkv_cli.kernels.obs_scores_triton import pool_scores_triton

    gen = torch.Generator().manual_seed(kernel * 100 + n)
    G = 3
    scores = torch.rand(G, n, generator=gen).to(DEVICE)
    gaps = torch.randint(1, 4, (G, n), generator=gen)  # gaps of 1..3 positions: some pool, some do not
    positions = gaps.cumsum(-1).to(DEVICE)
    got = pool_scores_triton(scores, positions, kernel, kind)
    torch.testing.assert_close(got, pool_scores_ref(scores, positions, kernel, kind), **FP32)


@needs_triton
def test_pool_scores_triton_passthrough():
    from dynkv_cli.kernels.obs_scores_triton import pool_scores_triton

    scores, positions = torch.rand(2, 9, device=DEVICE), torch.arange(9, device=DEVICE).repeat(2, 1)
    assert pool_scores_triton(scores, positions, 5, "none") is scores
    assert pool_scores_triton(scores, positions, 1, "max") is scores
    with pytest.raises(ValueError, match="unknown pooling"):
        pool_scores_triton(scores, positions, 5, "mean")


# --------------------------------------------------------------------------------------------------
# ragged decode attention: Triton vs reference


def _ragged_inputs(lens: list[int], g: int, d: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q = torch.randn(len(lens) * g, d, generator=gen) * 2.0
    k = torch.randn(T, d, generator=gen)
    v = torch.randn(T, d, generator=gen)
    offsets = torch.tensor([0, *lens], dtype=torch.int64).cumsum(0)
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype), offsets.to(DEVICE)


RAGGED_LENS = [[37], [0, 65, 1, 130], [64, 0, 0, 200, 3, 63, 128, 7]]


@needs_triton
@pytest.mark.parametrize("num_splits", [None, 3])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("g", [1, 4, 8])
@pytest.mark.parametrize("lens", RAGGED_LENS, ids=lambda x: f"G{len(x)}")
def test_ragged_decode_triton_fp32(lens, g, d, num_splits):
    from dynkv_cli.kernels.ragged_decode import ragged_decode_attention_triton

    q, k, v, offsets = _ragged_inputs(lens, g, d, torch.float32, seed=g * d + len(lens))
    got = ragged_decode_attention_triton(q, k, v, offsets, d**-0.5, num_splits=num_splits)
    want = ragged_decode_attention_ref(q, k, v, offsets, d**-0.5)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got, want, **FP32)
    for h, n in enumerate(lens):  # heads without keys give zeros
        if n == 0:
            assert (got[h * g : (h + 1) * g] == 0).all()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("g", "d"), [(1, 128), (4, 64), (8, 128)])
def test_ragged_decode_triton_half(dtype, g, d):
    from dynkv_cli.kernels.ragged_decode import ragged_decode_attention_triton

    q, k, v, offsets = _ragged_inputs(RAGGED_LENS[1], g, d, dtype)
    got = ragged_decode_attention_triton(q, k, v, offsets, d**-0.5, num_splits=2)
    want = ragged_decode_attention_ref(q, k, v, offsets, d**-0.5)
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)


# --------------------------------------------------------------------------------------------------
# dispatch


def test_dispatch_uses_reference_on_cpu(monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("CPU dispatch only")
    monkeypatch.delenv("DYNKV_FORCE_TRITON", raising=False)
    query, keys = _obs_inputs(1, 2, 4, 20, 16, torch.float32)
    assert torch.equal(K.observation_scores(query, keys, 0.25, 20), observation_scores_ref(query, keys, 0.25, 20))
    q, k, v, offsets = _ragged_inputs([5, 0], 2, 16, torch.float32)
    assert torch.equal(
        K.ragged_decode_attention(q, k, v, offsets, 0.25), ragged_decode_attention_ref(q, k, v, offsets, 0.25)
    )


@needs_triton
def test_dispatch_forced_triton(monkeypatch):
    import dynkv_cli.kernels.obs_scores_triton as ost
    import dynkv_cli.kernels.ragged_decode as rd

    monkeypatch.setenv("DYNKV_FORCE_TRITON", "1")
    calls = []

    def spy(fn):
        def wrapped(*args, **kwargs):
            calls.append(fn.__name__)
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(ost, "observation_scores_triton", spy(ost.observation_scores_triton))
    monkeypatch.setattr(ost, "pool_scores_triton", spy(ost.pool_scores_triton))
    monkeypatch.setattr(rd, "ragged_decode_attention_triton", spy(rd.ragged_decode_attention_triton))

    query, keys = _obs_inputs(2, 2, 4, 40, 64, torch.float32)
    torch.testing.assert_close(
        K.observation_scores(query, keys, 0.125, 40), observation_scores_ref(query, keys, 0.125, 40), **FP32
    )
    scores, positions = torch.rand(2, 40, device=DEVICE), torch.arange(40, device=DEVICE).repeat(2, 1)
    torch.testing.assert_close(
        K.pool_scores(scores, positions, 5, "avg"), pool_scores_ref(scores, positions, 5, "avg"), **FP32
    )
    q, k, v, offsets = _ragged_inputs([5, 0], 2, 64, torch.float32)
    torch.testing.assert_close(
        K.ragged_decode_attention(q, k, v, offsets, 0.125), ragged_decode_attention_ref(q, k, v, offsets, 0.125), **FP32
    )
    assert calls == ["observation_scores_triton", "pool_scores_triton", "ragged_decode_attention_triton"]


def test_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch\n"
        "import dynkv_cli.kernels as K\n"
        "assert not K.triton_available()\n"
        "from dynkv_cli.kernels.ragged_decode import ragged_decode_attention_triton\n"
        "q = torch.randn(2, 8); k = torch.randn(3, 8); off = torch.tensor([0, 3])\n"
        "print(K.ragged_decode_attention(q, k, k, off, 0.3).shape)\n"
        "print(K.observation_scores(torch.randn(2, 2, 8), torch.randn(1, 5, 8), 0.3, 5).shape)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:2] == ["torch.Size([2, 8])", "torch.Size([1, 5])"]
