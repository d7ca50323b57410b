"""Triton backend of lightning attention (DESIGN.md sections 3.1 and 4).

The chunked algorithm, split into three launches so every expensive step runs
in parallel over chunks (block length ``C``, 0-based position ``i`` inside a
chunk, real chunk length ``c``):

1. ``_chunk_kv_kernel``     - per chunk, in parallel: ``KV_b = (K * lambda^{c-1-j})^T V``.
2. ``_state_scan_kernel``   - per sequence, a cheap walk over the chunks' ``[D, E]``
   summaries: ``S_before[b] = S``, ``S = lambda^c S + KV_b`` (fp32 throughout). It
   overwrites the summaries with the incoming states and writes the final state.
3. ``_chunk_output_kernel`` - per chunk, in parallel:
   ``O = scale * (((Q K^T) * M) V + (Q * lambda^{i+1}) S_before)``, with
   ``QK^T`` formed once per chunk and reused for every value tile.

Every decay factor is block-local and <= 1, and the causal mask is applied with
``where`` before ``exp``. Sequences (batch rows or ``cu_seqlens`` pieces) are
described by a flat token axis plus per-chunk metadata, so varlen costs nothing
extra. A ``REVERSE`` switch runs the same kernels backwards in time (sequence
position ``p`` reads token ``end - 1 - p``), which the backward needs.

The backward (``BACKWARD = "fused"``) recomputes the forward states, scans the
gradient states backwards (``R`` entering each chunk from its end: the summaries
``sum_i lambda^{i+1} q_i^T dO_i`` from ``d final_state``), then ``_chunk_grad_kernel``
forms each chunk's two score tiles once and derives dq, dk and dv from them and the
two states, as the CPU path (``kernels/chunked.py::chunked_backward``) does. The
alternative (``"three_runs"``) reuses the forward, because the gradients of this
recurrence are themselves lightning attentions: ``dq = scale * L(do, v, k; S0^T)``,
and ``dk``, ``dv`` are reverse-time runs whose ``lambda^{T-1-j}`` terms from
``d final_state`` are added inside the output kernel (``bonus`` state). Either way
each gradient is summed in fp32 and rounded exactly once when stored.

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors with fixed launch
configurations (no autotuning).
"""

import os

import torch
import triton
import triton.language as tl

# Tokens per chunk. 64 keeps the [C, C] score tile and the [C, 64] operand tiles in
# registers for every head dim (the head dims are walked in tiles of at most 64).
CHUNK_SIZE = 64
# Widest tile along a head dim; larger head dims are walked in several tiles.
MAX_HEAD_TILE = 64

# "fused": one kernel computes dq, dk, dv per chunk from the forward and gradient states (five
# launches in all); "three_runs": dq, dk, dv as three more lightning runs (nine launches). Read
# when the forward runs. Both are tested; keep the faster once measured on a GPU
# (benchmarks/bench_lightning_attn.py times both).
BACKWARD = "fused"

# Test hook: when True, every output buffer starts as NaN so that an element a
# kernel forgets to write fails the comparison instead of passing by luck.
POISON_OUTPUTS = False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _head_tile(dim: int) -> int:
    """Tile width along a head dim: a power of two in [16, 64] (tl.dot needs >= 16)."""
    return max(16, min(MAX_HEAD_TILE, triton.next_power_of_2(dim)))


def _grad_tile(dim: int) -> int:
    """Tile width along a head dim for the fused gradient kernel: at most 32. Compiled offline for
    sm_90 with 8 warps, 64-wide tiles spilled 350-600 bytes per thread at D = 64..256 (it holds
    more operand tiles than the forward); 32-wide tiles spill nothing."""
    return max(16, min(32, triton.next_power_of_2(dim)))


def _launch_options(num_warps: int = 4) -> dict:
    """Fixed launch configuration (never autotuned; the interpreter takes none).

    The output kernel asks for 8 warps: compiled offline for sm_90 with 4 warps it
    spilled ~0.6-1 KB of registers per thread at D=E=128, with 8 almost nothing.
    """
    return {} if _interpreting() else {"num_warps": num_warps, "num_stages": 2}


def _dot_precision(dtype: torch.dtype) -> tl.constexpr:
    # fp32 inputs get exact fp32 products (tf32 would cost ~1e-3 relative error);
    # fp16/bf16 inputs use tensor cores with fp32 accumulation.
    return "ieee" if dtype == torch.float32 else "tf32"


