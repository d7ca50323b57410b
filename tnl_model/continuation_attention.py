"""Differentiable, linear-memory CPU attention for queries that continue after earlier keys.

Queries at positions ``past .. past+T-1`` attend to all ``past`` earlier keys (no mask) and causally to
their own block. PyTorch SDPA needs an explicit boolean ``[T, past+T]`` mask for this (its causal mask
is aligned top-left), and under autograd the CPU flash kernel saves that mask as an fp32 copy: activation
memory quadratic in the length. Here the two parts are attended separately by the tiled CPU flash kernel
(TNL's ``"sdpa"`` runs this for a continuation after cached tokens, as do sequence-parallel ranks over
the keys of earlier shards),

- the earlier keys without a mask, the query heads sharing a key/value head stacked as extra query rows
  of that head (the earlier keys are never repeated for GQA);
- the own block with ``is_causal=True`` (a square, where top-left and bottom-right alignment agree);

and the two partial softmaxes are merged exactly by their log-sum-exp (in fp32). The forward saves only
q, k, v, the merged output and the merged log-sum-exp.

The backward is exact, ring-attention style: the flash kernel's backward is called once per part with the
*merged* output and the *merged* log-sum-exp, so each part's probabilities ``exp(s - lse)`` are normalised
by the whole softmax and its ``D = rowsum(dO * O)`` is the merged one; that makes each part's dq, dk, dv
that part's exact share of the full gradient. The parts' dq are added; their dk/dv go to their key ranges.
(Merging the two flash outputs under plain autograd is not enough: the kernel's log-sum-exp output
carries no gradient, so the scores' share of the q and k gradients is lost.)
"""

import torch

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _merge_dtype(query):
    """The precision the two parts are merged in."""
    return torch.float64 if query.dtype == torch.float64 else torch.float32


def _own_block(key, value, past: int, groups: int):
    """The new block's keys and values, repeated per query head (a square causal block is small)."""
    k_new, v_new = key[:, :, past:], value[:, :, past:]
    if groups > 1:
        k_new, v_new = k_new.repeat_interleave(groups, dim=1), v_new.repeat_interleave(groups, dim=1)
    return k_new, v_new


def _forward(query, key, value, past: int, scaling):
    """``(out [B, H, T, d] in query's dtype, lse [B, H, T] fp32, fp64 for fp64)``: attention after ``past`` keys."""
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    k_new, v_new = _own_block(key, value, past, groups)
    acc = _merge_dtype(query)
    out_new, lse_new = _flash(query, k_new, v_new, 0.0, True, scale=scaling)
    if past == 0:
        return out_new, lse_new.to(acc)
    grouped_q = query.reshape(batch, kv_heads, groups * length, dim)
    out_old, lse_old = _flash(grouped_q, key[:, :, :past], value[:, :, :past], 0.0, False, scale=scaling)
    out_old = out_old.reshape(batch, heads, length, dim)
    lse_old = lse_old.to(acc).reshape(batch, heads, length)
    lse_new = lse_new.to(acc)
    lse = torch.logaddexp(lse_old, lse_new)
    merged = (out_old.to(acc) * torch.exp(lse_old - lse).unsqueeze(-1)
              + out_new.to(acc) * torch.exp(lse_new - lse).unsqueeze(-1))
    return merged.to(query.dtype), lse


class AttentionAfterPrefix(torch.autograd.Function):
    """``forward(query [B, H, T, d], key, value [B, H_kv, past+T, d], past, scaling) -> [B, H, T, d]``."""

    @staticmethod
    def forward(ctx, query, key, value, past: int, scaling):
        out, lse = _forward(query, key, value, past, scaling)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.past, ctx.scaling = past, scaling
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        past, scaling = ctx.past, ctx.scaling
        batch, heads, length, dim = query.shape
        kv_heads = key.shape[1]
        groups = heads // kv_heads
        grad_out = grad_out.to(query.dtype)

        # own block: causal, its keys repeated per query head as in the forward
        k_new, v_new = _own_block(key, value, past, groups)
        dq, dk_new, dv_new = _flash_backward(grad_out, query, k_new, v_new, out, lse, 0.0, True, scale=scaling)
        if groups > 1:  # head h used key/value head h // groups
            dk_new = dk_new.reshape(batch, kv_heads, groups, length, dim).sum(2)
            dv_new = dv_new.reshape(batch, kv_heads, groups, length, dim).sum(2)
        if past == 0:
            return dq, dk_new, dv_new, None, None

        # earlier keys: no mask, the query heads of one key/value head stacked as rows (as in the forward)
        def rows(t):
            return t.reshape(batch, kv_heads, groups * length, *t.shape[3:])

        dq_old, dk_old, dv_old = _flash_backward(rows(grad_out), rows(query), key[:, :, :past], value[:, :, :past],
                                                 rows(out), rows(lse), 0.0, False, scale=scaling)
        acc = _merge_dtype(query)
        dq = (dq.to(acc) + dq_old.reshape(batch, heads, length, dim).to(acc)).to(query.dtype)
        dk = torch.cat([dk_old, dk_new.to(dk_old.dtype)], dim=2)
        dv = torch.cat([dv_old, dv_new.to(dv_old.dtype)], dim=2)
        return dq, dk, dv, None, None


def attention_after_prefix(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past: int,
                           scaling: float | None = None) -> torch.Tensor:
    """Attention of ``query [B, H, T, d]`` (positions ``past .. past+T-1``) over ``key``/``value``
    ``[B, H_kv, past+T, d]``: every earlier key and causally its own block. Returns ``[B, H, T, d]``.

    CPU only (the CPU flash kernel), fp32, bf16 or fp64; no dropout; ``H`` a multiple of ``H_kv``.
    ``scaling`` None means ``1/sqrt(d)``. Differentiable with linear activation memory."""
    batch, heads, length, dim = query.shape
    if key.shape[2] != past + length or value.shape[2] != past + length:
        raise ValueError(f"key/value have {key.shape[2]}/{value.shape[2]} positions, expected past + T = "
                         f"{past + length}")
    if past < 0 or heads % key.shape[1]:
        raise ValueError(f"past {past} must be >= 0 and {heads} query heads a multiple of {key.shape[1]} kv heads")
    if query.is_cuda:
        raise ValueError("attention_after_prefix runs on the CPU flash kernel; use flash-attn on the GPU")
    return AttentionAfterPrefix.apply(query, key, value, int(past), scaling)
