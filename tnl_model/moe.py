"""Feed-forward blocks (DESIGN.md 3.4): the routed MoE block and the dense SwiGLU FFN.

Router ``gate [E, D]`` in fp32 -> softmax -> top-k -> renormalised weights. Expert
weights are stacked parameters, so every rank and every step touches every
expert's parameters (ZeRO never waits on an expert that got no tokens).
"""

import torch
from torch import nn
from torch.nn import functional as F

from tnl_kernels import moe_dispatch

from .sequence_parallel import group_sum


class TNLRouter(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, jitter_noise: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.top_k = top_k
        self.jitter_noise = jitter_noise

    def forward(self, x: torch.Tensor):
        """x ``[N, D]`` -> (router logits ``[N, E]`` fp32, top-k weights ``[N, k]`` fp32, top-k indices)."""
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        logits = F.linear(x.float(), self.weight.float())
        probs = torch.softmax(logits, dim=-1)
        topk_weight, topk_index = torch.topk(probs, self.top_k, dim=-1)
        topk_weight = topk_weight / topk_weight.sum(dim=-1, keepdim=True)
        return logits, topk_weight, topk_index


class TNLExperts(nn.Module):
    """Stacked SwiGLU experts: ``gate_up_proj [E, 2I, D]`` (gate rows first), ``down_proj [E, D, I]``."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x, topk_index, topk_weight):
        return moe_dispatch(x, self.gate_up_proj, self.down_proj, topk_index, topk_weight)


class TNLDenseMLP(nn.Module):
    """One SwiGLU FFN: ``down(SiLU(gate x) * up x)``."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)), None


class TNLSparseMoeBlock(nn.Module):
    """Routed experts, plus an optional shared expert mixed by ``sigmoid(x w_coef)``."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.gate = TNLRouter(config.hidden_size, config.num_local_experts, config.num_experts_per_tok,
                              config.router_jitter_noise)
        self.experts = TNLExperts(config.num_local_experts, config.hidden_size, config.intermediate_size)
        self.shared_mlp = None
        if config.shared_intermediate_size > 0:
            self.shared_mlp = TNLDenseMLP(config.hidden_size, config.shared_intermediate_size)
            self.coefficient = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor):
        """x ``[B, T, D]`` -> (output ``[B, T, D]``, router logits ``[B*T, E]``)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits, topk_weight, topk_index = self.gate(flat)
        out = self.experts(flat, topk_index, topk_weight)
        if self.shared_mlp is not None:
            shared, _ = self.shared_mlp(flat)
            mix = torch.sigmoid(F.linear(flat.float(), self.coefficient.weight.float())).to(out.dtype)
            out = out * (1 - mix) + shared * mix
        return out.reshape(shape), logits


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int, token_mask: torch.Tensor | None,
                        group=None) -> torch.Tensor:
    """Switch-style auxiliary loss ``E * sum_e f_e P_e`` averaged over MoE layers.

    f_e: fraction of (token, k) assignments routed to e, P_e: mean router probability of e,
    both over non-padding tokens only. With a sequence-parallel ``group`` both are over the tokens of
    every shard, and this rank returns its share (the loss divided by the group size): the shares add up
    to the unsharded loss, and so do the gradients (the probability sums are reduced differentiably).
    """
    losses = []
    weights = None if token_mask is None else token_mask.reshape(-1).float()
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        num_experts = probs.shape[-1]
        chosen = torch.topk(probs, top_k, dim=-1).indices
        assigned = F.one_hot(chosen, num_experts).sum(dim=1).float()  # [N, E]
        if group is None and weights is None:  # the unsharded, unpadded form, kept bit for bit
            f, p = assigned.mean(dim=0), probs.mean(dim=0)
        else:
            if weights is not None:
                assigned, probs = assigned * weights[:, None], probs * weights[:, None]
            count = probs.new_tensor(float(probs.shape[0])) if weights is None else weights.sum()
            total = group_sum(count, group).clamp(min=1.0)
            f = group_sum(assigned.sum(0), group) / total
            p = group_sum(probs.sum(0), group, differentiable=True) / total
        losses.append(num_experts * (f * p).sum())
    loss = torch.stack(losses).mean()
    return loss if group is None else loss / torch.distributed.get_world_size(group)


def router_z_loss(router_logits: list[torch.Tensor], token_mask: torch.Tensor | None, group=None) -> torch.Tensor:
    """Mean squared log-partition of the router logits (ST-MoE), averaged over MoE layers; with a
    sequence-parallel ``group``, this shard's sum over the tokens of all shards (its share)."""
    losses = []
    weights = None if token_mask is None else token_mask.reshape(-1).float()
    for logits in router_logits:
        z = torch.logsumexp(logits.float(), dim=-1).pow(2)
        if group is None:
            losses.append(z.mean() if weights is None else (z * weights).sum() / weights.sum().clamp(min=1.0))
            continue
        if weights is not None:
            z = z * weights
        count = z.new_tensor(float(z.shape[0])) if weights is None else weights.sum()
        losses.append(z.sum() / group_sum(count, group).clamp(min=1.0))
    return torch.stack(losses).mean()
