"""Triton backend of lightning attention (DESIGN.md sections 3.1 and 4).

Chunked algorithm (block length ``C``, 0-based position ``i`` inside a chunk, real
chunk length ``c``, state ``S`` entering the chunk):

    O = scale * (((Q K^T) * M) V + (Q * lambda^{i+1}) S)        M_ij = lambda^{i-j}, i >= j
    S <- lambda^c S + (K * lambda^{c-1-j})^T V

Two forward strategies, chosen per call by ``_forward_strategy``:

* ``sequential`` - ``_sequential_forward_kernel``: one program per (sequence, head, value
  tile) walks the sequence's chunks in order with its ``[D, BLOCK_E]`` state in fp32
  registers, writing each chunk's output as it goes. It reads q, k, v once and writes o
  once: the memory traffic of the bandwidth roofline. It needs enough (sequence, head)
  pairs to fill the GPU and a head dim that fits one tile (D <= 128).
* ``split`` - the state entering every chunk is stored (``_chunk_states``), then
  ``_chunk_output_kernel`` computes every chunk independently. More traffic (each chunk's
  ``[D, E]`` state is written and read back), but all chunks of a long sequence run at
  once: the choice for few sequences (long-context prefill) and head dims above 128.

The backward computes the states entering every chunk again, the gradient states
(``R``, the gradient reaching each chunk's end, from d(final state) backwards through the
summaries ``sum_i lambda^{i+1} q_i^T dO_i``; what leaves the first chunk is d(initial
state)), then ``_chunk_grad_kernel`` forms each chunk's two score tiles once and derives
dq, dk and dv from them and the two states, as the CPU path
(``kernels/chunked.py::chunked_backward``) does.

``_chunk_states`` has two strategies of its own (``_state_strategy``): ``sequential``, one
program per (sequence, head, 32x32 state tile) walking the chunks with the running sum in
fp32 registers (``_state_pass_kernel``, least traffic), or ``parallel``, every chunk's
summary at once (``_chunk_kv_kernel``) and then a walk of [D, E] additions only
(``_state_scan_kernel``), for when too few programs would walk to fill the GPU. Forward
states are stored in the input dtype by the sequential pass: their only consumers are
tensor-core dots that take them in that dtype, so the results are those of an fp32 copy,
at half the traffic. Gradient states are stored in fp32 either way, and every gradient
is summed in fp32 and rounded once, when stored. Every decay factor is block-local and
<= 1, and the causal mask is applied with ``where`` before ``exp``. Sequences (batch rows
or ``cu_seqlens`` pieces) live on a flat token axis, so varlen costs nothing extra.

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors with fixed launch
configurations (no autotuning); the chunked forward and backward refuse bf16 there
(``_refuse_interpreted_bf16``: the interpreter's bf16 ``tl.dot`` is wrong).
"""

import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl

# Tokens per chunk. 64 keeps the [C, C] score tile and the [C, 64] operand tiles in
# registers for every head dim (the head dims are walked in tiles of at most 64).
CHUNK_SIZE = 64
# Widest tile along a head dim in the chunk-parallel kernels; larger head dims are walked in tiles.
MAX_HEAD_TILE = 64
# The sequential forward holds whole [C, D] query/key tiles and a [D, BLOCK_E] state.
MAX_SEQUENTIAL_HEAD_DIM = 128

# "auto" (``_forward_strategy`` decides), "sequential" or "split": the tests and the
# benchmark force each one.
FORWARD = "auto"
# How the per-chunk states are computed (split forward, backward): "auto" (``_state_strategy``),
# "sequential" or "parallel".
STATES = "auto"

