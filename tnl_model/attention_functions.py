"""The softmax layers' attention functions, in transformers' ``AttentionInterface`` (DESIGN.md 3.3).

``ATTENTION_FUNCTIONS`` is this package's own instance of transformers' ``AttentionInterface``: it
overrides ``"sdpa"`` and ``"eager"`` for TNL models only (an instance's local mapping never reaches
other models), and every other name (``"flash_attention_2"``, ...) is transformers' own function.

- ``"sdpa"`` (:func:`sdpa_attention`): flash-attn when it is installed and the inputs are CUDA fp16/bf16
  without a padding mask (varlen for packed documents); on the CPU the two paths this package measured
  faster than PyTorch's SDPA (``benchmarks/bench_vs_minimax.py``): one query over the cache
  (:func:`one_query`) and a continuation after cached tokens
  (:func:`tnl_model.continuation_attention.attention_after_prefix`); packed documents
  one SDPA call each; PyTorch SDPA otherwise.
- ``"eager"`` (:func:`eager_attention`): an explicit softmax that returns the weights (``output_attentions``).

The contract is transformers': ``query [B, H, T, d]``, ``key``/``value [B, Hkv, past+T, d]``, and
``attention_mask`` None, a boolean ``[B, 1, T, past+T]`` (True = may attend) or an additive float mask,
as ``transformers.masking_utils.create_causal_mask`` builds them; the result is ``(output [B, T, H, d],
weights or None)``. ``attention_mask=None`` means causal with the queries aligned to the last keys (query
``i`` sits at position ``past + i``), which is flash-attn's alignment: a continuation after cached tokens
needs no ``[T, past+T]`` mask built for it. ``cu_seqlens`` (int32 ``[N+1]``, batch 1, nothing cached)
keeps packed documents apart without a mask.
"""

import torch
from torch.nn import functional as F
from transformers.modeling_utils import AttentionInterface

from .continuation_attention import attention_after_prefix
from .inputs import document_ids

try:  # optional GPU dependency
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the environment
    flash_attn_func = flash_attn_varlen_func = None


def _kv_groups(query: torch.Tensor, key: torch.Tensor) -> int:
    return query.shape[1] // key.shape[1]


def _causal_after(length: int, total: int, device) -> torch.Tensor:
    """Boolean ``[T, total]``: query ``i`` (at position ``total - T + i``) sees keys up to its own position."""
    return torch.ones(length, total, dtype=torch.bool, device=device).tril(diagonal=total - length)


def _every_row_sees_a_key(mask: torch.Tensor) -> torch.Tensor:
    """A padded query may see no key at all; let it see everything so its softmax stays finite (its output
    is never used, but a NaN there would reach the lightning layers' state through ``0 * NaN``)."""
    return mask | ~mask.any(dim=-1, keepdim=True)


def sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                   cu_seqlens: torch.Tensor | None = None, **kwargs):
    """TNL's ``"sdpa"``: the fastest path that computes the same attention (see the module docstring)."""
    length, total = query.shape[2], key.shape[2]
    past = total - length
    groups = _kv_groups(query, key)
    if attention_mask is None and _can_use_flash(query):
        return flash_attention(query, key, value, cu_seqlens, dropout, scaling), None
    if length == 1 and cu_seqlens is None and dropout == 0.0:
        out = one_query(query, key, value, attention_mask, scaling)
    elif attention_mask is None and cu_seqlens is None and past > 0 and dropout == 0.0 and not query.is_cuda:
        # SDPA would need an explicit [T, past+T] mask here (its causal mask is aligned top-left): the math
        # kernel, the whole score matrix, and under autograd an fp32 copy of the mask saved for the backward
        out = attention_after_prefix(query, key, value, past, scaling)
    elif attention_mask is None and cu_seqlens is not None and past == 0:
        out = per_document(query, key, value, cu_seqlens, dropout, scaling)
    else:
        if attention_mask is None and past > 0:
            attention_mask = _causal_after(length, total, query.device)  # SDPA's own causal mask is top-left
        elif attention_mask is not None and attention_mask.dtype == torch.bool and length > 1:
            attention_mask = _every_row_sees_a_key(attention_mask)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                             is_causal=attention_mask is None and length > 1, scale=scaling,
                                             enable_gqa=groups > 1)
    return out.transpose(1, 2), None


def eager_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                    cu_seqlens: torch.Tensor | None = None, **kwargs):
    """Explicit softmax over ``[T, past+T]`` scores, in fp32; returns the weights too.

    It also runs for ``output_attentions`` under any other implementation, so it takes their masks as well:
    None with ``cu_seqlens`` (documents kept apart here) and flash-attention's 2-D padding mask."""
    groups = _kv_groups(query, key)
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scaling
    if attention_mask is None or attention_mask.dim() == 2:
        causal = _causal_after(query.shape[2], key.shape[2], query.device)
        if cu_seqlens is not None:
            documents = document_ids(cu_seqlens, key.shape[2])
            causal = causal & (documents[-query.shape[2]:, None] == documents[None, :])
        attention_mask = causal if attention_mask is None else causal & attention_mask.bool()[:, None, None, :]
    if attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~_every_row_sees_a_key(attention_mask), float("-inf"))
    else:  # additive (transformers' eager masks: 0 or the dtype's minimum)
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2), weights


def _can_use_flash(query: torch.Tensor) -> bool:
    return flash_attn_func is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)


def flash_attention(query, key, value, cu_seqlens, dropout, scaling):
    """flash-attn; its causal mask is aligned bottom-right, which is what a continuation after cached tokens
    needs. Returns ``[B, T, H, d]``."""
    query, key, value = (t.transpose(1, 2) for t in (query, key, value))
    if cu_seqlens is None:
        return flash_attn_func(query, key, value, dropout_p=dropout, softmax_scale=scaling, causal=True)
    cu = cu_seqlens.to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return flash_attn_varlen_func(query[0], key[0], value[0], cu, cu, longest, longest, dropout_p=dropout,
                                  softmax_scale=scaling, causal=True).unsqueeze(0)


def per_document(query, key, value, cu_seqlens, dropout, scaling):
    """Packed documents without flash-attn: one causal SDPA per document. A single call with a
    block-diagonal mask would score every query against every key of the packed row,
    (sum of lengths)^2 work and memory instead of the sum of squares."""
    bounds = cu_seqlens.tolist()
    gqa = _kv_groups(query, key) > 1
    pieces = [
        F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=dropout,
                                       is_causal=True, scale=scaling, enable_gqa=gqa)
        for a, b in zip(bounds[:-1], bounds[1:]) if b > a
    ]
    return torch.cat(pieces, dim=2)


def one_query(query, key, value, mask, scaling):
    """One new token (decode) over the whole cache, its query heads stacked per key/value head.

    A single query sees every cached key, so nothing is causal and the query heads sharing a
    key/value head can be rows of one attention over that head's keys: the cache is read once
    per key/value head and never repeated (SDPA's ``enable_gqa`` on the CPU took twice as long
    at 256K cached tokens). ``mask`` ``[B, 1, 1, past+1]`` (padding only) broadcasts over them."""
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, 1, dim)


#: TNL's attention functions: transformers' registry with "sdpa" and "eager" overridden for this package only
ATTENTION_FUNCTIONS = AttentionInterface()
ATTENTION_FUNCTIONS["sdpa"] = sdpa_attention
ATTENTION_FUNCTIONS["eager"] = eager_attention

#: implementations whose function keeps packed documents apart from ``cu_seqlens`` (no mask needed)
SPLITS_DOCUMENTS = ("sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4")
