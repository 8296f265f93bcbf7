"""Decode attention over a KV cache whose length differs per KV head (AdaKV-style ragged storage).

The cache of one layer is stored flattened: KV head ``h`` owns rows ``offsets[h]:offsets[h+1]`` of
``k_flat`` / ``v_flat`` (``[T, d]``). One new query token (``q``: ``[H, d]``, ``H = G * g``) attends
to its KV head's rows; query head ``h`` uses KV head ``h // g``.

``ragged_decode_attention_ref`` is the torch reference (any device). ``ragged_decode_attention_triton``
is a split-K (flash-decoding) kernel: program ``(kv head, split)`` takes the ``g`` query heads of a
group as the rows of one ``tl.dot`` and streams its share of that head's keys with an online softmax
(fp32); a second kernel merges the splits. Each head's rows are cut into the same number of splits,
so no host sync is needed to learn the longest head. The module imports without triton (reference
only); ``dynkv_cli.kernels`` imports it on first use, so set ``TRITON_INTERPRET=1`` before that on a CPU.
"""

from __future__ import annotations

import os

import torch

try:  # the reference must work without triton; the kernels are defined only when it imports
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

_LOG2E = 1.4426950408889634


def _check(q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, offsets: torch.Tensor) -> tuple[int, int]:
    if q.dim() != 2 or k_flat.dim() != 2 or v_flat.shape != k_flat.shape or k_flat.shape[1] != q.shape[1]:
        raise ValueError(
            f"need q [H, d], k_flat and v_flat [T, d]; got {tuple(q.shape)}, {tuple(k_flat.shape)}, "
            f"{tuple(v_flat.shape)}"
        )
    if offsets.dim() != 1 or offsets.numel() < 2:
        raise ValueError(f"offsets must be [G+1] with G >= 1; got {tuple(offsets.shape)}")
    G = offsets.numel() - 1
    if q.shape[0] % G != 0:
        raise ValueError(f"{q.shape[0]} query heads do not split into {G} KV heads")
    return G, q.shape[0] // G


def ragged_decode_attention_ref(
    q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, offsets: torch.Tensor, scaling: float
) -> torch.Tensor:
    """One decode step of attention over a ragged per-head cache (torch reference).

    Args:
        q: ``[H, d]`` query of the new token (after RoPE), ``H = G * g``.
        k_flat: ``[T, d]`` keys of all KV heads, head after head.
        v_flat: ``[T, d]`` values, same layout.
        offsets: ``[G+1]`` int64, ascending; KV head ``h`` owns rows ``offsets[h]:offsets[h+1]``.
        scaling: softmax scale (usually ``d ** -0.5``).

    Returns:
        ``[H, d]`` in ``q.dtype`` (softmax and sums in fp32); a head with no keys gives zeros.
    """
    G, g = _check(q, k_flat, v_flat, offsets)
    out = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    bounds = offsets.tolist()
    for h in range(G):
        lo, hi = bounds[h], bounds[h + 1]
        if hi <= lo:
            continue
        qh = q[h * g : (h + 1) * g].float()  # [g, d]
        logits = (qh @ k_flat[lo:hi].float().T) * scaling  # [g, len]
        out[h * g : (h + 1) * g] = torch.softmax(logits, dim=-1) @ v_flat[lo:hi].float()
    return out.to(q.dtype)


