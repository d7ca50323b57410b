"""The operator's specifications agree with each other, and the production chunked path with them.

Oracles: fp64 token recurrence (ground truth), the quadratic form, the chunked form
with autograd, and the production chunked path with its hand-written backward.
Inputs are random at realistic magnitudes, states non-zero, lengths odd.
"""

import pytest
import torch

import tnl_kernels
from tnl_kernels import build_slopes, lightning_attn, lightning_attn_decode
from tnl_kernels import reference as ref

# Relative L2 error bounds per compute dtype (fp32 compute on fp32 inputs; fp64 exact up to rounding).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-6}


def inputs(batch, length, heads, dim_k, dim_v, dtype=torch.float64, seed=0, n_states=None):
    g = torch.Generator().manual_seed(seed)
    # SiLU-activated projections are O(1) and mostly positive: draw in that range.
    q = torch.randn(batch, length, heads, dim_k, generator=g, dtype=dtype) * 0.5 + 0.2
    k = torch.randn(batch, length, heads, dim_k, generator=g, dtype=dtype) * 0.5 + 0.2
    v = torch.randn(batch, length, heads, dim_v, generator=g, dtype=dtype)
    state = torch.randn(n_states or batch, heads, dim_k, dim_v, generator=g, dtype=dtype)
    slopes = build_slopes(heads, 1, 4).to(dtype)
    slopes[0] = 0.0  # one head without decay
    return q, k, v, slopes, state


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


SHAPES = [(1, 1, 2, 8, 8), (2, 7, 3, 16, 24), (1, 63, 2, 48, 16), (2, 65, 2, 16, 48), (1, 200, 2, 96, 32)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_state", [False, True])
def test_reference_forms_agree(shape, with_state):
    q, k, v, s, state = inputs(*shape)
    state = state if with_state else None
    truth, truth_final = ref.lightning_attn_recurrent(q, k, v, s, scale=0.8, initial_state=state)
    for form in (ref.lightning_attn_quadratic, ref.lightning_attn_chunked):
        out, final = form(q, k, v, s, scale=0.8, initial_state=state)
        assert rel(out, truth) < TOLERANCE[torch.float64]
        assert rel(final, truth_final) < TOLERANCE[torch.float64]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("block", [16, 64])
def test_production_path_forward_and_backward_match_fp64_recurrence(shape, block):
    q, k, v, s, state = inputs(*shape, seed=3)
    leaves64 = [t.clone().requires_grad_() for t in (q, k, v, state)]
    out64, final64 = ref.lightning_attn_recurrent(*leaves64[:3], s, scale=0.8, initial_state=leaves64[3])
    g = torch.Generator().manual_seed(9)
    grad_out, grad_final = torch.randn(out64.shape, generator=g, dtype=torch.float64), torch.randn(final64.shape, generator=g, dtype=torch.float64)
    truth = torch.autograd.grad((out64 * grad_out).sum() + (final64 * grad_final).sum(), leaves64)

    leaves32 = [t.detach().float().requires_grad_() for t in (q, k, v, state)]
    out, final = lightning_attn(*leaves32[:3], s.float(), scale=0.8, initial_state=leaves32[3], output_final_state=True,
                                backend="torch", block_size=block)
    assert out.dtype == torch.float32 and final.dtype == torch.float32
    assert rel(out, out64) < TOLERANCE[torch.float32] and rel(final, final64) < TOLERANCE[torch.float32]
    grads = torch.autograd.grad((out * grad_out.float()).sum() + (final * grad_final.float()).sum(), leaves32)
    for name, got, want in zip(("dq", "dk", "dv", "d_state"), grads, truth):
        assert rel(got, want) < 5 * TOLERANCE[torch.float32], name


@pytest.mark.parametrize("with_state, use_final", [(True, True), (False, False), (True, False)])
def test_production_path_across_segments_and_a_tail(monkeypatch, with_state, use_final):
    """Several segments (of 4 blocks of 8), a whole block and a 3-token tail: the backward walks
    them in reverse, handing the state gradient across every boundary."""
    import tnl_kernels.chunked as chunked

    monkeypatch.setattr(chunked, "SEGMENT_TOKENS", 32)
    assert chunked._pieces(107, 8) == [(0, 32, 8), (32, 64, 8), (64, 96, 8), (96, 104, 8), (104, 107, 3)]
    q, k, v, s, state = inputs(2, 107, 3, 16, 24, seed=5)
    state = state if with_state else None
    leaves64 = [t.clone().requires_grad_() for t in (q, k, v)] + ([state.clone().requires_grad_()] if with_state else [])
    out64, final64 = ref.lightning_attn_recurrent(*leaves64[:3], s, scale=0.7, initial_state=leaves64[3] if with_state else None)
    g = torch.Generator().manual_seed(2)
    grad_out, grad_final = torch.randn(out64.shape, generator=g, dtype=torch.float64), torch.randn(final64.shape, generator=g, dtype=torch.float64)
    loss64 = (out64 * grad_out).sum() + ((final64 * grad_final).sum() if use_final else 0)
    truth = torch.autograd.grad(loss64, leaves64)
    leaves32 = [t.detach().float().requires_grad_() for t in leaves64]
    out, final = lightning_attn(*leaves32[:3], s.float(), scale=0.7, initial_state=leaves32[3] if with_state else None,
                                output_final_state=True, backend="torch", block_size=8)
    assert rel(out, out64) < TOLERANCE[torch.float32] and rel(final, final64) < TOLERANCE[torch.float32]
    loss = (out * grad_out.float()).sum() + ((final * grad_final.float()).sum() if use_final else 0)
    grads = torch.autograd.grad(loss, leaves32)
    for name, got, want in zip(("dq", "dk", "dv", "d_state"), grads, truth):
        assert rel(got, want) < 5 * TOLERANCE[torch.float32], name


def test_reference_chunked_form_gradients_match_recurrence():
    q, k, v, s, state = inputs(2, 37, 2, 16, 16, seed=4)
    grads = []
    for form in (ref.lightning_attn_recurrent, ref.lightning_attn_chunked):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, state)]
        out, final = form(*leaves[:3], s, initial_state=leaves[3])
        grads.append(torch.autograd.grad(out.square().sum() + final.sum(), leaves))
    for a, b in zip(*grads):
        assert rel(a, b) < TOLERANCE[torch.float64]


