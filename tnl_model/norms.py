"""RMSNorm variants used by TNL layers (DESIGN.md 3.2, 3.5)."""

import torch
from torch import nn


class _RMSNormFunction(torch.autograd.Function):
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` with a hand-written backward.

    Autograd through pow / mean / rsqrt / mul keeps four activation-sized tensors and runs a
    dozen passes over them; this keeps x and one scalar per row and runs about four.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        inv_rms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, weight, inv_rms)
        return weight * (xf * inv_rms).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, inv_rms = ctx.saved_tensors
        normed = x.float() * inv_rms
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad.float() * normed.to(x.dtype).float()).reshape(-1, normed.shape[-1]).sum(0)
            grad_weight = grad_weight.to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # d/dx of x * r with r = rsqrt(mean(x^2) + eps): r * (g - normed * mean(g * normed))
            g = grad.float() * weight.float()
            grad_x = (g - normed * (g * normed).mean(-1, keepdim=True)).mul_(inv_rms).to(x.dtype)
        return grad_x, grad_weight, None


class RMSNorm(nn.Module):
    """Weighted RMSNorm computed in fp32 and cast back (the MiniMax / T5 form)."""

    def __init__(self, size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)

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