def _new_output(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _chunk_tokens(bounds, chunk_seq, chunk_lstart, chunk_len, chunk, C: tl.constexpr, REVERSE: tl.constexpr):
    """Where a chunk's rows live on the flat token axis.

    Returns the token of row 0 (int64 scalar), each row's token offset from it (int32,
    0 for rows past the chunk end so masked lanes still point inside the chunk), the
    row mask, the chunk length, the rows' positions inside their sequence, and the
    sequence index. A scalar 64-bit base plus small 32-bit offsets keeps the pointer
    tensors cheap in registers.
    """
    seq = tl.load(chunk_seq + chunk).to(tl.int64)
    lstart = tl.load(chunk_lstart + chunk)
    length = tl.load(chunk_len + chunk)
    rows = tl.arange(0, C)
    valid = rows < length
    position = lstart + rows  # position inside the sequence, in processing order
    if REVERSE:
        first_token = tl.load(bounds + seq + 1).to(tl.int64) - 1 - lstart
        row_offsets = tl.where(valid, -rows, 0)
    else:
        first_token = tl.load(bounds + seq).to(tl.int64) + lstart
        row_offsets = tl.where(valid, rows, 0)
    return first_token, row_offsets, valid, length, position, seq


@triton.jit
def _chunk_kv_kernel(
    k, v, kv, slopes, bounds, chunk_seq, chunk_lstart, chunk_len,
    stride_k_tok, stride_v_tok, H, scale,
    D: tl.constexpr, E: tl.constexpr, C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    REVERSE: tl.constexpr, DECAY_FROM_START: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """KV_b[d, e] = scale * sum_j w_j k_j[d] v_j[e] for one chunk, head and [BLOCK_D, BLOCK_E] tile,
    with w_j = lambda^{c-1-j} (decay to the chunk's end: the forward's state summary) or, with
    DECAY_FROM_START, w_j = lambda^{j+1} (the backward's summary sum_i lambda^{i+1} q_i^T dO_i)."""
    chunk = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    tile = tl.program_id(2)
    n_e_tiles = tl.cdiv(E, BLOCK_E)
    d_cols = (tile // n_e_tiles) * BLOCK_D + tl.arange(0, BLOCK_D)
    e_cols = (tile % n_e_tiles) * BLOCK_E + tl.arange(0, BLOCK_E)
    first_token, row_offsets, valid, length, _, _ = _chunk_tokens(bounds, chunk_seq, chunk_lstart, chunk_len, chunk, C, REVERSE)
    rate = tl.load(slopes + head)
    rows = tl.arange(0, C)
    # lambda^{c-1-j} (or lambda^{j+1}); rows past the chunk end are masked before exp.
    if DECAY_FROM_START:
        steps = rows + 1
    else:
        steps = length - 1 - rows
    key_decay = tl.exp(tl.where(valid, -rate * steps.to(tl.float32), float("-inf")))
    k_tile = tl.load(
        k + first_token * stride_k_tok + row_offsets[:, None] * stride_k_tok + head * D + d_cols[None, :],
        mask=valid[:, None] & (d_cols[None, :] < D), other=0.0,
    )
    v_tile = tl.load(
        v + first_token * stride_v_tok + row_offsets[:, None] * stride_v_tok + head * E + e_cols[None, :],
        mask=valid[:, None] & (e_cols[None, :] < E), other=0.0,
    )
    k_decayed = (k_tile.to(tl.float32) * key_decay[:, None]).to(v_tile.dtype)
    summary = tl.dot(tl.trans(k_decayed), v_tile, input_precision=DOT_PRECISION) * scale
    out = kv + (chunk * H + head) * (D * E) + d_cols[:, None] * E + e_cols[None, :]
    tl.store(out, summary, mask=(d_cols[:, None] < D) & (e_cols[None, :] < E))


@triton.jit
def _state_scan_kernel(
    kv, initial, final, slopes, chunk_offsets, chunk_len, H,
    D: tl.constexpr, E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, HAS_INITIAL: tl.constexpr,
    BACKWARDS: tl.constexpr,
):
    """Walk one sequence's chunks in order: replace each summary KV_b by the state entering
    chunk b, and write the state after the last chunk. fp32 throughout.

    BACKWARDS walks from the last chunk to the first (the backward's gradient state R: each
    slot receives the gradient reaching the end of its chunk, ``final`` gets d(initial state))."""
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    tile = tl.program_id(2)
    n_e_tiles = tl.cdiv(E, BLOCK_E)
    d_cols = (tile // n_e_tiles) * BLOCK_D + tl.arange(0, BLOCK_D)
    e_cols = (tile % n_e_tiles) * BLOCK_E + tl.arange(0, BLOCK_E)
    in_tile = (d_cols[:, None] < D) & (e_cols[None, :] < E)
    tile_offsets = d_cols[:, None] * E + e_cols[None, :]
    rate = tl.load(slopes + head)
    state_offset = (seq * H + head) * (D * E)
    if HAS_INITIAL:
        state = tl.load(initial + state_offset + tile_offsets, mask=in_tile, other=0.0)
    else:
        state = tl.zeros([BLOCK_D, BLOCK_E], dtype=tl.float32)
    first = tl.load(chunk_offsets + seq)
    last = tl.load(chunk_offsets + seq + 1)
    # Step a 64-bit pointer instead of multiplying the loop index (no casts on loop indices).
    if BACKWARDS:
        ptr = kv + ((last - 1).to(tl.int64) * H + head) * (D * E) + tile_offsets
        step = -H * D * E
    else:
        ptr = kv + (first.to(tl.int64) * H + head) * (D * E) + tile_offsets
        step = H * D * E
    for chunk in range(first, last):
        if BACKWARDS:
            length = tl.load(chunk_len + (first + last - 1 - chunk))
        else:
            length = tl.load(chunk_len + chunk)
        summary = tl.load(ptr, mask=in_tile, other=0.0)
        tl.store(ptr, state, mask=in_tile)
        state = tl.exp(-rate * length.to(tl.float32)) * state + summary
        ptr += step
    tl.store(final + state_offset + tile_offsets, state, mask=in_tile)


@triton.jit
def _chunk_output_kernel(
    q, k, v, o, states, bonus, slopes, bounds, chunk_seq, chunk_lstart, chunk_len,
    scale, stride_q_tok, stride_v_tok, stride_o_tok, H,
    D: tl.constexpr, E: tl.constexpr, C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    REVERSE: tl.constexpr, HAS_BONUS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One chunk and head: O = scale * (((Q K^T) * M) V + (Q * lambda^{i+1}) S_before) [+ (Q * lambda^p) B].

    Q K^T is formed once (walking D in tiles) and reused for every value tile.
    """
    chunk = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    first_token, row_offsets, valid, length, position, seq = _chunk_tokens(
        bounds, chunk_seq, chunk_lstart, chunk_len, chunk, C, REVERSE
    )
    q_rows = q + first_token * stride_q_tok + head * D + row_offsets[:, None] * stride_q_tok
    k_rows = k + first_token * stride_q_tok + head * D + row_offsets[:, None] * stride_q_tok
    v_rows = v + first_token * stride_v_tok + head * E + row_offsets[:, None] * stride_v_tok
    o_rows = o + first_token * stride_o_tok + head * E + row_offsets[:, None] * stride_o_tok
    rate = tl.load(slopes + head)
    rows = tl.arange(0, C)

    scores = tl.zeros([C, C], dtype=tl.float32)
    for d_start in range(0, D, BLOCK_D):
        d_cols = d_start + tl.arange(0, BLOCK_D)
        tile_mask = valid[:, None] & (d_cols[None, :] < D)
        q_tile = tl.load(q_rows + d_cols[None, :], mask=tile_mask, other=0.0)
        k_tile = tl.load(k_rows + d_cols[None, :], mask=tile_mask, other=0.0)
        scores += tl.dot(q_tile, tl.trans(k_tile), input_precision=DOT_PRECISION)
    distance = (rows[:, None] - rows[None, :]).to(tl.float32)
    # M_ij = lambda^{i-j} for i >= j: mask with `where` before `exp` (no exp of a positive number).
    scores *= tl.exp(tl.where(distance >= 0, -rate * distance, float("-inf")))
    query_decay = tl.exp(-rate * (rows + 1).to(tl.float32))  # lambda^{i+1}: the state is one step older
    if HAS_BONUS:
        bonus_decay = tl.exp(-rate * position.to(tl.float32))  # lambda^p, p = position in the sequence

    for e_start in range(0, E, BLOCK_E):
        e_cols = e_start + tl.arange(0, BLOCK_E)
        v_tile = tl.load(
            v_rows + e_cols[None, :], mask=valid[:, None] & (e_cols[None, :] < E), other=0.0
        )
        acc = tl.dot(scores.to(v_tile.dtype), v_tile, input_precision=DOT_PRECISION)
        if HAS_BONUS:
            extra = tl.zeros([C, BLOCK_E], dtype=tl.float32)
        for d_start in range(0, D, BLOCK_D):
            d_cols = d_start + tl.arange(0, BLOCK_D)
            q_tile = tl.load(
                q_rows + d_cols[None, :], mask=valid[:, None] & (d_cols[None, :] < D), other=0.0
            ).to(tl.float32)
            state_mask = (d_cols[:, None] < D) & (e_cols[None, :] < E)
            state_offsets = d_cols[:, None] * E + e_cols[None, :]
            state = tl.load(states + (chunk * H + head) * (D * E) + state_offsets, mask=state_mask, other=0.0)
            acc += tl.dot(
                (q_tile * query_decay[:, None]).to(v_tile.dtype), state.to(v_tile.dtype), input_precision=DOT_PRECISION
            )
            if HAS_BONUS:
                extra_state = tl.load(bonus + (seq * H + head) * (D * E) + state_offsets, mask=state_mask, other=0.0)
                extra += tl.dot(
                    (q_tile * bonus_decay[:, None]).to(v_tile.dtype),
                    extra_state.to(v_tile.dtype),
                    input_precision=DOT_PRECISION,
                )
        acc = acc * scale
        if HAS_BONUS:
            acc += extra  # the d(final_state) term is not scaled
        tl.store(
            o_rows + e_cols[None, :],
            acc.to(o.dtype.element_ty),
            mask=valid[:, None] & (e_cols[None, :] < E),
        )


@triton.jit
def _chunk_grad_kernel(
    q, k, v, do, dq, dk, dv, states, grad_states, slopes, bounds, chunk_seq, chunk_lstart, chunk_len,
    scale, stride_q_tok, stride_v_tok, H,
    D: tl.constexpr, E: tl.constexpr, C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dq, dk, dv of one chunk and head, from the forward state S entering the chunk and the
    gradient state R reaching its end (both fp32 [D, E]); G = scale * dO:

        A = (G V^T) * M       dq = A K + (G * lambda^{i+1}) S^T
        P = (Q K^T) * M       dk = A^T Q + (V R^T) * lambda^{c-1-j}
                              dv = P^T G + (K * lambda^{c-1-j}) R

    Each [C, C] score tile is formed once and used by every gradient that needs it, one tile
    live at a time (P for dv first, then A for dq and dk) to keep registers for the operands."""
    chunk = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    first_token, row_offsets, valid, length, _, _ = _chunk_tokens(
        bounds, chunk_seq, chunk_lstart, chunk_len, chunk, C, False
    )
    qk_rows = first_token * stride_q_tok + head * D + row_offsets[:, None] * stride_q_tok
    ve_rows = first_token * stride_v_tok + head * E + row_offsets[:, None] * stride_v_tok
    state_base = (chunk * H + head) * (D * E)
    rate = tl.load(slopes + head)
    rows = tl.arange(0, C)

    distance = (rows[:, None] - rows[None, :]).to(tl.float32)
    # M_ij = lambda^{i-j} for i >= j: mask with `where` before `exp`.
    decay = tl.exp(tl.where(distance >= 0, -rate * distance, float("-inf"))) * scale
    query_decay = tl.exp(-rate * (rows + 1).to(tl.float32)) * scale  # lambda^{i+1}, times scale
    key_decay = tl.exp(tl.where(valid, -rate * (length - 1 - rows).to(tl.float32), float("-inf")))  # lambda^{c-1-j}

    # dv first, from P = scale * (Q K^T) * M; one [C, C] tile is live at a time, in the input dtype.
    scores = tl.zeros([C, C], dtype=tl.float32)
    for d_start in range(0, D, BLOCK_D):
        d_cols = d_start + tl.arange(0, BLOCK_D)
        tile_mask = valid[:, None] & (d_cols[None, :] < D)
        q_tile = tl.load(q + qk_rows + d_cols[None, :], mask=tile_mask, other=0.0)
        k_tile = tl.load(k + qk_rows + d_cols[None, :], mask=tile_mask, other=0.0)
        scores += tl.dot(q_tile, tl.trans(k_tile), input_precision=DOT_PRECISION)
    scores_t = tl.trans((scores * decay).to(q.dtype.element_ty))
    for e_start in range(0, E, BLOCK_E):
        e_cols = e_start + tl.arange(0, BLOCK_E)
        tile_mask = valid[:, None] & (e_cols[None, :] < E)
        do_tile = tl.load(do + ve_rows + e_cols[None, :], mask=tile_mask, other=0.0)
        dv_acc = tl.dot(scores_t, do_tile, input_precision=DOT_PRECISION)
        for d_start in range(0, D, BLOCK_D):
            d_cols = d_start + tl.arange(0, BLOCK_D)
            k_tile = tl.load(k + qk_rows + d_cols[None, :], mask=valid[:, None] & (d_cols[None, :] < D), other=0.0)
            state_mask = (d_cols[:, None] < D) & (e_cols[None, :] < E)
            grad_state = tl.load(grad_states + state_base + d_cols[:, None] * E + e_cols[None, :], mask=state_mask, other=0.0)
            k_decayed = (k_tile.to(tl.float32) * key_decay[:, None]).to(k_tile.dtype)
            dv_acc += tl.dot(k_decayed, grad_state.to(k_tile.dtype), input_precision=DOT_PRECISION)
        tl.store(dv + ve_rows + e_cols[None, :], dv_acc.to(dv.dtype.element_ty), mask=tile_mask)

    # then dq and dk, from A = scale * (dO V^T) * M
    grad_scores = tl.zeros([C, C], dtype=tl.float32)
    for e_start in range(0, E, BLOCK_E):
        e_cols = e_start + tl.arange(0, BLOCK_E)
        tile_mask = valid[:, None] & (e_cols[None, :] < E)
        do_tile = tl.load(do + ve_rows + e_cols[None, :], mask=tile_mask, other=0.0)
        v_tile = tl.load(v + ve_rows + e_cols[None, :], mask=tile_mask, other=0.0)
        grad_scores += tl.dot(do_tile, tl.trans(v_tile), input_precision=DOT_PRECISION)
    grad_scores = (grad_scores * decay).to(q.dtype.element_ty)
    for d_start in range(0, D, BLOCK_D):
        d_cols = d_start + tl.arange(0, BLOCK_D)
        tile_mask = valid[:, None] & (d_cols[None, :] < D)
        q_tile = tl.load(q + qk_rows + d_cols[None, :], mask=tile_mask, other=0.0)
        k_tile = tl.load(k + qk_rows + d_cols[None, :], mask=tile_mask, other=0.0)
        dq_acc = tl.dot(grad_scores, k_tile, input_precision=DOT_PRECISION)
        dk_acc = tl.dot(tl.trans(grad_scores), q_tile, input_precision=DOT_PRECISION)
        dk_inter = tl.zeros([C, BLOCK_D], dtype=tl.float32)
        for e_start in range(0, E, BLOCK_E):
            e_cols = e_start + tl.arange(0, BLOCK_E)
            row_mask = valid[:, None] & (e_cols[None, :] < E)
            do_tile = tl.load(do + ve_rows + e_cols[None, :], mask=row_mask, other=0.0)
            v_tile = tl.load(v + ve_rows + e_cols[None, :], mask=row_mask, other=0.0)
            state_mask = (d_cols[:, None] < D) & (e_cols[None, :] < E)
            state_offsets = state_base + d_cols[:, None] * E + e_cols[None, :]
            state = tl.load(states + state_offsets, mask=state_mask, other=0.0)
            grad_state = tl.load(grad_states + state_offsets, mask=state_mask, other=0.0)
            do_decayed = (do_tile.to(tl.float32) * query_decay[:, None]).to(do_tile.dtype)
            dq_acc += tl.dot(do_decayed, tl.trans(state.to(do_tile.dtype)), input_precision=DOT_PRECISION)
            dk_inter += tl.dot(v_tile, tl.trans(grad_state.to(v_tile.dtype)), input_precision=DOT_PRECISION)
        dk_acc += dk_inter * key_decay[:, None]
        tl.store(dq + qk_rows + d_cols[None, :], dq_acc.to(dq.dtype.element_ty), mask=tile_mask)
        tl.store(dk + qk_rows + d_cols[None, :], dk_acc.to(dk.dtype.element_ty), mask=tile_mask)


@triton.jit
def _decode_kernel(
    q, k, v, state, o, slopes, scale, H,
    stride_q_b, stride_q_h, stride_v_b, stride_v_h, stride_s_b, stride_s_h, stride_s_d, stride_o_b, stride_o_h,
    D: tl.constexpr, E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """One token for one (sequence, head, value tile): S = lambda S + k^T v in place (fp32), o = scale q S."""
    pid = tl.program_id(0)
    batch = pid // H
    head = pid % H
    e_cols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = e_cols < E
    decay = tl.exp(-tl.load(slopes + head))
    v_row = tl.load(v + batch * stride_v_b + head * stride_v_h + e_cols, mask=e_mask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    base = state + batch.to(tl.int64) * stride_s_b + head * stride_s_h
    for d_start in range(0, D, BLOCK_D):
        d_cols = d_start + tl.arange(0, BLOCK_D)
        d_mask = d_cols < D
        k_col = tl.load(k + batch * stride_q_b + head * stride_q_h + d_cols, mask=d_mask, other=0.0).to(tl.float32)
        q_col = tl.load(q + batch * stride_q_b + head * stride_q_h + d_cols, mask=d_mask, other=0.0).to(tl.float32)
        ptrs = base + d_cols[:, None] * stride_s_d + e_cols[None, :]
        tile_mask = d_mask[:, None] & e_mask[None, :]
        tile = tl.load(ptrs, mask=tile_mask, other=0.0)
        tile = decay * tile + k_col[:, None] * v_row[None, :]
        tl.store(ptrs, tile, mask=tile_mask)
        acc += tl.sum(q_col[:, None] * tile, axis=0)
    tl.store(o + batch * stride_o_b + head * stride_o_h + e_cols, (acc * scale).to(o.dtype.element_ty), mask=e_mask)


# --------------------------------------------------------------------------- chunk layout


class ChunkLayout:
    """Sequences on a flat token axis and the chunks they are cut into.

    ``bounds`` [N+1]: token offsets of the sequences (batch rows, or ``cu_seqlens``).
    Per chunk: ``seq`` (its sequence), ``lstart`` (first position inside the sequence),
    ``length`` (real length, <= chunk). ``chunk_offsets`` [N+1]: each sequence's chunks.
    """

    def __init__(self, batch: int, length: int, cu_seqlens, chunk: int, device):
        self.chunk = chunk
        if cu_seqlens is None:
            # Fixed-length rows: everything is known on the host (no device sync).
            self.n_seqs = batch
            per_seq = triton.cdiv(length, chunk)
            self.n_chunks = batch * per_seq
            self.bounds = torch.arange(0, batch + 1, device=device, dtype=torch.int32) * length
            chunk_ids = torch.arange(self.n_chunks, device=device, dtype=torch.int32)
            self.seq = chunk_ids // max(per_seq, 1)
            self.lstart = (chunk_ids % max(per_seq, 1)) * chunk
            self.length = torch.clamp(length - self.lstart, max=chunk)
            self.chunk_offsets = torch.arange(0, batch + 1, device=device, dtype=torch.int32) * per_seq
            self.seq_lengths = torch.full((batch,), length, device=device, dtype=torch.int32)
            return
        bounds = cu_seqlens.to(device=device, dtype=torch.int32)
        seq_lengths = bounds[1:] - bounds[:-1]
        per_seq = (seq_lengths + chunk - 1) // chunk
        chunk_offsets = torch.zeros(seq_lengths.numel() + 1, device=device, dtype=torch.int32)
        chunk_offsets[1:] = torch.cumsum(per_seq, 0)
        self.n_seqs = seq_lengths.numel()
        self.n_chunks = int(chunk_offsets[-1])  # one host sync: the grid size depends on it
        seq = torch.repeat_interleave(torch.arange(self.n_seqs, device=device), per_seq.long(), output_size=self.n_chunks)
        index_in_seq = torch.arange(self.n_chunks, device=device) - chunk_offsets[seq].long()
        self.bounds = bounds.contiguous()
        self.seq = seq.to(torch.int32)
        self.lstart = (index_in_seq * chunk).to(torch.int32)
        self.length = torch.clamp(seq_lengths[seq].long() - index_in_seq * chunk, max=chunk).to(torch.int32)
        self.chunk_offsets = chunk_offsets
        self.seq_lengths = seq_lengths


# --------------------------------------------------------------------------- launch helpers


def _chunk_states(k, v, slopes, initial_state, layout: ChunkLayout, *, reverse=False, decay_from_start=False,
                  scale=1.0, backwards=False):
    """Per-chunk fp32 states ``[n_chunks, H, D, E]`` and the state after each sequence ``[N, H, D, E]``.

    Forward (default): each slot holds the state entering its chunk, from the summaries
    ``sum_j lambda^{c-1-j} k_j^T v_j`` scanned in time order from ``initial_state``. For the
    fused backward (``decay_from_start``, ``backwards``, k = q, v = dO): each slot holds the
    gradient reaching its chunk's end, scanned from ``initial_state`` = d(final state), and
    the returned "final" is d(initial state).
    """
    heads, dim_k, dim_v = k.shape[2], k.shape[3], v.shape[3]
    block_d, block_e = _head_tile(dim_k), _head_tile(dim_v)
    n_tiles = triton.cdiv(dim_k, block_d) * triton.cdiv(dim_v, block_e)
    final = _new_output((layout.n_seqs, heads, dim_k, dim_v), torch.float32, k.device)
    # Chunk summaries, overwritten in place by the scan with each chunk's state.
    states = _new_output((layout.n_chunks, heads, dim_k, dim_v), torch.float32, k.device)
    if layout.n_chunks == 0:  # every sequence is empty: the state passes through unchanged
        final.copy_(initial_state if initial_state is not None else torch.zeros_like(final))
        return states, final
    _chunk_kv_kernel[(layout.n_chunks, heads, n_tiles)](
        k, v, states, slopes, layout.bounds, layout.seq, layout.lstart, layout.length, k.stride(1), v.stride(1),
        heads, float(scale), D=dim_k, E=dim_v, C=layout.chunk, BLOCK_D=block_d, BLOCK_E=block_e,
        REVERSE=reverse, DECAY_FROM_START=decay_from_start, DOT_PRECISION=_dot_precision(k.dtype), **_launch_options(),
    )
    _state_scan_kernel[(layout.n_seqs, heads, n_tiles)](
        states, initial_state if initial_state is not None else final, final, slopes,
        layout.chunk_offsets, layout.length, heads,
        D=dim_k, E=dim_v, BLOCK_D=block_d, BLOCK_E=block_e, HAS_INITIAL=initial_state is not None,
        BACKWARDS=backwards, **_launch_options(),
    )
    return states, final


def _lightning_run(q, k, v, slopes, scale, initial_state, layout: ChunkLayout, *, reverse=False, bonus=None, out_dtype):
    """One chunked lightning attention over the flat token axis.

    q, k: [B, T, H, D] contiguous; v: [B, T, H, E] contiguous (same dtype);
    initial_state / bonus: [N, H, D, E] fp32 or None. With ``reverse`` the sequences run
    backwards in time. Returns (o [B, T, H, E] in out_dtype, final_state [N, H, D, E] fp32).
    """
    batch, length, heads, dim_k = q.shape
    dim_v = v.shape[-1]
    out = _new_output((batch, length, heads, dim_v), out_dtype, q.device)
    if layout.n_seqs == 0 or heads == 0:
        return out, _new_output((layout.n_seqs, heads, dim_k, dim_v), torch.float32, q.device)
    states, final = _chunk_states(k, v, slopes, initial_state, layout, reverse=reverse)
    if layout.n_chunks == 0:
        return out, final
    _chunk_output_kernel[(layout.n_chunks, heads)](
        q, k, v, out, states, bonus if bonus is not None else states, slopes,
        layout.bounds, layout.seq, layout.lstart, layout.length,
        float(scale), q.stride(1), v.stride(1), out.stride(1), heads,
        D=dim_k, E=dim_v, C=layout.chunk, BLOCK_D=_head_tile(dim_k), BLOCK_E=_head_tile(dim_v),
        REVERSE=reverse, HAS_BONUS=bonus is not None, DOT_PRECISION=_dot_precision(q.dtype),
        **_launch_options(num_warps=8),
    )
    return out, final


def _fused_backward(q, k, v, grad_out, slopes, scale, state0, grad_final, layout: ChunkLayout):
    """dq, dk, dv (in the inputs' dtypes) and d(initial state) (fp32 [N, H, D, E]) in five launches:
    the forward states again, the gradient states (reverse scan of sum_i lambda^{i+1} q_i^T G_i
    from d(final state)), then one kernel per chunk sharing both score tiles between the gradients."""
    batch, length, heads, dim_k = q.shape
    dim_v = v.shape[-1]
    dq, dk = _new_output(q.shape, q.dtype, q.device), _new_output(k.shape, k.dtype, k.device)
    dv = _new_output(v.shape, v.dtype, v.device)
    if layout.n_seqs == 0 or heads == 0:
        return dq, dk, dv, _new_output((layout.n_seqs, heads, dim_k, dim_v), torch.float32, q.device)
    states, _ = _chunk_states(k, v, slopes, state0, layout)
    grad_states, d_state0 = _chunk_states(q, grad_out, slopes, grad_final, layout, decay_from_start=True,
                                          scale=scale, backwards=True)
    if layout.n_chunks:
        _chunk_grad_kernel[(layout.n_chunks, heads)](
            q, k, v, grad_out, dq, dk, dv, states, grad_states, slopes,
            layout.bounds, layout.seq, layout.lstart, layout.length,
            float(scale), q.stride(1), v.stride(1), heads,
            D=dim_k, E=dim_v, C=layout.chunk, BLOCK_D=_grad_tile(dim_k), BLOCK_E=_grad_tile(dim_v),
            DOT_PRECISION=_dot_precision(q.dtype), **_launch_options(num_warps=8),
        )
    return dq, dk, dv, d_state0


def _state_transpose(state):
    """[N, H, D, E] -> contiguous fp32 [N, H, E, D] (the state of the transposed-role runs)."""
    return None if state is None else state.transpose(-1, -2).float().contiguous()


class LightningAttnTriton(torch.autograd.Function):
    """Chunked lightning attention with Triton kernels; the backward is ``BACKWARD``'s."""

    @staticmethod
    def forward(ctx, q, k, v, slopes, scale, initial_state, cu_seqlens, chunk_size):
        q, k, v = (x.contiguous() for x in (q, k, v))
        slopes = slopes.to(device=q.device, dtype=torch.float32).contiguous()
        state0 = None if initial_state is None else initial_state.float().contiguous()
        layout = ChunkLayout(q.shape[0], q.shape[1], cu_seqlens, chunk_size, q.device)
        out, final = _lightning_run(q, k, v, slopes, scale, state0, layout, out_dtype=q.dtype)
        ctx.save_for_backward(q, k, v, slopes, state0)
        ctx.layout, ctx.scale = layout, scale
        ctx.backward_variant = BACKWARD  # fixed when the graph is recorded
        ctx.initial_dtype = None if initial_state is None else initial_state.dtype
        return out, final

    @staticmethod
    def backward(ctx, grad_out, grad_final):
        q, k, v, slopes, state0 = ctx.saved_tensors
        layout, scale = ctx.layout, ctx.scale
        grad_out = torch.zeros_like(v) if grad_out is None else grad_out.to(q.dtype).contiguous()
        grad_final = None if grad_final is None else grad_final.float().contiguous()
        if ctx.backward_variant == "fused":
            dq, dk, dv, d_state0 = _fused_backward(q, k, v, grad_out, slopes, scale, state0, grad_final, layout)
            if state0 is None or not ctx.needs_input_grad[5]:
                d_state0 = None
            else:
                d_state0 = d_state0.to(ctx.initial_dtype)
            return dq, dk, dv, None, None, d_state0, None, None
        # dq_t = scale * sum_{j<=t} lambda^{t-j} (do_t . v_j) k_j + scale * lambda^{t+1} do_t S0^T
        dq, _ = _lightning_run(grad_out, v, k, slopes, scale, _state_transpose(state0), layout, out_dtype=q.dtype)
        # dk_j = scale * sum_{t>=j} lambda^{t-j} (v_j . do_t) q_t + lambda^{T-1-j} v_j dS_T^T (reverse time)
        dk, sum_do_q = _lightning_run(
            v, grad_out, q, slopes, scale, None, layout, reverse=True, bonus=_state_transpose(grad_final), out_dtype=k.dtype
        )
        # dv_j = scale * sum_{t>=j} lambda^{t-j} (k_j . q_t) do_t + lambda^{T-1-j} k_j dS_T
        dv, _ = _lightning_run(k, q, grad_out, slopes, scale, None, layout, reverse=True, bonus=grad_final, out_dtype=v.dtype)
        d_state0 = None
        if state0 is not None and ctx.needs_input_grad[5]:
            d_state0 = _initial_state_grad(sum_do_q, grad_final, slopes, scale, layout)
            d_state0 = d_state0.to(ctx.initial_dtype)
        return dq, dk, dv, None, None, d_state0, None, None


def _initial_state_grad(sum_do_q, grad_final, slopes, scale, layout):
    """dS0 = scale * lambda * (sum_t lambda^t do_t^T q_t)^T + lambda^{T_n} dS_T, per sequence n."""
    rates = slopes.view(1, -1, 1, 1)
    d_state0 = scale * torch.exp(-rates) * sum_do_q.transpose(-1, -2)
    if grad_final is not None:
        lengths = layout.seq_lengths.to(torch.float32).view(-1, 1, 1, 1)
        d_state0 = d_state0 + torch.exp(-rates * lengths) * grad_final
    return d_state0


# --------------------------------------------------------------------------- public entry points


def lightning_attn_triton(q, k, v, slopes, *, scale=1.0, initial_state=None, cu_seqlens=None, chunk_size=CHUNK_SIZE):
    """Lightning attention on the Triton kernels (the contract of ``tnl_kernels.api``).

    q, k: [B, T, H, D]; v: [B, T, H, E]; slopes: fp32 [H]; initial_state: [N, H, D, E];
    cu_seqlens: int32 [N+1] with B == 1. Returns (o [B, T, H, E] in q.dtype,
    final_state [N, H, D, E] fp32), differentiable in q, k, v and initial_state.
    """
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return LightningAttnTriton.apply(q, k, v, slopes, scale, initial_state, cu_seqlens, chunk_size)


def lightning_attn_decode_triton(q, k, v, slopes, state, *, scale=1.0):
    """One token: q, k [B, H, D], v [B, H, E]; updates fp32 ``state`` [B, H, D, E] in place; returns o [B, H, E].

    Never autotuned: a tuning run would apply the in-place update several times.
    """
    if state.dtype != torch.float32 or state.stride(-1) != 1:
        raise ValueError("decode state must be fp32 with a contiguous last dim")
    # q and k share one set of strides in the kernel; the tensors are tiny, so copy when unsure.
    q, k, v = (x.contiguous() for x in (q, k, v))
    batch, heads, dim_k = q.shape
    dim_v = v.shape[-1]
    out = _new_output((batch, heads, dim_v), q.dtype, q.device)
    if batch * heads == 0:
        return out
    slopes = slopes.to(device=q.device, dtype=torch.float32).contiguous()
    block_d, block_e = _head_tile(dim_k), _head_tile(dim_v)
    grid = (batch * heads, triton.cdiv(dim_v, block_e))
    _decode_kernel[grid](
        q, k, v, state, out, slopes, float(scale), heads,
        q.stride(0), q.stride(1), v.stride(0), v.stride(1), state.stride(0), state.stride(1), state.stride(2),
        out.stride(0), out.stride(1),
        D=dim_k, E=dim_v, BLOCK_D=block_d, BLOCK_E=block_e, **_launch_options(),
    )
    return out
