"""RMSNorm variants used by TNL layers (DESIGN.md 3.2, 3.5)."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Weighted RMSNorm computed in fp32 and cast back (the MiniMax / T5 form)."""

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class SimpleRMSNorm(nn.Module):
    """SRMSNorm of TransNormerLLM: RMS normalisation without a learned weight."""

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.size, self.eps = size, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.size}, eps={self.eps}, no weight"