def test_inter_block_exponent_is_lambda_to_the_i_plus_one():
    """The peer-project bug (lambda^i on the inter term) must fail: a state-only input isolates that term."""
    q, k, v, s, state = inputs(1, 70, 2, 8, 8, seed=5)
    k = torch.zeros_like(k)  # no new tokens enter the state: o_t = q_t * lambda^{t+1} * S0
    out, _ = lightning_attn(q.float(), k.float(), v.float(), s.float(), initial_state=state.float(), backend="torch", block_size=16)
    t = torch.arange(70, dtype=torch.float64)
    decay = torch.exp(-s.view(1, 1, -1, 1) * (t + 1).view(1, -1, 1, 1))
    expected = torch.einsum("bthd,bhde->bthe", q * decay, state)
    assert rel(out, expected) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_precision_inputs_keep_fp32_state(dtype, tol):
    q, k, v, s, state = inputs(2, 90, 2, 32, 32, seed=6)
    out, final = lightning_attn(q.to(dtype), k.to(dtype), v.to(dtype), s.float(), initial_state=state.float(),
                                output_final_state=True, backend="torch")
    truth, truth_final = ref.lightning_attn_recurrent(q.to(dtype).double(), k.to(dtype).double(), v.to(dtype).double(), s, initial_state=state)
    assert out.dtype == dtype and final.dtype == torch.float32
    assert rel(out, truth) < tol and rel(final, truth_final) < 1e-5


