"""Kernels used by the engine, each with a torch reference of the same signature.

``observation_scores``, ``pool_scores`` and ``ragged_decode_attention`` dispatch: the Triton kernel
when the tensors are on CUDA and triton imports, the torch reference elsewhere. ``DYNKV_FORCE_TRITON=1``
forces the Triton kernels (tests run them on the CPU with ``TRITON_INTERPRET=1``, which must be set
before the first forced call). Triton is imported lazily: importing this package never needs it.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

from .scores import observation_scores_ref, pool_scores_ref


@functools.cache
def triton_available() -> bool:
    """True when triton imports (checked once)."""
    try:
        importlib.import_module("triton")
    except Exception:  # ImportError, or a broken install that fails while importing
        return False
    return True


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _use_triton(*tensors: torch.Tensor) -> bool:
    """Forced by ``DYNKV_FORCE_TRITON=1``; otherwise CUDA tensors of a kernel dtype and an importable triton."""
    if os.environ.get("DYNKV_FORCE_TRITON") == "1":
        if not triton_available():
            raise ImportError("DYNKV_FORCE_TRITON=1 but triton does not import: pip install 'dynkv[triton]'")
        return True
    on_cuda = all(t.is_cuda for t in tensors)
    dtypes_ok = all(t.dtype in _KERNEL_DTYPES for t in tensors if t.is_floating_point())
    return on_cuda and dtypes_ok and triton_available()


def observation_scores(query: torch.Tensor, keys: torch.Tensor, scaling: float, n_candidates: int) -> torch.Tensor:
    """See :func:`observation_scores_ref`."""
    if _use_triton(query, keys):
        from .obs_scores_triton import observation_scores_triton

        return observation_scores_triton(query, keys, scaling, n_candidates)
    return observation_scores_ref(query, keys, scaling, n_candidates)


def pool_scores(scores: torch.Tensor, positions: torch.Tensor, kernel: int, kind: str) -> torch.Tensor:
    """See :func:`pool_scores_ref`."""
    if _use_triton(scores, positions):
        from .obs_scores_triton import pool_scores_triton

        return pool_scores_triton(scores, positions, kernel, kind)
    return pool_scores_ref(scores, positions, kernel, kind)


def ragged_decode_attention_ref(
    q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, offsets: torch.Tensor, scaling: float
) -> torch.Tensor:
    """See :func:`dynkv_cli.kernels.ragged_decode.ragged_decode_attention_ref`."""
    from .ragged_decode import ragged_decode_attention_ref as ref

    return ref(q, k_flat, v_flat, offsets, scaling)


def ragged_decode_attention(
    q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, offsets: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Decode attention over a ragged per-KV-head cache: ``q [H, d]``, ``k_flat``/``v_flat [T, d]``,
    ``offsets [G+1]`` -> ``[H, d]``. See :mod:`dynkv_cli.kernels.ragged_decode`."""
    if _use_triton(q, k_flat, v_flat):
        from .ragged_decode import ragged_decode_attention_triton

        return ragged_decode_attention_triton(q, k_flat, v_flat, offsets, scaling)
    return ragged_decode_attention_ref(q, k_flat, v_flat, offsets, scaling)


__all__ = [
    "observation_scores",
    "observation_scores_ref",
    "pool_scores",
    "pool_scores_ref",
    "ragged_decode_attention",
    "ragged_decode_attention_ref",
    "triton_available",
]
