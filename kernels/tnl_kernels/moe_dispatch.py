"""Dropless MoE dispatch over stacked expert weights (DESIGN.md 3.4).

Token-expert assignments are sorted by expert so each expert runs one dense
matmul on a contiguous slice; nothing is dropped and no capacity factor exists.
The expert matmuls run as one grouped GEMM (``torch.nn.functional.grouped_mm``)
or as a loop over the non-empty experts; both give the same result. ``"auto"``
picks per call (see :func:`choose_implementation`): grouped GEMM on CUDA, whenever
autograd records, and for CPU inference on up to ``CPU_GROUPED_MAX_TOKENS`` tokens;
the loop for larger CPU inference calls (long prefill chunks).
Expert weights are stacked (``gate_up [E, 2I, D]`` gate rows first, ``down
[E, D, I]``) so grouped GEMM and expert parallelism can slice them.
"""

import torch
from torch.nn import functional as F

IMPLEMENTATIONS = ("auto", "grouped_mm", "loop")
# The public op, or on older PyTorch (before ``F.grouped_mm`` existed) the private one it wraps,
# which those versions implement on CUDA only.
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_MM_CUDA_ONLY = not hasattr(F, "grouped_mm")
# CPU inference calls up to this many tokens use the grouped GEMM, larger ones the loop.
CPU_GROUPED_MAX_TOKENS = 1024


def sort_by_expert(topk_index: torch.Tensor, num_experts: int):
    """Order of the flattened (token, k) assignments grouped by expert, and tokens per expert."""
    flat = topk_index.reshape(-1).long()  # scatter_add_ needs int64 indices; routers may give int32
    order = torch.argsort(flat, stable=True)
    # A scatter-add rather than bincount: its output shape does not depend on the data, so
    # torch.compile keeps it in the graph.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    return order, counts


def _records_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _expert_rows(counts: list[int]):
    """``(expert, slice of its rows)`` for every expert that got tokens."""
    start = 0
    for expert, count in enumerate(counts):
        if count:
            yield expert, slice(start, start + count)
            start += count


