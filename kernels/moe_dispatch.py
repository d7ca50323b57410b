"""Dropless MoE dispatch over stacked expert weights (DESIGN.md 3.4).

Token-expert assignments are sorted by expert so each expert runs one dense
matmul on a contiguous slice; nothing is dropped and no capacity factor exists.
Expert weights are stacked (``gate_up [E, 2I, D]`` gate rows first, ``down
[E, D, I]``) so grouped GEMM and expert parallelism can slice them.
"""

import torch
from torch.nn import functional as F


def sort_by_expert(topk_index: torch.Tensor, num_experts: int):
    """Order of the flattened (token, k) assignments grouped by expert, and tokens per expert."""
    flat = topk_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return order, counts


def _swiglu_expert(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


def expert_ffn_loop(x_sorted: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """One SwiGLU per non-empty expert over its contiguous slice of the sorted tokens."""
    outputs, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            outputs.append(_swiglu_expert(x_sorted[start : start + count], gate_up[expert], down[expert]))
            start += count
    if not outputs:
        return x_sorted.new_zeros(0, down.shape[1])
    return torch.cat(outputs, dim=0)


def moe_dispatch(hidden, gate_up, down, topk_index, topk_weight):
    """Weighted sum over each token's top-k experts.

    hidden ``[N, D]``; topk_index/topk_weight ``[N, k]``. Returns ``[N, D]`` in hidden's dtype.
    """
    num_tokens, top_k = topk_index.shape
    order, counts = sort_by_expert(topk_index, gate_up.shape[0])
    token_of_row = order // top_k
    x_sorted = hidden[token_of_row]
    y_sorted = expert_ffn_loop(x_sorted, gate_up, down, counts.tolist())
    y_sorted = y_sorted * topk_weight.reshape(-1)[order].unsqueeze(-1).to(y_sorted.dtype)
    out = hidden.new_zeros(num_tokens, down.shape[1])
    return out.index_add_(0, token_of_row, y_sorted.to(out.dtype))
