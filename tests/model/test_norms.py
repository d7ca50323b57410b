"""RMSNorm's hand-written backward equals autograd through the plain formula (run in fp64 on the
same fp32-computed normalisation), for fp32 and bf16 inputs."""

import pytest
import torch

from tnl_model.norms import RMSNorm


def _plain(x, weight, eps):
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", [(3, 5, 37), (1, 1, 8), (2, 64)])
def test_rmsnorm_backward_matches_autograd(dtype, tol, shape):
    generator = torch.Generator().manual_seed(shape[-1])
    norm = RMSNorm(shape[-1], eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=generator))
    x = (torch.randn(shape, generator=generator) * 3 + 0.5).to(dtype).requires_grad_()
    grad = torch.randn(shape, generator=generator).to(dtype)
    out = norm(x)
    dx, dw = torch.autograd.grad(out, (x, norm.weight), grad)
    x_ref, w_ref = x.detach().clone().requires_grad_(), norm.weight.detach().clone().requires_grad_()
    out_ref = _plain(x_ref, w_ref, 1e-5)
    dx_ref, dw_ref = torch.autograd.grad(out_ref, (x_ref, w_ref), grad)
    rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())  # noqa: E731
    assert torch.equal(out, out_ref)  # the forward is the same formula, bit for bit
    assert rel(dx, dx_ref) < tol and rel(dw, dw_ref) < tol
    assert dx.dtype == dtype and dw.dtype == dtype
