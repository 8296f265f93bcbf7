"""Triton kernels for observation-window scores and gap-aware pooling.

Same signatures and results as :func:`dynkv_cli.kernels.scores.observation_scores_ref` and
:func:`dynkv_cli.kernels.scores.pool_scores_ref`. Import this module only when triton is available
(``dynkv_cli.kernels`` does so lazily). To run on the CPU, set ``TRITON_INTERPRET=1`` before importing.

Observation scores, two passes, never materialising the ``[w, n]`` weights:

1. ``_obs_row_stats_kernel``, grid ``(G, row blocks, key splits)``: for each query row (a group's
   ``g * w`` rows) stream key blocks of one split and keep the online-softmax running max ``m`` and
   denominator ``l`` (base 2, fp32). Splits of the key axis keep the GPU busy when ``G`` is small;
   their partial ``(m, l)`` are merged by a few torch ops on a ``[G, g*w, splits]`` tensor.
2. ``_obs_col_sums_kernel``, grid ``(G, key blocks)``: load one key block once, loop over the row
   blocks, and add ``exp2(s - m) / l`` over all rows into the block's column sums.

Keys are read once per pass (pass 2 only reads the candidates); queries are small and stay in cache.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _obs_row_stats_kernel(
    q_ptr,
    k_ptr,
    m_ptr,
    l_ptr,
    n,
    w,
    g,
    R,
    n_splits,
    keys_per_split,
    qk_scale,
    stride_qh,
    stride_qw,
    stride_qd,
    stride_kg,
    stride_kn,
    stride_kd,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    kv = tl.program_id(0)
    rb = tl.program_id(1)
    sp = tl.program_id(2)

    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)  # row r of the group = query head r // w, query r % w
    row_ok = rows < R
    qi = rows % w
    head = kv * g + rows // w
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < HEAD_DIM
    q = tl.load(
        q_ptr + head[:, None] * stride_qh + qi[:, None] * stride_qw + dd[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    last = tl.where(row_ok, n - w + qi, -1)  # last key each row sees (causal, aligned to the newest key)

    start = sp * keys_per_split
    stop = tl.minimum(start + keys_per_split, n)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    k_base = k_ptr + kv * stride_kg
    for j0 in tl.range(start, stop, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < stop
        k = tl.load(
            k_base + cols[:, None] * stride_kn + dd[None, :] * stride_kd,
            mask=col_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_R, BLOCK_N], log2 units
        visible = col_ok[None, :] & (cols[None, :] <= last[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet stay at l = 0
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(p, axis=1)
        m_i = m_new

    out = (kv * R + rows) * n_splits + sp  # partials are [G, R, n_splits], contiguous
    tl.store(m_ptr + out, m_i, mask=row_ok)
    tl.store(l_ptr + out, l_i, mask=row_ok)


@triton.jit
def _obs_col_sums_kernel(
    q_ptr,
    k_ptr,
    m_ptr,
    inv_l_ptr,
    out_ptr,
    n,
    n_candidates,
    w,
    g,
    R,
    qk_scale,
    inv_g,
    stride_qh,
    stride_qw,
    stride_qd,
    stride_kg,
    stride_kn,
    stride_kd,
    stride_og,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    kv = tl.program_id(0)
    kb = tl.program_id(1)

    cols = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_candidates
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < HEAD_DIM
    k = tl.load(
        k_ptr + kv * stride_kg + cols[:, None] * stride_kn + dd[None, :] * stride_kd,
        mask=col_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        k = k.to(tl.float32)
    kt = tl.trans(k)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in tl.range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        qi = rows % w
        head = kv * g + rows // w
        q = tl.load(
            q_ptr + head[:, None] * stride_qh + qi[:, None] * stride_qw + dd[None, :] * stride_qd,
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        m = tl.load(m_ptr + kv * R + rows, mask=row_ok, other=0.0)  # finite: -inf rows were mapped to 0
        inv_l = tl.load(inv_l_ptr + kv * R + rows, mask=row_ok, other=0.0)  # 0 for rows that saw no key
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
        visible = row_ok[:, None] & col_ok[None, :] & (cols[None, :] <= (n - w + qi)[:, None])
        p = tl.where(visible, tl.exp2(s - m[:, None]) * inv_l[:, None], 0.0)
        acc += tl.sum(p, axis=0)
    tl.store(out_ptr + kv * stride_og + cols, acc * inv_g, mask=col_ok)


@triton.jit
def _pool_scores_kernel(
    s_ptr,
    pos_ptr,
    out_ptr,
    n,
    stride_sg,
    stride_pg,
    stride_og,
    RADIUS: tl.constexpr,
    IS_MAX: tl.constexpr,
    KERNEL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < n
    s_row = s_ptr + row * stride_sg
    p_row = pos_ptr + row * stride_pg
    here = tl.load(s_row + idx, mask=ok, other=0.0).to(tl.float32)
    here_pos = tl.load(p_row + idx, mask=ok, other=0)
    acc = here
    # Same order as the reference (offsets -r .. r, skipping 0), so "avg" sums round identically.
    for o in tl.static_range(-RADIUS, RADIUS + 1):
        if o != 0:
            nb_idx = idx + o
            nb_ok = ok & (nb_idx >= 0) & (nb_idx < n)
            nb = tl.load(s_row + nb_idx, mask=nb_ok, other=0.0).to(tl.float32)
            nb_pos = tl.load(p_row + nb_idx, mask=nb_ok, other=0)
            diff = nb_pos - here_pos
            near = nb_ok & (diff <= RADIUS) & (diff >= -RADIUS)
            if IS_MAX:
                acc = tl.where(near, tl.maximum(acc, nb), acc)
            else:
                acc = acc + tl.where(near, nb, 0.0)
    if not IS_MAX:
        acc = acc / KERNEL
    tl.store(out_ptr + row * stride_og + idx, acc, mask=ok)


def _needs_upcast(dtype: torch.dtype) -> bool:
    """bf16 ``tl.dot`` is wrong under ``TRITON_INTERPRET=1`` (it multiplies the raw bit patterns,
    triton-lang/triton#11584), so the interpreter computes bf16 dots in fp32; GPUs use bf16 MMA."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def _check_inputs(query: torch.Tensor, keys: torch.Tensor, n_candidates: int) -> tuple[int, ...]:
    if query.dim() != 3 or keys.dim() != 3:
        raise ValueError(f"query must be [H, w, d] and keys [G, n, d]; got {tuple(query.shape)}, {tuple(keys.shape)}")
    H, w, d = query.shape
    G, n, dk = keys.shape
    if dk != d or G == 0 or H % G != 0:
        raise ValueError(f"query {tuple(query.shape)} and keys {tuple(keys.shape)} do not match (need H = G*g)")
    if query.dtype not in _SUPPORTED or keys.dtype not in _SUPPORTED:
        raise TypeError(f"query and keys must be one of {_SUPPORTED}; got {query.dtype}, {keys.dtype}")
    if query.device != keys.device:
        raise ValueError(f"query on {query.device}, keys on {keys.device}")
    if not 0 <= n_candidates <= n:
        raise ValueError(f"n_candidates={n_candidates} must lie in [0, n={n}]")
    return H, w, d, G, n


def _default_splits(device: torch.device, n_programs: int, key_blocks: int) -> int:
    """Key splits for pass 1: about four waves of programs on a GPU, a single split elsewhere."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(key_blocks, (4 * sms) // max(1, n_programs)))


def observation_scores_triton(
    query: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    n_candidates: int,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Triton version of :func:`observation_scores_ref`.

    ``[H, w, d]`` queries x ``[G, n, d]`` keys -> ``[G, n_candidates]`` fp32 scores.

    ``num_splits`` (pass 1 key splits) is chosen from the device when ``None``; tests pin it.
    A query of another dtype than the keys is cast to the keys' dtype (fp32/fp16/bf16).
    A query row that sees no key (only when ``w > n``) contributes nothing.
    """
    H, w, d, G, n = _check_inputs(query, keys, n_candidates)
    query = query.to(keys.dtype)  # the queries are few; the keys are never copied
    g = H // G
    R = g * w
    out = torch.zeros(G, n_candidates, device=keys.device, dtype=torch.float32)
    if n_candidates == 0 or w == 0:
        return out

    BLOCK_D = max(16, triton.next_power_of_2(d))
    BLOCK_R = max(16, min(64, triton.next_power_of_2(R)))
    BLOCK_N = 64
    upcast = _needs_upcast(query.dtype)
    precision = "ieee" if query.dtype == torch.float32 or upcast else "tf32"  # tf32: ignored for 16-bit
    qk_scale = float(scaling) * _LOG2E
    row_blocks = triton.cdiv(R, BLOCK_R)
    key_blocks = triton.cdiv(n, BLOCK_N)
    splits = num_splits or _default_splits(keys.device, G * row_blocks, key_blocks)
    splits = max(1, min(splits, key_blocks))
    keys_per_split = triton.cdiv(key_blocks, splits) * BLOCK_N
    splits = triton.cdiv(n, keys_per_split)

    m_part = torch.empty(G, R, splits, device=keys.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    _obs_row_stats_kernel[(G, row_blocks, splits)](
        query, keys, m_part, l_part,
        n, w, g, R, splits, keys_per_split, qk_scale,
        *query.stride(), *keys.stride(),
        HEAD_DIM=d, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        DOT_PRECISION=precision, UPCAST=upcast,
    )  # fmt: skip
    # Merge the splits' online-softmax states (small: [G, R, splits]).
    m = m_part.amax(dim=-1)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    l = (l_part * torch.exp2(m_part - m_safe[..., None])).sum(dim=-1)
    inv_l = torch.where(l > 0, 1.0 / l, torch.zeros_like(l)).contiguous()
    m_safe = m_safe.contiguous()

    _obs_col_sums_kernel[(G, triton.cdiv(n_candidates, BLOCK_N))](
        query, keys, m_safe, inv_l, out,
        n, n_candidates, w, g, R, qk_scale, 1.0 / g,
        *query.stride(), *keys.stride(), out.stride(0),
        HEAD_DIM=d, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        DOT_PRECISION=precision, UPCAST=upcast,
    )  # fmt: skip
    return out


def pool_scores_triton(scores: torch.Tensor, positions: torch.Tensor, kernel: int, kind: str) -> torch.Tensor:
    """Triton version of :func:`pool_scores_ref`: ``[G, n]`` scores and positions -> ``[G, n]`` fp32."""
    if kind not in ("max", "avg", "none"):
        raise ValueError(f"unknown pooling {kind!r}; use max, avg or none")
    if kind == "none" or kernel <= 1 or scores.shape[-1] == 0:
        return scores
    if scores.dim() != 2 or positions.shape != scores.shape:
        raise ValueError(
            f"scores and positions must both be [G, n]; got {tuple(scores.shape)}, {tuple(positions.shape)}"
        )
    scores = scores.float()
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    if positions.stride(-1) != 1:
        positions = positions.contiguous()
    G, n = scores.shape
    out = torch.empty(G, n, device=scores.device, dtype=torch.float32)
    BLOCK = 1024 if scores.device.type == "cuda" else 256
    _pool_scores_kernel[(G, triton.cdiv(n, BLOCK))](
        scores, positions, out,
        n, scores.stride(0), positions.stride(0), out.stride(0),
        RADIUS=kernel // 2, IS_MAX=kind == "max", KERNEL=kernel, BLOCK=BLOCK,
    )  # fmt: skip
    return out


def bytes_read(query: torch.Tensor, keys: torch.Tensor, n_candidates: int) -> int:
    """Minimum bytes the two-pass kernel reads: all keys (pass 1), candidate keys (pass 2), queries."""
    G, n, d = keys.shape
    return keys.element_size() * G * d * (n + n_candidates) + query.numel() * query.element_size()


__all__ = ["bytes_read", "observation_scores_triton", "pool_scores_triton"]
