"""Dropless MoE dispatch: grouped GEMM == loop over experts == a dense per-token reference,
forward and backward, including experts that receive no tokens."""

import importlib

import pytest
import torch
from torch.nn import functional as F

from tnl_kernels.moe_dispatch import CPU_GROUPED_MAX_TOKENS, choose_implementation, grouped_mm_supported, moe_dispatch

# The module itself, for monkeypatching (the package re-exports a function of the same name).
moe_dispatch_module = importlib.import_module("tnl_kernels.moe_dispatch")


def dense_reference(hidden, gate_up, down, topk_index, topk_weight):
    """Every token through each of its experts, one at a time."""
    out = torch.zeros_like(hidden)
    for n in range(hidden.shape[0]):
        for slot in range(topk_index.shape[1]):
            e = int(topk_index[n, slot])
            gate, up = (gate_up[e] @ hidden[n]).chunk(2)
            out[n] += topk_weight[n, slot] * (down[e] @ (F.silu(gate) * up))
    return out


def make(num_tokens, experts, hidden, inner, top_k, dtype, unused_expert=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    gate_up = (torch.randn(experts, 2 * inner, hidden, generator=g) * 0.2).to(dtype)
    down = (torch.randn(experts, hidden, inner, generator=g) * 0.2).to(dtype)
    choices = experts - 1 if unused_expert else experts  # the last expert gets no token
    index = torch.stack([torch.randperm(choices, generator=g)[:top_k] for _ in range(num_tokens)])
    weight = torch.softmax(torch.randn(num_tokens, top_k, generator=g), -1).to(dtype)
    return x, gate_up, down, index, weight


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_grouped_mm_equals_loop_forward_and_backward(dtype, atol):
    x, gate_up, down, index, weight = make(37, 5, 32, 16, 2, dtype)
    assert grouped_mm_supported(x, gate_up, down)
    results = []
    for impl in ("grouped_mm", "loop"):
        leaves = [t.clone().requires_grad_() for t in (x, gate_up, down, weight)]
        out = moe_dispatch(leaves[0], leaves[1], leaves[2], index, leaves[3], impl=impl)
        grad = torch.linspace(-1, 1, out.numel()).view_as(out).to(dtype)
        out.backward(grad)
        results.append((out, *[t.grad for t in leaves]))
    for a, b in zip(*results):
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=atol)
    unused_gate_up_grad = results[0][2][-1]
    assert torch.count_nonzero(unused_gate_up_grad) == 0  # an expert with no tokens still gets a (zero) gradient


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this PyTorch has no torch._grouped_mm")
def test_private_grouped_mm_fallback_for_older_pytorch(monkeypatch):
    """PyTorch versions without F.grouped_mm (the GPU machine's 2.11 may be one) have torch._grouped_mm,
    CUDA-only there: it is called the same way, and CPU calls then take the loop."""
    x, gate_up, down, index, weight = make(37, 5, 32, 16, 2, torch.float32)
    expected = moe_dispatch(x, gate_up, down, index, weight, impl="loop")
    monkeypatch.setattr(moe_dispatch_module, "_GROUPED_MM", torch._grouped_mm)
    monkeypatch.setattr(moe_dispatch_module, "_GROUPED_MM_CUDA_ONLY", False)  # as if on CUDA
    torch.testing.assert_close(moe_dispatch(x, gate_up, down, index, weight, impl="grouped_mm"), expected,
                               atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(moe_dispatch_module, "_GROUPED_MM_CUDA_ONLY", True)
    assert not grouped_mm_supported(x, gate_up, down)
    assert choose_implementation(x, gate_up.clone().requires_grad_(), down) == "loop"


def test_dispatch_matches_dense_per_token_reference():
    x, gate_up, down, index, weight = make(23, 4, 16, 8, 2, torch.float64)
    expected = dense_reference(x, gate_up, down, index, weight)
    torch.testing.assert_close(moe_dispatch(x, gate_up, down, index, weight, impl="loop"), expected)


def test_auto_falls_back_to_loop_for_unaligned_sizes():
    x, gate_up, down, index, weight = make(11, 3, 6, 5, 1, torch.float32)
    assert not grouped_mm_supported(x, gate_up, down)
    torch.testing.assert_close(moe_dispatch(x, gate_up, down, index, weight), dense_reference(x, gate_up, down, index, weight),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="grouped_mm does not support"):
        moe_dispatch(x, gate_up, down, index, weight, impl="grouped_mm")


def test_auto_uses_the_loop_for_large_cpu_inference_and_grouped_mm_otherwise():
    x, gate_up, down, index, weight = make(16, 4, 32, 16, 2, torch.float32)
    large = torch.randn(CPU_GROUPED_MAX_TOKENS + 1, x.shape[1])
    assert choose_implementation(x, gate_up, down) == "grouped_mm"  # small inference call
    assert choose_implementation(large, gate_up, down) == "loop"  # nothing requires grad: nothing is recorded
    trainable = gate_up.clone().requires_grad_()
    assert choose_implementation(large, trainable, down) == "grouped_mm"
    with torch.no_grad():
        assert choose_implementation(large, trainable, down) == "loop"
        assert choose_implementation(large, trainable, down, impl="grouped_mm") == "grouped_mm"
        assert choose_implementation(x, trainable, down, impl="loop") == "loop"
    with pytest.raises(ValueError, match="impl must be one of"):
        choose_implementation(x, gate_up, down, impl="scatter")


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_no_tokens_at_all_gives_zero_expert_gradients(impl):
    """A rank whose batch routes no token: the expert weights get zero gradients, never None
    (data-parallel reduction expects every parameter's gradient)."""
    _, gate_up, down, _, _ = make(1, 4, 32, 16, 2, torch.float32)
    x, index, weight = torch.zeros(0, 32), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2)
    gate_up, down = gate_up.requires_grad_(), down.requires_grad_()
    out = moe_dispatch(x, gate_up, down, index, weight, impl=impl)
    out.sum().backward()
    assert out.shape == (0, 32)
    for name, param in (("gate_up", gate_up), ("down", down)):
        assert param.grad is not None, f"{impl}: {name} got no gradient"
        assert torch.count_nonzero(param.grad) == 0


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_int32_expert_indices_route_like_int64(impl):
    x, gate_up, down, index, weight = make(19, 5, 32, 16, 2, torch.float32)
    expected = moe_dispatch(x, gate_up, down, index, weight, impl=impl)
    torch.testing.assert_close(moe_dispatch(x, gate_up, down, index.int(), weight, impl=impl), expected,
                               rtol=0, atol=0)