# Test hook: when True, every output buffer starts as NaN so that an element a
# kernel forgets to write fails the comparison instead of passing by luck.
POISON_OUTPUTS = False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels_interpreted() -> bool:
    """Whether this module's kernels run in Triton's interpreter (``TRITON_INTERPRET`` was set when
    they were defined, which is what counts, whatever the variable says now)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # a Triton without the interpreter module
        return _interpreting()
    return isinstance(_chunk_output_kernel, InterpretedFunction)


def _refuse_interpreted_bf16(dtype: torch.dtype) -> None:
    """The interpreter multiplies bf16 ``tl.dot`` operands wrongly (relative errors of 1e8, not
    rounding), so the chunked forward and backward refuse bf16 there instead of returning garbage.
    The decode kernel has no ``tl.dot`` (fp32 element-wise products) and is exact to bf16 rounding."""
    if dtype == torch.bfloat16 and _kernels_interpreted():
        raise ValueError(
            "bf16 inputs cannot run on the Triton lightning-attention kernels under the Triton interpreter "
            "(TRITON_INTERPRET=1): it multiplies bf16 tl.dot operands wrongly and the result would be garbage. "
            "Use fp32 or fp16 inputs, or backend='torch' (what backend='auto' picks for CPU tensors); "
            "bf16 is fine on a GPU without the interpreter."
        )


def _head_tile(dim: int) -> int:
    """Tile width along a head dim: a power of two in [16, 64] (tl.dot needs >= 16)."""
    return max(16, min(MAX_HEAD_TILE, triton.next_power_of_2(dim)))


def _narrow_tile(dim: int) -> int:
    """Tile width along a head dim for the state pass and the gradient kernel: at most 32.
    Compiled offline for sm_90 with 8 warps, 64-wide tiles spilled 350-600 bytes per thread in the
    gradient kernel at D = 64..256; the state pass at 64x64 needed 214-222 registers (one block per
    multiprocessor) against ~110 at 32x32, which also gives four times the programs."""
    return max(16, min(32, triton.next_power_of_2(dim)))


def _sequential_config(dim_k: int, dim_v: int) -> tuple[int, int, int]:
    """(chunk length, BLOCK_D, BLOCK_E) of the sequential forward: all of D in one tile, E in tiles
    of at most 64, 32-token chunks.

    The largest tiles that do not spill when compiled for sm_90 with 8 warps
    (``scripts/kernel_resources.py``, which assumes nothing about stride divisibility): 210 registers
    at D = E = 64 (one value tile: Q K^T formed once per chunk), 254 at 96, 247 at D = E = 128 (two
    value tiles, each forming Q K^T: +9% FLOPs, and the price of keeping the state in registers);
    with the 16-divisible strides and aligned pointers of a real launch, 138, 220 and 214. 64-token
    chunks spilled at D = 128 for every value tile width from 16 up, and at D = 64 needed two value
    tiles. Shorter chunks cost no FLOPs: per token the intra-chunk part (~C D) shrinks while the
    state part (~D E) stays."""
    return 32, max(16, triton.next_power_of_2(dim_k)), _head_tile(dim_v)


def _launch_options(num_warps: int = 4) -> dict:
    """Fixed launch configuration (never autotuned; the interpreter takes none).

    The chunk and state kernels ask for 8 warps: compiled offline for sm_90 with 4 warps the
    output kernel spilled ~0.6-1 KB of registers per thread at D=E=128, with 8 nothing.
    """
    return {} if _interpreting() else {"num_warps": num_warps, "num_stages": 2}


def _dot_precision(dtype: torch.dtype) -> tl.constexpr:
    # fp32 inputs get exact fp32 products (tf32 would cost ~1e-3 relative error);
    # fp16/bf16 inputs use tensor cores with fp32 accumulation.
    return "ieee" if dtype == torch.float32 else "tf32"


def _row_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` with exactly the row-major strides of its shape (a copy only when it lacks them).

    The kernels step along the flat batch x time token axis by ``stride(1)``. ``.contiguous()`` is
    not enough for that: PyTorch calls a tensor contiguous whatever its strides on size-1 dims, so a
    ``[B, H, 1, D]`` tensor transposed to ``[B, 1, H, D]`` keeps ``stride(1) == D``, not ``H * D``.
    """
    expected, step = [], 1
    for size in reversed(x.shape):
        expected.append(step)
        step *= size
    if x.stride() == tuple(reversed(expected)):
        return x
    return torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)


