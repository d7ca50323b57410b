"""NaN isolation in the lightning operator: a NaN (or inf) in k or v at position p makes outputs at
p and after it non-finite, as the token recurrence does, and leaves every output before p, and every
other packed sequence, exactly as without it. The chunked forms used to multiply masked scores by
the NaN (NaN * 0 = NaN), poisoning the whole block, so one bad document in a packed row reached the
others. Gradients with respect to earlier positions stay finite and unchanged when the loss only
reads earlier outputs.

Paths: the chunked PyTorch operator (``backend="torch"``), the reference chunked form, and the
Triton kernels (under ``TRITON_INTERPRET=1`` on CPU, both forward strategies: the sequential one
isolates a bad value inside its chunk too, see ``_sequential_forward_kernel``)."""

import pytest
import torch

from tnl_kernels import lightning_attn, triton_backend
from tnl_kernels.reference import lightning_attn_chunked, lightning_attn_recurrent

# the Triton interpreter multiplies with numpy, which warns when a product is NaN
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

T, H, D, E = 150, 2, 16, 24
BLOCK = 32  # torch path: blocks 0-31, 32-63, ... and a 22-token tail
TOL = dict(atol=2e-5, rtol=2e-5)
BAD = {"nan_k": ("k", float("nan")), "nan_v": ("v", float("nan")), "inf_v": ("v", float("inf"))}


def _inputs(seed=0, length=T):
    generator = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, length, H, D, generator=generator) * 0.5 for _ in range(2))
    v = torch.randn(1, length, H, E, generator=generator) * 0.5
    state = torch.randn(1, H, D, E, generator=generator) * 0.5
    slopes = torch.tensor([0.05, 0.3])
    return q, k, v, state, slopes


def _poison(q, k, v, which, value, position, head=0):
    tensors = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
    tensors[which][0, position, head, 3] = value
    return tensors["q"], tensors["k"], tensors["v"]


def _torch(q, k, v, slopes, state=None, cu_seqlens=None):
    return lightning_attn(q, k, v, slopes, initial_state=state, cu_seqlens=cu_seqlens, output_final_state=True,
                          backend="torch", block_size=BLOCK)[0]


def _reference(q, k, v, slopes, state=None, cu_seqlens=None):
    assert cu_seqlens is None
    return lightning_attn_chunked(q, k, v, slopes, initial_state=state, block_size=BLOCK)[0]


def _triton(strategy):
    def run(q, k, v, slopes, state=None, cu_seqlens=None):
        pytest.importorskip("triton")
        saved = triton_backend.FORWARD, triton_backend.POISON_OUTPUTS
        triton_backend.FORWARD, triton_backend.POISON_OUTPUTS = strategy, True  # unwritten outputs would be NaN
        try:
            return lightning_attn(q, k, v, slopes, initial_state=state, cu_seqlens=cu_seqlens, output_final_state=True,
                                  backend="triton")[0]
        finally:
            triton_backend.FORWARD, triton_backend.POISON_OUTPUTS = saved
    return run


PATHS = {"torch": _torch, "reference_chunked": _reference, "triton_sequential": _triton("sequential"),
         "triton_split": _triton("split")}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("position", [5, 70, 140])  # first block, mid-sequence, the short tail
def test_a_nan_input_reaches_no_earlier_output(path, bad, position):
    q, k, v, state, slopes = _inputs()
    run = PATHS[path]
    clean = run(q, k, v, slopes, state)
    q2, k2, v2 = _poison(q, k, v, *BAD[bad], position)
    out = run(q2, k2, v2, slopes, state)
    assert torch.isfinite(out[:, :position]).all(), (
        f"a {bad} at position {position} reached positions "
        f"{(~torch.isfinite(out[0, :position])).flatten(1).any(-1).nonzero().flatten().tolist()}")
    torch.testing.assert_close(out[:, :position], clean[:, :position], **TOL)
    # from the bad position on: non-finite exactly where the token recurrence (fp64) is
    expected = lightning_attn_recurrent(q2.double(), k2.double(), v2.double(), slopes, initial_state=state.double())[0]
    assert torch.equal(~torch.isfinite(out), ~torch.isfinite(expected))
    assert not torch.isfinite(out[0, position, 0]).all()


@pytest.mark.parametrize("path", ["torch", "triton_sequential", "triton_split"])
def test_a_bad_document_in_a_packed_row_leaves_the_others_alone(path):
    lengths = [40, 70, 40]
    q, k, v, _, slopes = _inputs(seed=1, length=sum(lengths))
    cu_seqlens = torch.tensor([0, 40, 110, 150], dtype=torch.int32)
    run = PATHS[path]
    clean = run(q, k, v, slopes, cu_seqlens=cu_seqlens)
    q2, k2, v2 = _poison(q, k, v, "v", float("nan"), 75)  # in the middle document, in a block that starts at 64
    out = run(q2, k2, v2, slopes, cu_seqlens=cu_seqlens)
    finite = torch.isfinite(out[0]).flatten(1).all(-1)
    # the bad document before the bad token (its chunk included) and the documents around it
    assert finite[:75].all() and finite[110:].all(), (~finite).nonzero().flatten().tolist()
    torch.testing.assert_close(out[:, :75], clean[:, :75], **TOL)
    torch.testing.assert_close(out[:, 110:], clean[:, 110:], **TOL)


def _grads(run_path, q, k, v, state, slopes, position):
    leaves = [x.clone().requires_grad_() for x in (q, k, v, state)]
    out = run_path(*leaves[:3], slopes, leaves[3])
    weights = torch.randn(out[:, :position].shape, generator=torch.Generator().manual_seed(7))
    (out[:, :position] * weights).sum().backward()  # the loss reads only outputs before the bad position
    return [x.grad for x in leaves]


@pytest.mark.parametrize("path", ["torch", "triton_split"])
@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("position", [70, 140])
def test_gradients_at_earlier_positions_stay_finite(path, bad, position):
    q, k, v, state, slopes = _inputs(seed=2)
    clean = _grads(PATHS[path], q, k, v, state, slopes, position)
    q2, k2, v2 = _poison(q, k, v, *BAD[bad], position)
    grads = _grads(PATHS[path], q2, k2, v2, state, slopes, position)
    for name, got, want in zip("qkv", grads[:3], clean[:3]):
        assert torch.isfinite(got[:, :position]).all(), f"d{name} before position {position} is not finite"
        torch.testing.assert_close(got[:, :position], want[:, :position], **TOL)
    torch.testing.assert_close(grads[3], clean[3], **TOL)  # d(initial state)