def _swiglu_expert(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def expert_ffn_loop(x_sorted: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """One SwiGLU per non-empty expert over its contiguous slice of the sorted tokens.

    Without autograd each expert writes straight into its rows of one result (holding every
    expert's output for a concatenation cost 128 MiB more at 32K tokens, top-2, D = 512).
    """
    if _records_grad(x_sorted, gate_up, down):
        outputs = [_swiglu_expert(x_sorted[rows], gate_up[e], down[e]) for e, rows in _expert_rows(counts)]
        if not outputs:
            # No tokens at all (an empty batch on one rank): still run an expert on the 0 rows, so the
            # expert weights get zero gradients as with grouped_mm, not None (DDP/ZeRO reduce them).
            return _swiglu_expert(x_sorted, gate_up[0], down[0])
        return torch.cat(outputs, dim=0)
    result = x_sorted.new_empty(x_sorted.shape[0], down.shape[1])
    for expert, rows in _expert_rows(counts):
        gate, up = F.linear(x_sorted[rows], gate_up[expert]).chunk(2, dim=-1)
        torch.mm(F.silu(gate).mul_(up), down[expert].t(), out=result[rows])
    return result


def grouped_mm_supported(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """grouped_mm needs matching dtypes it implements and rows aligned to 16 bytes."""
    if _GROUPED_MM is None or not (x.dtype == gate_up.dtype == down.dtype):
        return False
    if x.device.type == "cpu" and _GROUPED_MM_CUDA_ONLY:
        return False
    if x.device.type == "cpu":
        dtype_ok = x.dtype in (torch.float32, torch.bfloat16)
    else:
        dtype_ok = x.dtype == torch.bfloat16 and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9
    alignment = 16 // x.element_size()
    dims_aligned = all(dim % alignment == 0 for dim in (down.shape[1], down.shape[2]))
    return dtype_ok and dims_aligned


def expert_ffn_grouped(x_sorted: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """All experts in two grouped GEMMs over the expert-sorted tokens (no host sync on counts)."""
    offsets = counts.cumsum(0).to(torch.int32)
    gate, up = _GROUPED_MM(x_sorted, gate_up.transpose(-1, -2), offs=offsets).chunk(2, dim=-1)
    hidden = (F.silu(gate) * up).contiguous()
    return _GROUPED_MM(hidden, down.transpose(-1, -2), offs=offsets)


# torch.compile traces grouped_mm with its meta function, which accepts bf16 only, although the
# CPU kernel also computes fp32: other dtypes run the same grouped GEMM outside the graph.
_expert_ffn_grouped_eager = torch.compiler.disable(expert_ffn_grouped)


def expert_ffn_gathered(x_sorted: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                        expert_of_row: torch.Tensor) -> torch.Tensor:
    """Each row times its own expert's weights, gathered: static shapes, no grouped GEMM.

    For ``torch.export`` in fp32/fp16, where grouped_mm cannot be traced and nothing may run outside
    the graph. It holds one weight copy per row (rows x expert size), so it is for export, not speed.
    """
    gate, up = torch.bmm(gate_up[expert_of_row], x_sorted.unsqueeze(-1)).squeeze(-1).chunk(2, dim=-1)
    return torch.bmm(down[expert_of_row], (F.silu(gate) * up).unsqueeze(-1)).squeeze(-1)


def choose_implementation(hidden, gate_up, down, impl: str = "auto") -> str:
    """``"grouped_mm"`` or ``"loop"`` for this call.

    Measured by ``benchmarks/bench_vs_minimax.py`` (2 cores, 8 experts top-2, D = I = 512,
    fp32, inference, two runs): the grouped GEMM takes 13-20% less time at 16 and 256 tokens
    (1.07-1.27 vs 1.17-1.60 ms at 16), ties with the loop at 1 token (0.35-0.43 ms either way,
    within the noise) and at 2048, and takes 3-5% more at 8192, where the loop also holds less
    (it writes each expert's rows in place). With autograd the grouped GEMM
    wins at every size (its backward is one op, the loop's a graph per expert: 4.3 vs 8.1 ms at
    1 token, 345 vs 401 ms at 8192), and on CUDA it also avoids the host sync on the counts.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    supported = grouped_mm_supported(hidden, gate_up, down)
    if impl == "grouped_mm" and not supported:
        raise ValueError(f"grouped_mm does not support {hidden.dtype} on {hidden.device} with these expert sizes")
    if impl != "auto":
        return impl
    prefer_grouped = (hidden.device.type != "cpu" or _records_grad(hidden, gate_up, down)
                      or hidden.shape[0] <= CPU_GROUPED_MAX_TOKENS)
    return "grouped_mm" if supported and prefer_grouped else "loop"


def moe_dispatch(hidden, gate_up, down, topk_index, topk_weight, impl: str = "auto"):
    """Weighted sum over each token's top-k experts.

    hidden ``[N, D]``; topk_index/topk_weight ``[N, k]``. Returns ``[N, D]`` in hidden's dtype.
    ``impl``: ``"grouped_mm"``, ``"loop"`` or ``"auto"`` (:func:`choose_implementation`).
    """
    use_grouped = choose_implementation(hidden, gate_up, down, impl) == "grouped_mm"
    num_tokens, top_k = topk_index.shape
    order, counts = sort_by_expert(topk_index, gate_up.shape[0])
    token_of_row = order // top_k
    x_sorted = hidden[token_of_row]
    if torch.compiler.is_exporting() and (x_sorted.dtype != torch.bfloat16 or not use_grouped):
        y_sorted = expert_ffn_gathered(x_sorted, gate_up, down, topk_index.reshape(-1)[order])
    elif use_grouped:
        traceable = not torch.compiler.is_compiling() or x_sorted.dtype == torch.bfloat16
        y_sorted = (expert_ffn_grouped if traceable else _expert_ffn_grouped_eager)(x_sorted, gate_up, down, counts)
    else:
        y_sorted = expert_ffn_loop(x_sorted, gate_up, down, counts.tolist())
    weights = topk_weight.reshape(-1)[order].unsqueeze(-1).to(y_sorted.dtype)
    y_sorted = y_sorted * weights if _records_grad(y_sorted, weights) else y_sorted.mul_(weights)
    out = hidden.new_zeros(num_tokens, down.shape[1])
    return out.index_add_(0, token_of_row, y_sorted.to(out.dtype))