def _new_output(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _chunk_tokens(bounds, chunk_seq, chunk_lstart, chunk_len, chunk, C: tl.constexpr):
    """Where a chunk's rows live on the flat token axis.

    Returns the token of row 0 (int64 scalar), each row's token offset from it (int32,
    0 for rows past the chunk end so masked lanes still point inside the chunk), the
    row mask and the chunk length. A scalar 64-bit base plus small 32-bit offsets keeps
    the pointer tensors cheap in registers.
    """
    seq = tl.load(chunk_seq + chunk).to(tl.int64)
    lstart = tl.load(chunk_lstart + chunk)
    length = tl.load(chunk_len + chunk)
    rows = tl.arange(0, C)
    valid = rows < length
    first_token = tl.load(bounds + seq).to(tl.int64) + lstart
    return first_token, tl.where(valid, rows, 0), valid, length


@triton.jit
def _state_pass_kernel(
    k, v, states, initial, final, slopes, bounds, chunk_offsets,
    stride_k_tok, stride_v_tok, H, scale,
    D: tl.constexpr, E: tl.constexpr, C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    HAS_INITIAL: tl.constexpr, BACKWARDS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Walk one sequence's chunks for one head and [BLOCK_D, BLOCK_E] state tile, storing the state
    as it enters each chunk (in ``states``' dtype) and the state after the last one (fp32).

    Forward: from the first chunk, S <- lambda^c S + scale * (K * lambda^{c-1-j})^T V.
    BACKWARDS (the gradient state R, with k = q and v = dO): from the last chunk, each slot gets
    the gradient reaching its chunk's end, R <- lambda^c R + scale * (Q * lambda^{i+1})^T dO, and
    ``final`` receives d(initial state).

    Tiles are addressed as a scalar 64-bit base per chunk plus int32 offsets: [C, BLOCK] pointer
    tensors would stay live across the loop at twice the registers."""
    # One flat grid axis, tiles fastest: the programs of one (sequence, head) start together and
    # walk its chunks in step, so the k and v tiles they share are read from L2, not HBM, and
    # millions of varlen sequences fit (the second and third grid axes stop at 65535).
    n_e_tiles = tl.cdiv(E, BLOCK_E)
    n_tiles = tl.cdiv(D, BLOCK_D) * n_e_tiles
    pid = tl.program_id(0)
    tile = pid % n_tiles
    head = (pid // n_tiles) % H
    seq = (pid // n_tiles // H).to(tl.int64)
    d_cols = (tile // n_e_tiles) * BLOCK_D + tl.arange(0, BLOCK_D)
    e_cols = (tile % n_e_tiles) * BLOCK_E + tl.arange(0, BLOCK_E)
    in_tile = (d_cols[:, None] < D) & (e_cols[None, :] < E)
    tile_offsets = d_cols[:, None] * E + e_cols[None, :]
    rate = tl.load(slopes + head)
    state_block = (seq * H + head) * (D * E)
    if HAS_INITIAL:
        state = tl.load(initial + state_block + tile_offsets, mask=in_tile, other=0.0)
    else:
        state = tl.zeros([BLOCK_D, BLOCK_E], dtype=tl.float32)
    seq_start = tl.load(bounds + seq).to(tl.int64)
    seq_len = tl.load(bounds + seq + 1) - tl.load(bounds + seq)
    first_chunk = tl.load(chunk_offsets + seq).to(tl.int64)
    n_chunks = tl.cdiv(seq_len, C)
    rows = tl.arange(0, C)
    k_offsets = rows[:, None] * stride_k_tok + d_cols[None, :]
    v_offsets = rows[:, None] * stride_v_tok + e_cols[None, :]
    for n in range(n_chunks):
        if BACKWARDS:
            index = n_chunks - 1 - n
        else:
            index = n
        slot = states + ((first_chunk + index) * H + head) * (D * E)
        tl.store(slot + tile_offsets, state.to(states.dtype.element_ty), mask=in_tile)
        length = tl.minimum(seq_len - index * C, C)
        valid = rows < length
        # lambda^{c-1-j} (to the chunk's end) or lambda^{i+1} (from its start); masked before exp.
        if BACKWARDS:
            steps = rows + 1
        else:
            steps = length - 1 - rows
        weight = tl.exp(tl.where(valid, -rate * steps.to(tl.float32), float("-inf")))
        token = seq_start + index * C
        k_tile = tl.load(k + (token * stride_k_tok + head * D) + k_offsets,
                         mask=valid[:, None] & (d_cols[None, :] < D), other=0.0)
        v_tile = tl.load(v + (token * stride_v_tok + head * E) + v_offsets,
                         mask=valid[:, None] & (e_cols[None, :] < E), other=0.0)
        k_weighted = (k_tile.to(tl.float32) * weight[:, None]).to(v_tile.dtype)
        summary = tl.dot(tl.trans(k_weighted), v_tile, input_precision=DOT_PRECISION)
        state = tl.exp(-rate * length.to(tl.float32)) * state + summary * scale
    tl.store(final + state_block + tile_offsets, state, mask=in_tile)


@triton.jit
def _chunk_kv_kernel(
    k, v, kv, slopes, bounds, chunk_seq, chunk_lstart, chunk_len,
    stride_k_tok, stride_v_tok, H, scale,
    D: tl.constexpr, E: tl.constexpr, C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    DECAY_FROM_START: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Chunk-parallel states, step 1: KV_b[d, e] = scale * sum_j w_j k_j[d] v_j[e] (fp32) for one chunk,
    head and [BLOCK_D, BLOCK_E] tile, with w_j = lambda^{c-1-j} (decay to the chunk's end: the
    forward's state summary) or, with DECAY_FROM_START, w_j = lambda^{j+1} (the backward's summary
    sum_i lambda^{i+1} q_i^T dO_i)."""
    chunk = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    tile = tl.program_id(2)
    n_e_tiles = tl.cdiv(E, BLOCK_E)
    d_cols = (tile // n_e_tiles) * BLOCK_D + tl.arange(0, BLOCK_D)
    e_cols = (tile % n_e_tiles) * BLOCK_E + tl.arange(0, BLOCK_E)
    first_token, row_offsets, valid, length = _chunk_tokens(bounds, chunk_seq, chunk_lstart, chunk_len, chunk, C)
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
    """Chunk-parallel states, step 2: walk one sequence's chunk summaries in order, replacing each
    summary KV_b by the state entering chunk b, and write the state after the last chunk. fp32
    throughout; only [D, E] additions on the walk.

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
def _sequential_forward_kernel(
    q, k, v, o, initial, final, slopes, bounds,
    scale, stride_qk_tok, stride_vo_tok, H,
    D: tl.constexpr, E: tl.constexpr, C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    HAS_INITIAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One sequence, head and value tile, chunk after chunk: the output of each chunk from its
    scores and the fp32 state carried in registers, then the state update. q, k, v are read once
    from HBM and o written once. Addressing as in ``_state_pass_kernel`` (the state too: a scalar
    64-bit base and int32 tile offsets, not a 64-bit offset tensor held across the loop for the
    final store); v and o share one token stride.

    A NaN or inf in k or v reaches no earlier position (issue #19): the causal mask is applied to
    the scores with ``where``, and non-finite values are left out of the intra-chunk dot (they would
    meet the masked zeros of earlier rows: 0 * NaN = NaN), their column of the output being set
    non-finite from their row on instead; the state takes them as they are, so later chunks see
    them as the recurrence does."""
    # Flat grid, value tiles fastest (see _state_pass_kernel): the value tiles of one head re-read
    # the same q and k tiles at about the same time, so the second read comes from L2.
    n_e_tiles = tl.cdiv(E, BLOCK_E)
    pid = tl.program_id(0)
    head = (pid // n_e_tiles) % H
    seq = (pid // n_e_tiles // H).to(tl.int64)
    d_cols = tl.arange(0, BLOCK_D)
    e_cols = (pid % n_e_tiles) * BLOCK_E + tl.arange(0, BLOCK_E)
    in_tile = (d_cols[:, None] < D) & (e_cols[None, :] < E)
    state_block = (seq * H + head) * (D * E)
    tile_offsets = d_cols[:, None] * E + e_cols[None, :]
    if HAS_INITIAL:
        state = tl.load(initial + state_block + tile_offsets, mask=in_tile, other=0.0)
    else:
        state = tl.zeros([BLOCK_D, BLOCK_E], dtype=tl.float32)
    rate = tl.load(slopes + head)
    seq_start = tl.load(bounds + seq).to(tl.int64)
    seq_len = tl.load(bounds + seq + 1) - tl.load(bounds + seq)
    rows = tl.arange(0, C)
    qk_offsets = rows[:, None] * stride_qk_tok + d_cols[None, :]
    vo_offsets = rows[:, None] * stride_vo_tok + e_cols[None, :]
    for start in range(0, seq_len, C):
        length = tl.minimum(seq_len - start, C)
        valid = rows < length
        qk_base = (seq_start + start) * stride_qk_tok + head * D
        vo_base = (seq_start + start) * stride_vo_tok + head * E
        qk_mask = valid[:, None] & (d_cols[None, :] < D)
        vo_mask = valid[:, None] & (e_cols[None, :] < E)
        q_tile = tl.load(q + qk_base + qk_offsets, mask=qk_mask, other=0.0)
        k_tile = tl.load(k + qk_base + qk_offsets, mask=qk_mask, other=0.0)
        v_tile = tl.load(v + vo_base + vo_offsets, mask=vo_mask, other=0.0)
        scores = tl.dot(q_tile, tl.trans(k_tile), input_precision=DOT_PRECISION)
        # M_ij = lambda^{i-j} for i >= j: mask with `where` before `exp`, and apply it with `where`
        # too, so that a NaN key never reaches an earlier query (NaN * 0 is NaN).
        distance = (rows[:, None] - rows[None, :]).to(tl.float32)
        scores = tl.where(distance >= 0, scores * tl.exp(tl.where(distance >= 0, -rate * distance, float("-inf"))),
                          0.0).to(v_tile.dtype)
        # The decays scale rows of the [C, BLOCK_E] products, never the wide [C, D] q and k tiles
        # (an fp32 copy of those would not fit in registers next to the state):
        # (Q * lambda^{i+1}) S = lambda^{i+1} * (Q S), and (K * w)^T V = K^T (V * w).
        # The order below keeps registers: the scores go to their input dtype and the inter-chunk dot
        # comes first, so the [C, D] query operand is dead before the value tile is masked.
        query_decay = tl.exp(-rate * (rows + 1).to(tl.float32))  # lambda^{i+1}: the state is one step older
        acc = tl.dot(q_tile, state.to(v_tile.dtype), input_precision=DOT_PRECISION) * query_decay[:, None]
        # A NaN or inf value is left out of the intra-chunk dot, where the masked zeros of earlier rows
        # would meet it (0 * NaN = NaN), and its column is non-finite from its row on: where
        # (causal ones) x (non-finite indicator), an exact count, is positive. This extra small dot
        # costs fewer registers and barriers than a cross-warp min over rows (measured for sm_90).
        v_finite = tl.abs(v_tile) < float("inf")  # false for NaN too
        acc = tl.dot(scores, tl.where(v_finite, v_tile, 0.0), acc, input_precision=DOT_PRECISION)
        bad_before = tl.dot(tl.where(rows[:, None] >= rows[None, :], 1.0, 0.0).to(v_tile.dtype),
                            tl.where(v_finite, 0.0, 1.0).to(v_tile.dtype), input_precision=DOT_PRECISION)
        acc = tl.where(bad_before > 0, float("nan"), acc)
        tl.store(o + vo_base + vo_offsets, (acc * scale).to(o.dtype.element_ty), mask=vo_mask)
        key_decay = tl.exp(tl.where(valid, -rate * (length - 1 - rows).to(tl.float32), float("-inf")))
        v_decayed = (v_tile.to(tl.float32) * key_decay[:, None]).to(v_tile.dtype)
        state = tl.exp(-rate * length.to(tl.float32)) * state + tl.dot(
            tl.trans(k_tile), v_decayed, input_precision=DOT_PRECISION
        )
    tl.store(final + state_block + tile_offsets, state, mask=in_tile)


@triton.jit
def _chunk_output_kernel(
    q, k, v, o, states, slopes, bounds, chunk_seq, chunk_lstart, chunk_len,
    scale, stride_q_tok, stride_v_tok, stride_o_tok, H,
    D: tl.constexpr, E: tl.constexpr, C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One chunk and head: O = scale * (((Q K^T) * M) V + (Q * lambda^{i+1}) S_before).

    Q K^T is formed once (walking D in tiles) and reused for every value tile.
    """
    chunk = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    first_token, row_offsets, valid, _ = _chunk_tokens(bounds, chunk_seq, chunk_lstart, chunk_len, chunk, C)
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
    # M_ij = lambda^{i-j} for i >= j: mask with `where` before `exp` (no exp of a positive number), and
    # apply it with `where` too, so that a NaN key never reaches an earlier query (NaN * 0 is NaN).
    scores = tl.where(distance >= 0, scores * tl.exp(tl.where(distance >= 0, -rate * distance, float("-inf"))), 0.0)
    query_decay = tl.exp(-rate * (rows + 1).to(tl.float32))  # lambda^{i+1}: the state is one step older

    for e_start in range(0, E, BLOCK_E):
        e_cols = e_start + tl.arange(0, BLOCK_E)
        v_tile = tl.load(
            v_rows + e_cols[None, :], mask=valid[:, None] & (e_cols[None, :] < E), other=0.0
        )
        # a NaN (or inf) value: left out of the dot, it makes its column non-finite from its row on
        v_finite = tl.abs(v_tile) < float("inf")
        first_bad = tl.min(tl.where(v_finite, C, rows[:, None]), axis=0)
        acc = tl.dot(scores.to(v_tile.dtype), tl.where(v_finite, v_tile, 0.0), input_precision=DOT_PRECISION)
        acc = tl.where(rows[:, None] >= first_bad[None, :], float("nan"), acc)
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
        tl.store(
            o_rows + e_cols[None, :],
            (acc * scale).to(o.dtype.element_ty),
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
    first_token, row_offsets, valid, length = _chunk_tokens(bounds, chunk_seq, chunk_lstart, chunk_len, chunk, C)
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
    # masks applied with `where`: a NaN key or query never reaches another row (NaN * 0 is NaN)
    scores_t = tl.trans(tl.where(distance >= 0, scores * decay, 0.0).to(q.dtype.element_ty))
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
    grad_scores = tl.where(distance >= 0, grad_scores * decay, 0.0).to(q.dtype.element_ty)
    for d_start in range(0, D, BLOCK_D):
        d_cols = d_start + tl.arange(0, BLOCK_D)
        tile_mask = valid[:, None] & (d_cols[None, :] < D)
        q_tile = tl.load(q + qk_rows + d_cols[None, :], mask=tile_mask, other=0.0)
        k_tile = tl.load(k + qk_rows + d_cols[None, :], mask=tile_mask, other=0.0)
        # a NaN (or inf) key: left out of A K, it makes its column of dq non-finite from its row on
        k_finite = tl.abs(k_tile) < float("inf")
        first_bad = tl.min(tl.where(k_finite, C, rows[:, None]), axis=0)
        dq_acc = tl.dot(grad_scores, tl.where(k_finite, k_tile, 0.0), input_precision=DOT_PRECISION)
        dq_acc = tl.where(rows[:, None] >= first_bad[None, :], float("nan"), dq_acc)
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


@dataclasses.dataclass
class ChunkTables:
    """Where every chunk is: ``chunk_offsets`` [N+1] (each sequence's chunks) and, per chunk, ``seq``
    (its sequence), ``lstart`` (first position inside the sequence), ``length`` (real length)."""

    n_chunks: int
    chunk_offsets: torch.Tensor
    seq: torch.Tensor
    lstart: torch.Tensor
    length: torch.Tensor


class ChunkLayout:
    """Sequences on a flat token axis and the chunks they are cut into.

    ``bounds`` [N+1]: token offsets of the sequences (batch rows, or ``cu_seqlens``), all the
    sequential forward needs. ``tables`` (``ChunkTables``) is built on first use, by the state
    passes and the chunk-parallel kernels (for varlen it costs a host sync).
    """

    def __init__(self, batch: int, length: int, cu_seqlens, chunk: int, device):
        self.chunk, self._device = chunk, device
        self._row_length = None if cu_seqlens is not None else length
        if cu_seqlens is None:
            self.n_seqs = batch
            self.bounds = torch.arange(0, batch + 1, device=device, dtype=torch.int32) * length
        else:
            self.n_seqs = cu_seqlens.numel() - 1
            self.bounds = cu_seqlens.to(device=device, dtype=torch.int32).contiguous()

    @functools.cached_property
    def tables(self) -> "ChunkTables":
        return self._chunk_tables()

    def _chunk_tables(self) -> "ChunkTables":
        chunk, device = self.chunk, self._device
        if self._row_length is not None:
            # Fixed-length rows: everything is known on the host (no device sync).
            per_seq = triton.cdiv(self._row_length, chunk)
            n_chunks = self.n_seqs * per_seq
            chunk_ids = torch.arange(n_chunks, device=device, dtype=torch.int32)
            lstart = (chunk_ids % max(per_seq, 1)) * chunk
            return ChunkTables(
                n_chunks=n_chunks,
                chunk_offsets=torch.arange(0, self.n_seqs + 1, device=device, dtype=torch.int32) * per_seq,
                seq=chunk_ids // max(per_seq, 1),
                lstart=lstart,
                length=torch.clamp(self._row_length - lstart, max=chunk),
            )
        seq_lengths = self.bounds[1:] - self.bounds[:-1]
        per_seq = (seq_lengths + chunk - 1) // chunk
        chunk_offsets = torch.zeros(self.n_seqs + 1, device=device, dtype=torch.int32)
        chunk_offsets[1:] = torch.cumsum(per_seq, 0)
        n_chunks = int(chunk_offsets[-1])  # one host sync: the grid size depends on it
        seq = torch.repeat_interleave(torch.arange(self.n_seqs, device=device), per_seq.long(), output_size=n_chunks)
        index_in_seq = torch.arange(n_chunks, device=device) - chunk_offsets[seq].long()
        return ChunkTables(
            n_chunks=n_chunks,
            chunk_offsets=chunk_offsets,
            seq=seq.to(torch.int32),
            lstart=(index_in_seq * chunk).to(torch.int32),
            length=torch.clamp(seq_lengths[seq].long() - index_in_seq * chunk, max=chunk).to(torch.int32),
        )


# --------------------------------------------------------------------------- launch helpers


def _chunk_states(k, v, slopes, initial_state, layout: ChunkLayout, *, backwards=False, scale=1.0, strategy=None):
    """The state entering every chunk ``[n_chunks, H, D, E]`` and the fp32 state after each
    sequence ``[N, H, D, E]``, from ``initial_state``.

    With ``backwards`` (k = q, v = dO, initial_state = d(final state)): each slot holds the gradient
    reaching its chunk's end, and the returned "final" is d(initial state).

    ``_state_strategy`` picks how: "sequential" (``_state_pass_kernel``: the dots on the walk,
    forward states stored in the input dtype, the only dtype their consumers read; gradient states
    stay fp32) or "parallel" (``_chunk_kv_kernel`` forms every chunk's summary at once in fp32, then
    ``_state_scan_kernel`` walks only [D, E] additions; for when too few sequences x heads x tiles
    would walk in sequence to fill the GPU). ``strategy`` overrides ``STATES`` (the backward passes
    the value the forward saw).
    """
    heads, dim_k, dim_v = k.shape[2], k.shape[3], v.shape[3]
    final = _new_output((layout.n_seqs, heads, dim_k, dim_v), torch.float32, k.device)
    state_in = initial_state if initial_state is not None else final  # a placeholder when HAS_INITIAL is off
    if _state_strategy(dim_k, dim_v, layout.n_seqs, heads, k.device, strategy or STATES) == "sequential":
        block_d, block_e = _narrow_tile(dim_k), _narrow_tile(dim_v)
        n_tiles = triton.cdiv(dim_k, block_d) * triton.cdiv(dim_v, block_e)
        stored_dtype = torch.float32 if backwards or k.dtype == torch.float32 else k.dtype
        states = _new_output((layout.tables.n_chunks, heads, dim_k, dim_v), stored_dtype, k.device)
        _state_pass_kernel[(layout.n_seqs * heads * n_tiles,)](
            k, v, states, state_in, final, slopes, layout.bounds, layout.tables.chunk_offsets,
            k.stride(1), v.stride(1), heads, float(scale),
            D=dim_k, E=dim_v, C=layout.chunk, BLOCK_D=block_d, BLOCK_E=block_e,
            HAS_INITIAL=initial_state is not None, BACKWARDS=backwards, DOT_PRECISION=_dot_precision(k.dtype),
            **_launch_options(num_warps=8),
        )
        return states, final
    block_d, block_e = _head_tile(dim_k), _head_tile(dim_v)
    n_tiles = triton.cdiv(dim_k, block_d) * triton.cdiv(dim_v, block_e)
    tables = layout.tables
    # Chunk summaries, overwritten in place by the scan with each chunk's state.
    states = _new_output((tables.n_chunks, heads, dim_k, dim_v), torch.float32, k.device)
    if tables.n_chunks:
        _chunk_kv_kernel[(tables.n_chunks, heads, n_tiles)](
            k, v, states, slopes, layout.bounds, tables.seq, tables.lstart, tables.length, k.stride(1), v.stride(1),
            heads, float(scale), D=dim_k, E=dim_v, C=layout.chunk, BLOCK_D=block_d, BLOCK_E=block_e,
            DECAY_FROM_START=backwards, DOT_PRECISION=_dot_precision(k.dtype), **_launch_options(),
        )
    _state_scan_kernel[(layout.n_seqs, heads, n_tiles)](
        states, state_in, final, slopes, tables.chunk_offsets, tables.length, heads,
        D=dim_k, E=dim_v, BLOCK_D=block_d, BLOCK_E=block_e, HAS_INITIAL=initial_state is not None,
        BACKWARDS=backwards, **_launch_options(),
    )
    return states, final


@functools.lru_cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _fills_gpu(programs: int, device: torch.device) -> bool:
    """Whether a kernel whose programs each walk a whole sequence has one for every multiprocessor:
    the simplest rule that keeps the GPU busy. Where each choice really crosses over is for
    ``benchmarks/bench_lightning_attn.py`` to measure (it times every strategy forced)."""
    return programs >= _multiprocessors(device)


def _checked_override(name: str, value: str, choices: tuple) -> str:
    if value not in ("auto", *choices):
        raise ValueError(f"{name} must be 'auto' or one of {choices}, got {value!r}")
    return value


def _forward_strategy(dim_k: int, dim_v: int, n_seqs: int, heads: int, dtype: torch.dtype, device: torch.device) -> str:
    """``FORWARD`` when forced, else "sequential" when its programs (sequence x head x value tile)
    fill the GPU and D fits one tile, "split" otherwise. fp32 inputs always run split: compiled for
    sm_90, the sequential kernel's exact fp32 dots need ~6 KB of spilled registers per thread."""
    if _checked_override("FORWARD", FORWARD, ("sequential", "split")) != "auto":
        if FORWARD == "sequential" and dim_k > MAX_SEQUENTIAL_HEAD_DIM:
            raise ValueError(f"the sequential forward takes head dims up to {MAX_SEQUENTIAL_HEAD_DIM}, got {dim_k}")
        return FORWARD
    if dim_k > MAX_SEQUENTIAL_HEAD_DIM or dtype == torch.float32:
        return "split"
    programs = n_seqs * heads * triton.cdiv(dim_v, _sequential_config(dim_k, dim_v)[2])
    return "sequential" if _fills_gpu(programs, device) else "split"


def _state_strategy(dim_k: int, dim_v: int, n_seqs: int, heads: int, device: torch.device, override: str) -> str:
    """``override`` (``STATES``) when forced, else "sequential" when the state pass's programs
    (sequence x head x 32x32 state tile) fill the GPU, "parallel" otherwise."""
    if _checked_override("STATES", override, ("sequential", "parallel")) != "auto":
        return override
    programs = n_seqs * heads * triton.cdiv(dim_k, _narrow_tile(dim_k)) * triton.cdiv(dim_v, _narrow_tile(dim_v))
    return "sequential" if _fills_gpu(programs, device) else "parallel"


def _forward(q, k, v, slopes, scale, initial_state, layout: ChunkLayout):
    """Chunked lightning attention over the flat token axis.

    q, k: [B, T, H, D] and v: [B, T, H, E] with unit stride along the head dim (same dtype);
    initial_state: [N, H, D, E] fp32 or None. Returns (o [B, T, H, E], final_state [N, H, D, E] fp32).
    """
    _refuse_interpreted_bf16(q.dtype)
    q, k, v = (_row_major(x) for x in (q, k, v))
    batch, length, heads, dim_k = q.shape
    dim_v = v.shape[-1]
    out = _new_output((batch, length, heads, dim_v), q.dtype, q.device)
    if layout.n_seqs == 0 or heads == 0:
        return out, _new_output((layout.n_seqs, heads, dim_k, dim_v), torch.float32, q.device)
    if _forward_strategy(dim_k, dim_v, layout.n_seqs, heads, q.dtype, q.device) == "sequential":
        final = _new_output((layout.n_seqs, heads, dim_k, dim_v), torch.float32, q.device)
        chunk, block_d, block_e = _sequential_config(dim_k, dim_v)
        _sequential_forward_kernel[(layout.n_seqs * heads * triton.cdiv(dim_v, block_e),)](
            q, k, v, out, initial_state if initial_state is not None else final, final, slopes, layout.bounds,
            float(scale), q.stride(1), v.stride(1), heads,
            D=dim_k, E=dim_v, C=chunk, BLOCK_D=block_d, BLOCK_E=block_e,
            HAS_INITIAL=initial_state is not None, DOT_PRECISION=_dot_precision(q.dtype), **_launch_options(num_warps=8),
        )
        return out, final
    states, final = _chunk_states(k, v, slopes, initial_state, layout)
    if layout.tables.n_chunks:
        _chunk_output_kernel[(layout.tables.n_chunks, heads)](
            q, k, v, out, states, slopes, layout.bounds, layout.tables.seq, layout.tables.lstart, layout.tables.length,
            float(scale), q.stride(1), v.stride(1), out.stride(1), heads,
            D=dim_k, E=dim_v, C=layout.chunk, BLOCK_D=_head_tile(dim_k), BLOCK_E=_head_tile(dim_v),
            DOT_PRECISION=_dot_precision(q.dtype), **_launch_options(num_warps=8),
        )
    return out, final


def _backward(q, k, v, grad_out, slopes, scale, state0, grad_final, layout: ChunkLayout, states_strategy: str):
    """dq, dk, dv (in the inputs' dtypes) and d(initial state) (fp32 [N, H, D, E]) in three launches:
    the forward states again, the gradient states (reverse pass of sum_i lambda^{i+1} q_i^T G_i from
    d(final state)), then one kernel per chunk sharing both score tiles between the gradients."""
    _refuse_interpreted_bf16(q.dtype)
    q, k, v, grad_out = (_row_major(x) for x in (q, k, v, grad_out))
    heads, dim_k = q.shape[2], q.shape[3]
    dim_v = v.shape[-1]
    dq, dk = _new_output(q.shape, q.dtype, q.device), _new_output(k.shape, k.dtype, k.device)
    dv = _new_output(v.shape, v.dtype, v.device)
    if layout.n_seqs == 0 or heads == 0:
        return dq, dk, dv, _new_output((layout.n_seqs, heads, dim_k, dim_v), torch.float32, q.device)
    states, _ = _chunk_states(k, v, slopes, state0, layout, strategy=states_strategy)
    grad_states, d_state0 = _chunk_states(q, grad_out, slopes, grad_final, layout, backwards=True, scale=scale,
                                          strategy=states_strategy)
    if layout.tables.n_chunks:
        _chunk_grad_kernel[(layout.tables.n_chunks, heads)](
            q, k, v, grad_out, dq, dk, dv, states, grad_states, slopes,
            layout.bounds, layout.tables.seq, layout.tables.lstart, layout.tables.length,
            float(scale), q.stride(1), v.stride(1), heads,
            D=dim_k, E=dim_v, C=layout.chunk, BLOCK_D=_narrow_tile(dim_k), BLOCK_E=_narrow_tile(dim_v),
            DOT_PRECISION=_dot_precision(q.dtype), **_launch_options(num_warps=8),
        )
    return dq, dk, dv, d_state0


class LightningAttnTriton(torch.autograd.Function):
    """Chunked lightning attention with Triton kernels (forward: ``_forward``; backward: ``_backward``)."""

    @staticmethod
    def forward(ctx, q, k, v, slopes, scale, initial_state, cu_seqlens, chunk_size):
        q, k, v = (_row_major(x) for x in (q, k, v))
        slopes = slopes.to(device=q.device, dtype=torch.float32).contiguous()
        state0 = None if initial_state is None else initial_state.float().contiguous()
        layout = ChunkLayout(q.shape[0], q.shape[1], cu_seqlens, chunk_size, q.device)
        out, final = _forward(q, k, v, slopes, scale, state0, layout)
        ctx.save_for_backward(q, k, v, slopes, state0)
        ctx.layout, ctx.scale = layout, scale
        ctx.states_strategy = STATES  # as set when the graph was recorded
        ctx.initial_dtype = None if initial_state is None else initial_state.dtype
        return out, final

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: a clear error, not a silent zero
    def backward(ctx, grad_out, grad_final):
        q, k, v, slopes, state0 = ctx.saved_tensors
        grad_out = torch.zeros_like(v) if grad_out is None else grad_out.to(q.dtype)
        grad_final = None if grad_final is None else grad_final.float().contiguous()
        dq, dk, dv, d_state0 = _backward(q, k, v, grad_out, slopes, ctx.scale, state0, grad_final, ctx.layout,
                                         ctx.states_strategy)
        if state0 is None or not ctx.needs_input_grad[5]:
            d_state0 = None
        else:
            d_state0 = d_state0.to(ctx.initial_dtype)
        return dq, dk, dv, None, None, d_state0, None, None


# --------------------------------------------------------------------------- public entry points


def lightning_attn_triton(q, k, v, slopes, *, scale=1.0, initial_state=None, cu_seqlens=None, chunk_size=CHUNK_SIZE):
    """Lightning attention on the Triton kernels (the contract of ``tnl_kernels.api``).

    q, k: [B, T, H, D]; v: [B, T, H, E]; slopes: fp32 [H]; initial_state: [N, H, D, E];
    cu_seqlens: int32 [N+1] with B == 1. Returns (o [B, T, H, E] in q.dtype,
    final_state [N, H, D, E] fp32), differentiable in q, k, v and initial_state.
    """
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _refuse_interpreted_bf16(q.dtype)  # before autograd records anything
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
