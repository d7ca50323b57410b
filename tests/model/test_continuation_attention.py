"""``attention_after_prefix``: queries at positions ``past ..`` over every earlier key and causally over
their own block, by two CPU flash-kernel calls merged by log-sum-exp, with an exact backward (each part's
flash backward given the merged output and log-sum-exp) and linear activation memory.

References: ``F.scaled_dot_product_attention`` with the explicit causal-after-prefix mask, and autograd
through it. The scores are made sharp (q and k scaled by 2) so that the scores' share of the gradient,
which a backward through the merge alone would lose, is large."""

import itertools

import pytest
import torch
from torch.nn import functional as F

from tnl_model.continuation_attention import attention_after_prefix

PASTS = (0, 1, 7, 64)
LENGTHS = (1, 5, 33)
HEADS = ((2, 2), (4, 2), (6, 1))  # (query heads, key/value heads)
DIMS_BATCHES = ((16, 1), (16, 2), (64, 1), (64, 2))

#: largest error allowed, as a fraction of max(1, largest reference magnitude). fp32: worst seen 2.8e-6.
#: bf16 is compared with an fp64 reference of the same bf16 inputs: bf16 SDPA itself is up to 1.6e-2 off
#: there (dk), and so is this function; a lost part of the gradient is ~10x that
TOL = {torch.float32: 1e-5, torch.bfloat16: 2.5e-2}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These shapes are tiny: one thread is fastest, and far faster than two on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _visible(length, past):
    """Boolean ``[T, past+T]``: query ``i`` (at position ``past + i``) sees keys ``0 .. past + i``."""
    return torch.ones(length, past + length, dtype=torch.bool).tril(diagonal=past)


def _reference(q, k, v, past, scaling):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_visible(q.shape[2], past), scale=scaling,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _inputs(batch, heads, kv_heads, length, past, dim, dtype, seed, token_major=False):
    g = torch.Generator().manual_seed(seed)
    if token_major:  # head-major views of token-major projections, as the attention layer makes them
        q = torch.randn(batch, length, heads, dim, generator=g).transpose(1, 2) * 2
        k = torch.randn(batch, past + length, kv_heads, dim, generator=g).transpose(1, 2) * 2
        v = torch.randn(batch, past + length, kv_heads, dim, generator=g).transpose(1, 2)
    else:
        q = torch.randn(batch, heads, length, dim, generator=g) * 2
        k = torch.randn(batch, kv_heads, past + length, dim, generator=g) * 2
        v = torch.randn(batch, kv_heads, past + length, dim, generator=g)
    grad_out = torch.randn(batch, heads, length, dim, generator=g)
    return [t.to(dtype).requires_grad_(True) for t in (q, k, v)], grad_out.to(dtype)


def _error(got, expected):
    got, expected = got.detach().double(), expected.detach().double()
    return float((got - expected).abs().max() / expected.abs().max().clamp(min=1))


def _check(past, length, heads, kv_heads, dim, batch, dtype, token_major=False):
    seed = past * 1000 + length * 31 + heads * 7 + kv_heads + dim + batch
    (q, k, v), grad_out = _inputs(batch, heads, kv_heads, length, past, dim, dtype, seed, token_major)
    scaling = dim ** -0.5
    out = attention_after_prefix(q, k, v, past, scaling)
    assert out.shape == q.shape and out.dtype == dtype
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    if dtype == torch.float32:
        ref_in = (q, k, v)
    else:
        ref_in = tuple(t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = _reference(*ref_in, past, scaling)
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out.to(ref.dtype))

    for name, got, expected in zip(("output", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert got.shape == expected.shape and got.dtype == dtype, name
        error = _error(got, expected)
        assert error <= TOL[dtype], f"{name}: error {error:.2e} > {TOL[dtype]:.0e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads, kv_heads", HEADS, ids=[f"H{h}kv{kv}" for h, kv in HEADS])
@pytest.mark.parametrize("past, length", list(itertools.product(PASTS, LENGTHS)))
def test_output_and_gradients_equal_masked_sdpa(past, length, heads, kv_heads, dtype):
    for dim, batch in DIMS_BATCHES:
        _check(past, length, heads, kv_heads, dim, batch, dtype)


@pytest.mark.parametrize("past, length", [(0, 5), (7, 5), (64, 33)])
def test_head_major_views_of_token_major_tensors(past, length):
    _check(past, length, 4, 2, 16, 2, torch.float32, token_major=True)


@pytest.mark.parametrize("past, length, heads, kv_heads", [(0, 4, 2, 2), (3, 1, 2, 1), (5, 4, 4, 2), (6, 3, 2, 2)])
def test_gradcheck_float64(past, length, heads, kv_heads):
    """The CPU flash kernel (forward and backward) accepts float64, so the backward is checked against
    finite differences too."""
    (q, k, v), _ = _inputs(1, heads, kv_heads, length, past, 8, torch.float64, seed=past + length + heads)
    assert torch.autograd.gradcheck(lambda q, k, v: attention_after_prefix(q, k, v, past, 0.3), (q, k, v))


def _saved(fn):
    """Shapes and bytes of the tensors autograd saves for backward while ``fn`` runs."""
    saved = []

    def pack(t):
        saved.append((t.numel(), t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def test_saved_tensors_are_linear_in_the_length():
    """past = T = 2048, d = 64, H = 4: the forward saves q, k, v, the output and the log-sum-exp
    (12.0 MiB), no ``[T, past+T]`` tensor, while SDPA with the explicit mask saves the mask as an fp32
    ``[T, past+T]`` copy too (44.0 MiB); and half the length saves exactly half the bytes."""
    heads, dim = 4, 64

    def saved_by(length, fn):
        (q, k, v), _ = _inputs(1, heads, heads, length, length, dim, torch.float32, seed=length)
        return _saved(lambda: fn(q, k, v, length, dim ** -0.5))

    ours = saved_by(2048, attention_after_prefix)
    reference = saved_by(2048, _reference)
    quadratic = 2048 * 2048  # past * T elements
    assert max(n for n, _ in ours) < quadratic, ours
    assert max(n for n, _ in reference) >= quadratic, reference  # the contrast: the reference is quadratic
    ours_bytes, reference_bytes = sum(b for _, b in ours), sum(b for _, b in reference)
    # q, out: H*T*d fp32; k, v: H*(past+T)*d fp32; lse: H*T fp32
    assert ours_bytes == 4 * (2 * heads * 2048 * dim + 2 * heads * 4096 * dim + heads * 2048) == 12_615_680
    assert reference_bytes >= ours_bytes + 4 * quadratic * 2  # + the fp32 [T, past+T] mask
    assert sum(b for _, b in saved_by(1024, attention_after_prefix)) * 2 == ours_bytes


def test_rejects_mismatched_shapes():
    (q, k, v), _ = _inputs(1, 4, 2, 5, 3, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="past"):
        attention_after_prefix(q, k, v, 2, None)
    (q, k, v), _ = _inputs(1, 3, 2, 5, 3, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="multiple"):
        attention_after_prefix(q, k, v, 3, None)
