"""Partial rotary position embedding (DESIGN.md 3.3).

RoPE (rotate-half convention) is applied to the first ``rotary_dim`` dims of each
softmax head only; the remaining dims pass through unchanged. MiniMax-Text-01
rotates 64 of 128 dims with theta = 1e7.
"""

import torch
from torch import nn


class PartialRotaryEmbedding(nn.Module):
    """cos/sin tables for the rotated part of each head."""

    def __init__(self, rotary_dim: int, theta: float):
        super().__init__()
        self.rotary_dim = rotary_dim
        self.theta = theta

    def inverse_frequencies(self, device) -> torch.Tensor:
        # Computed on the fly in fp32: a buffer would be cast to bf16 by `model.to(bf16)`.
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=device) / self.rotary_dim
        return 1.0 / (self.theta**exponents)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """``position_ids [B, T]`` -> ``(cos, sin)`` of shape ``[B, T, rotary_dim]``."""
        freqs = position_ids.float()[..., None] * self.inverse_frequencies(position_ids.device)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the leading ``cos.shape[-1]`` dims of ``x [B, H, T, d]``; ``cos, sin: [B, T, r]``."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == 0:
        return x
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotated, passthrough = x[..., :rotary_dim], x[..., rotary_dim:]
    rotated = rotated * cos + _rotate_half(rotated) * sin
    return torch.cat((rotated, passthrough), dim=-1) if passthrough.shape[-1] else rotated
