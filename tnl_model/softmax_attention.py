"""The softmax attention layer (DESIGN.md 3.3): GQA, causal, no bias, partial RoPE.

Backends: flash-attn when importable and the inputs are CUDA fp16/bf16 without a
padding mask; PyTorch SDPA otherwise; an eager softmax when attention weights are
requested. Packed documents (``cu_seqlens``) attend only within their document.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

from .rotary import apply_partial_rotary
from .sequence_parallel import gather_earlier_shards

try:  # optional GPU dependency
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the environment
    flash_attn_func = flash_attn_varlen_func = None


def document_ids(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """Index of the packed document each of ``length`` positions belongs to."""
    positions = torch.arange(length, device=cu_seqlens.device)
    return torch.bucketize(positions, cu_seqlens[1:].to(positions.dtype), right=True)


def build_attention_mask(key_mask, past: int, length: int, cu_seqlens, device) -> torch.Tensor | None:
    """Boolean ``[B, 1, T, past+T]`` mask (True = may attend), or None when plain causal suffices.

    key_mask: ``[B, past+T]`` with 1 for real tokens, or None.
    """
    if key_mask is None and cu_seqlens is None and (past == 0 or length == 1):
        return None
    total = past + length
    query_pos = torch.arange(past, total, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    mask = (key_pos <= query_pos)[None, None]  # [1, 1, T, total]
    if cu_seqlens is not None:
        docs = document_ids(cu_seqlens, total)
        mask = mask & (docs[past:, None] == docs[None, :])[None, None]
    if key_mask is not None:
        mask = mask & key_mask.bool()[:, None, None, :]
        # A padded query may see no key at all; let it see everything so softmax stays finite
        # (its output is never used).
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return mask


class TNLSoftmaxAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = 1.0 / math.sqrt(self.head_dim)
        self.dropout = config.attention_dropout
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, key_mask=None, cache=None, cu_seqlens=None, rotary=None, output_attentions=False, shard=None,
                **unused):
        """x ``[B, T, hidden]``; key_mask ``[B, past+T]`` or None; rotary = (cos, sin) ``[B, T, r]``.

        ``shard`` (sequence parallelism): this rank's queries attend to the keys and values of every earlier
        shard, gathered from the group, as a continuation after that many cached tokens would."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rotary is not None:
            q, k = apply_partial_rotary(q, *rotary), apply_partial_rotary(k, *rotary)
        past = 0
        if cache is not None:
            past = cache.get_seq_length(self.layer_idx)
            k, v = cache.update(k, v, self.layer_idx)
        elif shard is not None:
            past = shard.offset
            k, v = gather_earlier_shards(k, 2, shard), gather_earlier_shards(v, 2, shard)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if output_attentions or self.config._attn_implementation == "eager":
            out, weights = self._eager(q, k, v, build_attention_mask(key_mask, past, length, cu_seqlens, x.device), past, dropout)
        elif self._can_use_flash(q, key_mask):
            out = self._flash(q, k, v, cu_seqlens, dropout)
        elif length == 1 and cu_seqlens is None and dropout == 0.0:
            out = self._one_query(q, k, v, build_attention_mask(key_mask, past, length, cu_seqlens, x.device))
        elif (past > 0 and length > 1 and key_mask is None and cu_seqlens is None and dropout == 0.0 and not q.is_cuda
              and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
            out = self._after_cache_cpu(q, k, v, past)
        elif cu_seqlens is not None and key_mask is None and past == 0:
            out = self._per_document(q, k, v, cu_seqlens, dropout)
        else:
            mask = build_attention_mask(key_mask, past, length, cu_seqlens, x.device)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None and past == 0 and length > 1,
                scale=self.scaling, enable_gqa=self.num_kv_heads != self.num_heads,
            )
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return self.o_proj(out), weights

    def _can_use_flash(self, q, key_mask) -> bool:
        return (
            flash_attn_func is not None
            and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16)
            and key_mask is None
            and self.config._attn_implementation in (None, "flash_attention_2", "sdpa")
        )

    def _flash(self, q, k, v, cu_seqlens, dropout):
        # flash-attn wants [B, T, H, d]; its causal mask is aligned bottom-right, which is what a
        # continuation after cached tokens needs.
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if cu_seqlens is not None:
            cu = cu_seqlens.to(torch.int32)
            max_len = int((cu[1:] - cu[:-1]).max())
            out = flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, max_len, max_len, dropout_p=dropout,
                                         softmax_scale=self.scaling, causal=True).unsqueeze(0)
        else:
            out = flash_attn_func(q, k, v, dropout_p=dropout, softmax_scale=self.scaling, causal=True)
        return out.transpose(1, 2)

    def _per_document(self, q, k, v, cu_seqlens, dropout):
        """Packed documents without flash-attn: one causal SDPA per document. A single call with a
        block-diagonal mask would score every query against every key of the packed row,
        (sum of lengths)^2 work and memory instead of the sum of squares."""
        bounds = cu_seqlens.tolist()
        pieces = [
            F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], dropout_p=dropout, is_causal=True,
                                           scale=self.scaling, enable_gqa=self.num_kv_heads != self.num_heads)
            for a, b in zip(bounds[:-1], bounds[1:]) if b > a
        ]
        return torch.cat(pieces, dim=2)

    def _one_query(self, q, k, v, mask):
        """One new token (decode) over the whole cache, its query heads stacked per key/value head.

        A single query sees every cached key, so nothing is causal and the query heads sharing a
        key/value head can be rows of one attention over that head's keys: the cache is read once
        per key/value head and never repeated (SDPA's ``enable_gqa`` on the CPU took twice as long
        at 256K cached tokens). ``mask`` ``[B, 1, 1, past+1]`` (padding only) broadcasts over them."""
        batch, heads, _, dim = q.shape
        grouped = q.reshape(batch, self.num_kv_heads, heads // self.num_kv_heads, dim)
        out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, scale=self.scaling)
        return out.reshape(batch, heads, 1, dim)

    def _after_cache_cpu(self, q, k, v, past):
        """Queries at positions ``past ..`` over the cached keys and their own, on the CPU.

        SDPA would need an explicit ``[T, past+T]`` mask here (its causal mask is aligned top-left),
        which sends it to the math kernel: the whole score matrix in memory, growing with the cache.
        Instead the cached prefix is attended without a mask and the new block causally (a square,
        where both alignments agree), each by the tiled CPU flash kernel, which also returns the
        log-sum-exp of each row; the two partial softmaxes are then merged exactly. The cached
        keys are never repeated for GQA: the query heads sharing a key/value head are stacked as
        extra query rows of that head instead (only the new block's keys are repeated)."""
        batch, heads, length, dim = q.shape
        groups = heads // self.num_kv_heads
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        grouped_q = q.reshape(batch, self.num_kv_heads, groups * length, dim)
        out_old, lse_old = flash(grouped_q, k[:, :, :past], v[:, :, :past], 0.0, False, scale=self.scaling)
        out_old = out_old.reshape(batch, heads, length, dim)
        lse_old = lse_old.reshape(batch, heads, length)
        k_new, v_new = k[:, :, past:], v[:, :, past:]
        if groups > 1:
            k_new, v_new = k_new.repeat_interleave(groups, dim=1), v_new.repeat_interleave(groups, dim=1)
        out_new, lse_new = flash(q, k_new, v_new, 0.0, True, scale=self.scaling)
        lse = torch.logaddexp(lse_old, lse_new)
        merged = (out_old.float() * torch.exp(lse_old - lse).unsqueeze(-1)
                  + out_new.float() * torch.exp(lse_new - lse).unsqueeze(-1))
        return merged.to(q.dtype)

    def _eager(self, q, k, v, mask, past, dropout):
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.scaling
        if mask is None:
            length, total = q.shape[2], k.shape[2]
            mask = torch.arange(total, device=q.device)[None, :] <= torch.arange(past, past + length, device=q.device)[:, None]
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1).to(q.dtype)
        weights = F.dropout(weights, p=dropout, training=self.training)
        return torch.matmul(weights, v), weights
