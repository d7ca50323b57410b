"""Specifications of the lightning-attention operator (DESIGN.md section 3.1).

Three independent forms of the same function, used as test oracles:

* :func:`lightning_attn_quadratic` - the masked, decayed attention matrix (O(T^2)).
* :func:`lightning_attn_recurrent` - the token-by-token state recurrence; run it in
  float64 for a ground truth.
* :func:`lightning_attn_chunked` - the chunked form every fast kernel implements,
  written with plain differentiable torch ops (no custom backward).

All take ``q, k: [B, T, H, D]``, ``v: [B, T, H, E]``, ``slopes: [H]`` and return
``(o [B, T, H, E], final_state [B, H, D, E])``. They compute in float64 when the
inputs are float64 and in float32 otherwise; outputs keep that compute dtype.
"""

import torch


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _prepare(q, k, v, slopes, initial_state):
    dtype = _compute_dtype(q)
    batch, _, heads, dim_k = q.shape
    dim_v = v.shape[-1]
    q, k, v = (x.to(dtype).transpose(1, 2) for x in (q, k, v))  # [B, H, T, *]
    slopes = slopes.to(device=q.device, dtype=dtype).view(1, heads, 1, 1)
    if initial_state is None:
        state = torch.zeros(batch, heads, dim_k, dim_v, dtype=dtype, device=q.device)
    else:
        state = initial_state.to(dtype)
    return q, k, v, slopes, state


def lightning_attn_quadratic(q, k, v, slopes, *, scale=1.0, initial_state=None):
    """``o_t = scale * (sum_{j<=t} lambda^{t-j} (q_t . k_j) v_j + lambda^{t+1} q_t S_0)``."""
    q, k, v, s, state = _prepare(q, k, v, slopes, initial_state)
    length = q.shape[2]
    pos = torch.arange(length, device=q.device, dtype=q.dtype)
    distance = pos[:, None] - pos[None, :]
    # Mask with `where` before `exp` so that no exp(+large) is ever formed.
    decay = torch.exp(torch.where(distance >= 0, -s * distance, float("-inf")))  # [1, H, T, T]
    out = torch.matmul(torch.matmul(q, k.transpose(-1, -2)) * decay, v)
    out = out + torch.matmul(q * torch.exp(-s * (pos + 1).view(1, 1, -1, 1)), state)
    key_decay = torch.exp(-s * (length - 1 - pos).view(1, 1, -1, 1))
    final = torch.exp(-s * length) * state + torch.matmul((k * key_decay).transpose(-1, -2), v)
    return (scale * out).transpose(1, 2), final


def lightning_attn_recurrent(q, k, v, slopes, *, scale=1.0, initial_state=None):
    """``S_t = lambda S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t``, one token at a time."""
    q, k, v, s, state = _prepare(q, k, v, slopes, initial_state)
    decay = torch.exp(-s)
    outputs = []
    for t in range(q.shape[2]):
        state = decay * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outputs.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], state))
    out = torch.stack(outputs, dim=2) if outputs else v.new_zeros(v.shape)
    return (scale * out).transpose(1, 2), state


def lightning_attn_chunked(q, k, v, slopes, *, scale=1.0, initial_state=None, block_size=64):
    """Chunked form, one block at a time, differentiable through autograd. A NaN or inf in k or v
    at position p leaves the outputs before p finite, as in the recurrence.

    Inside block b with previous state S (0-based position i, real length c)::

        O_intra = ((Q K^T) * M) V,  M_ij = lambda^{i-j} (i >= j)
        O_inter = (Q * lambda^{i+1}) S
        S_next  = lambda^c S + (K * lambda^{c-1-j})^T V
    """
    q, k, v, s, state = _prepare(q, k, v, slopes, initial_state)
    outputs = []
    for start in range(0, q.shape[2], block_size):
        qb, kb, vb = (x[:, :, start : start + block_size] for x in (q, k, v))
        c = qb.shape[2]
        pos = torch.arange(c, device=q.device, dtype=q.dtype)
        distance = pos[:, None] - pos[None, :]
        mask = torch.exp(torch.where(distance >= 0, -s * distance, float("-inf")))
        # The causal mask applied with `where`, product by product: a NaN in k or v at position p
        # reaches no output before p (a matmul would form NaN * 0 = NaN in every row of the block).
        scores = torch.where(distance >= 0, torch.matmul(qb, kb.transpose(-1, -2)) * mask, 0)
        intra = torch.where((distance >= 0)[..., None], scores[..., None] * vb[..., None, :, :], 0).sum(-2)
        inter = torch.matmul(qb * torch.exp(-s * (pos + 1).view(1, 1, -1, 1)), state)
        outputs.append(intra + inter)
        key_decay = torch.exp(-s * (c - 1 - pos).view(1, 1, -1, 1))
        state = torch.exp(-s * c) * state + torch.matmul((kb * key_decay).transpose(-1, -2), vb)
    out = torch.cat(outputs, dim=2) if outputs else v.new_zeros(v.shape)
    return (scale * out).transpose(1, 2), state


def lightning_attn_decode_reference(q, k, v, slopes, state, *, scale=1.0):
    """One recurrent step (returns new tensors; the fast path updates ``state`` in place)."""
    dtype = _compute_dtype(state)
    s = slopes.to(device=q.device, dtype=dtype).view(1, -1, 1, 1)
    new_state = torch.exp(-s) * state.to(dtype) + k.to(dtype)[..., :, None] * v.to(dtype)[..., None, :]
    out = scale * torch.einsum("bhd,bhde->bhe", q.to(dtype), new_state)
    return out, new_state