def test_varlen_equals_per_sequence_runs():
    lengths = [5, 1, 64, 30]
    q, k, v, s, state = inputs(1, sum(lengths), 2, 16, 12, seed=7, n_states=len(lengths))
    cu = torch.tensor([0, 5, 6, 70, 100], dtype=torch.int32)
    leaves = [t.float().requires_grad_() for t in (q, k, v, state)]
    out, final = lightning_attn(*leaves[:3], s.float(), initial_state=leaves[3], cu_seqlens=cu, output_final_state=True,
                                backend="torch", block_size=16)
    (out.sum() + final.square().sum()).backward()
    for n in range(len(lengths)):
        a, b = int(cu[n]), int(cu[n + 1])
        seq = [t.float()[:, a:b].clone().requires_grad_() for t in (q, k, v)] + [state.float()[n : n + 1].clone().requires_grad_()]
        o, f = lightning_attn(*seq[:3], s.float(), initial_state=seq[3], output_final_state=True, backend="torch", block_size=16)
        (o.sum() + f.square().sum()).backward()
        torch.testing.assert_close(out[:, a:b], o, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(final[n : n + 1], f, atol=1e-5, rtol=1e-5)
        for whole, piece in zip(leaves[:3], seq[:3]):
            torch.testing.assert_close(whole.grad[:, a:b], piece.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(leaves[3].grad[n : n + 1], seq[3].grad, atol=1e-5, rtol=1e-5)


def test_decode_steps_match_recurrence_outputs_and_state():
    q, k, v, s, state = inputs(3, 50, 2, 16, 8, seed=8)
    truth, truth_final = ref.lightning_attn_recurrent(q, k, v, s, scale=0.5, initial_state=state)
    running = state.float().clone()
    outs = [lightning_attn_decode(q[:, t].float(), k[:, t].float(), v[:, t].float(), s.float(), running, scale=0.5)
            for t in range(50)]
    assert rel(torch.stack(outs, 1), truth) < TOLERANCE[torch.float32]
    assert rel(running, truth_final) < TOLERANCE[torch.float32]


def test_prefill_then_decode_equals_full_forward():
    q, k, v, s, _ = inputs(2, 40, 2, 16, 16, seed=10)
    q, k, v, s = q.float(), k.float(), v.float(), s.float()
    full, _ = lightning_attn(q, k, v, s, backend="torch")
    head, state = lightning_attn(q[:, :23], k[:, :23], v[:, :23], s, output_final_state=True, backend="torch")
    tail = [lightning_attn_decode(q[:, t], k[:, t], v[:, t], s, state) for t in range(23, 40)]
    torch.testing.assert_close(torch.cat([head, torch.stack(tail, 1)], 1), full, atol=1e-5, rtol=1e-5)


def test_slopes_follow_the_alibi_construction():
    assert tnl_kernels.alibi_base_slopes(8) == pytest.approx([2 ** -(i + 1) for i in range(8)])
    assert tnl_kernels.alibi_base_slopes(12) == pytest.approx(
        [2 ** -(8 * (h + 1) / 8) for h in range(8)] + [2 ** -(8 * (h + 1) / 16) for h in range(16)][0::2][:4])
    torch.testing.assert_close(build_slopes(8, 0, 1), torch.tensor(tnl_kernels.alibi_base_slopes(8)) * (1 + 1e-5))
    torch.testing.assert_close(build_slopes(8, 3, 4), torch.tensor(tnl_kernels.alibi_base_slopes(8)) * 1e-5)
    assert build_slopes(8, 0, 4).dtype == torch.float32


@pytest.mark.parametrize("call, message", [
    (lambda q, k, v, s: lightning_attn(q, k[:, :-1], v, s), "same shape"),
    (lambda q, k, v, s: lightning_attn(q, k, v, s[:1]), "slopes"),
    (lambda q, k, v, s: lightning_attn(q, k, v, s, initial_state=torch.zeros(1, 2, 3, 3)), "initial_state"),
    (lambda q, k, v, s: lightning_attn(q, k, v, s, cu_seqlens=torch.tensor([0, 3], dtype=torch.int32)), "cu_seqlens"),
    (lambda q, k, v, s: lightning_attn(q, k, v, s, backend="cuda"), "backend"),
])
def test_bad_arguments_raise_clear_errors(call, message):
    q, k, v, s, _ = inputs(2, 6, 2, 8, 8)
    with pytest.raises(ValueError, match=message):
        call(q.float(), k.float(), v.float(), s.float())


def test_torch_path_refuses_double_backward():
    q, k, v, s, _ = inputs(1, 70, 2, 8, 8, dtype=torch.float32)
    q.requires_grad_()
    out, _ = lightning_attn(q, k, v, s, backend="torch", block_size=32)
    (grad_q,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        grad_q.square().sum().backward()


def test_empty_input_returns_a_state_that_is_not_the_initial_one():
    """T = 0: the final state equals the initial state but is a new tensor, so an in-place decode
    on it cannot write into the caller's initial state."""
    q, k, v, s, state = inputs(2, 0, 2, 8, 8, dtype=torch.float32)
    _, final = lightning_attn(q, k, v, s, initial_state=state, output_final_state=True, backend="torch")
    assert torch.equal(final, state) and final.data_ptr() != state.data_ptr()
    before = state.clone()
    lightning_attn_decode(q.new_ones(2, 2, 8), q.new_ones(2, 2, 8), q.new_ones(2, 2, 8), s, final, backend="torch")
    assert torch.equal(state, before)
