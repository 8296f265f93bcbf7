"""The registered attention function: exact attention over a ragged cache, one causal mask per layer.

Every layer of a :class:`~dynkv_cli.cache.CompressedCache` holds its own number of keys, so the single
mask transformers builds from layer 0 would be wrong. This function ignores it and masks each layer
for itself: query ``i`` of ``q`` is the token at key index ``n - q + i`` (queries aligned to the newest
keys), which is exact for chunked prefill, a multi-token suffix and decoding. When the engine passes a
``dynkv_state`` keyword through the model's forward, the state scores and compresses the layer right
after its attention (see docs/engine.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTN_NAME = "dynkv"


def exact_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """Causal attention with queries aligned to the newest keys.

    Args:
        query: ``[1, H, q, d]``; key, value: ``[1, G, n, d]`` with ``n >= q`` and ``H % G == 0``.

    Returns:
        ``[1, H, q, d]``.
    """
    q_len, n = query.shape[2], key.shape[2]
    gqa = query.shape[1] != key.shape[1]
    if q_len == 1:
        return F.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=gqa)
    if q_len == n:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa)
    rows = torch.arange(n - q_len, n, device=query.device)
    mask = torch.arange(n, device=query.device)[None, :] <= rows[:, None]  # [q, n]: a chunk x keys, never N x N
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=gqa)


def ragged_attention(query: torch.Tensor, layer, scaling: float) -> torch.Tensor:
    """Exact attention over a :class:`~dynkv_cli.cache.RaggedLayer` (each KV head its own length).

    ``query`` ``[1, H, q, d]`` -> ``[1, H, q, d]``. One query token goes through the ragged decode kernel
    (flat storage, per-head offsets); a chunk attends head by head.
    """
    from .kernels import ragged_decode_attention

    H, q_len = query.shape[1], query.shape[2]
    G = len(layer.lens)
    g = H // G
    if q_len == 1:
        out = ragged_decode_attention(query[0, :, 0, :], layer.keys, layer.values, layer.offsets, scaling)
        return out[None, :, None, :].to(query.dtype)
    outs = []
    for h in range(G):
        k, v, _, _ = layer.head(h)
        outs.append(exact_attention(query[:, h * g : (h + 1) * g], k[None, None], v[None, None], scaling))
    return torch.cat(outs, dim=1)


def dynkv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface signature; returns ``([1, q, H, d], None)``."""
    if query.shape[0] != 1:
        raise ValueError("dynkv attention runs one sequence at a time (batch size 1)")
    if kwargs.get("sliding_window"):
        raise ValueError("sliding-window attention layers are not supported by dynkv")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    cache = kwargs.get("dynkv_cache")
    layer = cache.layers[module.layer_idx] if cache is not None else None
    if getattr(layer, "ragged", False):
        out = ragged_attention(query, layer, scaling)
    else:
        out = exact_attention(query, key, value, scaling)
    state = kwargs.get("dynkv_state")
    if state is not None:
        state.after_attention(module.layer_idx, query, scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_NAME, dynkv_attention)