if triton is not None:

    @triton.jit
    def _split_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        off_ptr,
        m_ptr,
        l_ptr,
        acc_ptr,
        g,
        n_splits,
        qk_scale,
        stride_qh,
        stride_qd,
        stride_kt,
        stride_kd,
        stride_vt,
        stride_vd,
        HEAD_DIM: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        kv = tl.program_id(0)
        sp = tl.program_id(1)
        lo = tl.load(off_ptr + kv)
        hi = tl.load(off_ptr + kv + 1)
        length = hi - lo
        # Every head is cut into n_splits chunks of whole blocks; trailing chunks may be empty.
        chunk = tl.cdiv(tl.cdiv(length, n_splits), BLOCK_N) * BLOCK_N
        start = lo + sp * chunk
        stop = tl.minimum(start + chunk, hi)

        hh = tl.arange(0, BLOCK_H)
        h_ok = hh < g
        heads = kv * g + hh
        dd = tl.arange(0, BLOCK_D)
        d_ok = dd < HEAD_DIM
        q = tl.load(
            q_ptr + heads[:, None] * stride_qh + dd[None, :] * stride_qd,
            mask=h_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        for j0 in tl.range(start, stop, BLOCK_N):
            rows = j0 + tl.arange(0, BLOCK_N)
            r_ok = rows < stop
            k = tl.load(
                k_ptr + rows[:, None] * stride_kt + dd[None, :] * stride_kd,
                mask=r_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            v = tl.load(
                v_ptr + rows[:, None] * stride_vt + dd[None, :] * stride_vd,
                mask=r_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_H, BLOCK_N]
            s = tl.where(r_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every block has a valid key
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        part = heads * n_splits + sp  # partials are [H, n_splits] and [H, n_splits, BLOCK_D]
        tl.store(m_ptr + part, m_i, mask=h_ok)
        tl.store(l_ptr + part, l_i, mask=h_ok)
        tl.store(acc_ptr + part[:, None] * BLOCK_D + dd[None, :], acc, mask=h_ok[:, None])

    @triton.jit
    def _merge_kernel(
        m_ptr,
        l_ptr,
        acc_ptr,
        out_ptr,
        n_splits,
        stride_oh,
        stride_od,
        HEAD_DIM: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        h = tl.program_id(0)
        ss = tl.arange(0, BLOCK_S)
        s_ok = ss < n_splits
        dd = tl.arange(0, BLOCK_D)
        m = tl.load(m_ptr + h * n_splits + ss, mask=s_ok, other=float("-inf"))
        l = tl.load(l_ptr + h * n_splits + ss, mask=s_ok, other=0.0)
        acc = tl.load(acc_ptr + (h * n_splits + ss)[:, None] * BLOCK_D + dd[None, :], mask=s_ok[:, None], other=0.0)
        m_max = tl.max(m, axis=0)
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # a head with no keys: all weights 0
        scale = tl.exp2(m - m_max)
        denom = tl.sum(l * scale, axis=0)
        num = tl.sum(acc * scale[:, None], axis=0)
        res = tl.where(denom > 0, num / tl.where(denom > 0, denom, 1.0), 0.0)
        tl.store(out_ptr + h * stride_oh + dd * stride_od, res.to(out_ptr.dtype.element_ty), mask=dd < HEAD_DIM)


def _default_splits(device: torch.device, G: int, T: int, block_n: int) -> int:
    """Splits per head from the mean head length (a shape, so no sync): ~2 waves on a GPU."""
    mean_blocks = max(1, -(-T // (G * block_n)))
    if device.type != "cuda":
        return max(1, min(mean_blocks, 4))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(mean_blocks, 128, (2 * sms) // G))


def ragged_decode_attention_triton(
    q: torch.Tensor,
    k_flat: torch.Tensor,
    v_flat: torch.Tensor,
    offsets: torch.Tensor,
    scaling: float,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Triton version of :func:`ragged_decode_attention_ref` (same arguments and result).

    ``num_splits`` (chunks per head) is chosen from the shapes when ``None``; tests pin it. The output
    has ``q``'s dtype; a ``q`` of another dtype than the cache is cast to the cache's for the dots.
    """
    G, g = _check(q, k_flat, v_flat, offsets)
    supported = (torch.float32, torch.float16, torch.bfloat16)
    if k_flat.dtype != v_flat.dtype or k_flat.dtype not in supported or q.dtype not in supported:
        raise TypeError(f"q, k_flat, v_flat must be fp32/fp16/bf16 (k and v alike); got {q.dtype}, {k_flat.dtype}")
    if triton is None:
        raise ImportError("ragged_decode_attention_triton needs triton: pip install 'dynkv[triton]'")
    H, d = q.shape
    T = k_flat.shape[0]
    out = torch.empty(H, d, device=q.device, dtype=q.dtype)
    q = q.to(k_flat.dtype)  # one token; the cache is never copied
    offsets = offsets.to(device=q.device, dtype=torch.int64).contiguous()

    BLOCK_N = 64
    BLOCK_H = max(16, triton.next_power_of_2(g))
    BLOCK_D = max(16, triton.next_power_of_2(d))
    splits = max(1, num_splits or _default_splits(q.device, G, T, BLOCK_N))
    # bf16 tl.dot is wrong under TRITON_INTERPRET=1 (raw bit patterns, triton-lang/triton#11584):
    # the interpreter computes bf16 dots in fp32; GPUs use bf16 MMA.
    upcast = q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    precision = "ieee" if q.dtype == torch.float32 or upcast else "tf32"  # tf32: ignored for 16-bit

    m_part = torch.empty(H, splits, device=q.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty(H, splits, BLOCK_D, device=q.device, dtype=torch.float32)
    _split_kernel[(G, splits)](
        q, k_flat, v_flat, offsets, m_part, l_part, acc_part,
        g, splits, float(scaling) * _LOG2E,
        *q.stride(), *k_flat.stride(), *v_flat.stride(),
        HEAD_DIM=d, BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        DOT_PRECISION=precision, UPCAST=upcast,
    )  # fmt: skip
    _merge_kernel[(H,)](
        m_part, l_part, acc_part, out, splits, *out.stride(),
        HEAD_DIM=d, BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_D=BLOCK_D,
    )  # fmt: skip
    return out


__all__ = ["ragged_decode_attention_ref", "ragged_decode_attention_triton"]
