"""Observation-window scores and gap-aware pooling: torch references.

These are the reference implementations (any device, any dtype; math in fp32). A Triton kernel with
the same signature lives beside them; ``dynkv_cli.kernels.observation_scores`` picks one.
"""

from __future__ import annotations

import torch


def observation_scores_ref(query: torch.Tensor, keys: torch.Tensor, scaling: float, n_candidates: int) -> torch.Tensor:
    """Attention mass each key receives from the observation queries.

    Args:
        query: ``[H, w, d]`` observation queries (after RoPE). Query ``i`` is the token stored at key
            index ``n - w + i``: the observation tokens are always the newest keys, so query ``i``
            sees keys ``j <= n - w + i`` (causal, aligned to the newest key).
        keys: ``[G, n, d]`` keys of one layer, ``H = G * g`` (grouped-query attention).
        scaling: softmax scale (usually ``d ** -0.5``).
        n_candidates: score only keys ``0 .. n_candidates-1`` (a probe's own keys are never candidates).

    Returns:
        ``[G, n_candidates]`` float32: for each KV head, the softmax weights summed over the ``w``
        queries and averaged over the ``g`` query heads of its group.
    """
    H, w, d = query.shape
    G, n, _ = keys.shape
    g = H // G
    q = query.float().reshape(G, g * w, d)
    logits = torch.matmul(q, keys.float().transpose(1, 2)) * scaling  # [G, g*w, n]
    qi = torch.arange(w, device=keys.device).repeat(g)  # row -> query index inside the window
    visible = torch.arange(n, device=keys.device)[None, :] <= (n - w + qi)[:, None]  # [g*w, n]
    logits = logits.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    # A query that sees no key (only when w > n) would give NaN rows: it contributes nothing instead.
    weights = torch.where(visible.any(dim=-1, keepdim=True), weights, torch.zeros_like(weights))
    return weights[:, :, :n_candidates].sum(dim=1) / g


def pool_scores_ref(scores: torch.Tensor, positions: torch.Tensor, kernel: int, kind: str) -> torch.Tensor:
    """Pool scores over neighbours in the original document, respecting gaps.

    Args:
        scores: ``[G, n]`` float32 scores, entries sorted by original position per head.
        positions: ``[G, n]`` original positions (ascending per head).
        kernel: odd pooling width ``k``; neighbours farther than ``k // 2`` positions apart do not pool.
        kind: ``"max"``, ``"avg"`` (sum of the present neighbours divided by ``k``, as SnapKV's
            zero-padded average pool), or ``"none"``.

    Returns:
        ``[G, n]`` float32 pooled scores.
    """
    if kind not in ("max", "avg", "none"):
        raise ValueError(f"unknown pooling {kind!r}; use max, avg or none")
    if kind == "none" or kernel <= 1 or scores.shape[-1] == 0:
        return scores
    r = kernel // 2
    n = scores.shape[-1]
    out = scores.clone()
    for o in range(-r, r + 1):
        if o == 0 or abs(o) >= n:
            continue
        if o > 0:
            nb, nb_pos = scores[:, o:], positions[:, o:]
            here, here_pos = slice(0, n - o), positions[:, : n - o]
        else:
            nb, nb_pos = scores[:, : n + o], positions[:, : n + o]
            here, here_pos = slice(-o, n), positions[:, -o:]
        near = (nb_pos - here_pos).abs() <= r
        if kind == "max":
            out[:, here] = torch.where(near, torch.maximum(out[:, here], nb), out[:, here])
        else:
            out[:, here] = out[:, here] + torch.where(near, nb, torch.zeros_like(nb))
    if kind == "avg":
        out = out / kernel
    return out
