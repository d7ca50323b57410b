"""Triton lightning-attention kernels vs the reference forms (DESIGN.md sections 3.1, 4, 7).

On a machine without CUDA every kernel runs on CPU tensors under
``TRITON_INTERPRET=1`` (set in tests/conftest.py), with fp32 and fp16 operands
only (the interpreter multiplies bf16 dot operands wrongly); bf16 is checked on
the GPU only. Every output buffer of the backend starts as NaN during these
tests, so an element a kernel never writes cannot pass.

Errors are measured as ``max |actual - expected| / max |expected|`` per tensor
against an fp64 oracle computed from the same (dtype-rounded) inputs.
"""

import pytest
import torch

from tnl_kernels import lightning_attn, lightning_attn_decode
from tnl_kernels import triton_backend, triton_ops
from tnl_kernels.reference import lightning_attn_chunked, lightning_attn_recurrent

# The one tolerance table: relative (to the tensor's largest magnitude) max error per input dtype.
# fp32: ~20x the observed error of exact fp32 dots. fp16/bf16: a few unit roundoffs, since the
# kernels feed the [C, C] scores and the fp32 states to the dots rounded to the input dtype.
TOLERANCE = {
    torch.float32: 5e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# Dtypes the interpreter can run; bf16 needs real tensor cores.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(triton_backend, "POISON_OUTPUTS", True)


def relative_error(actual, expected):
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def assert_close(actual, expected, dtype, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (unwritten or overflowed)"
    error = relative_error(actual, expected)
    assert error <= TOLERANCE[dtype], f"{what}: relative error {error:.3e} > {TOLERANCE[dtype]:.1e} ({dtype})"


def make_inputs(batch, length, heads, dim_k, dim_v, dtype, *, n_states=None, seed=0):
    """Realistic magnitudes (unit-variance activations, never zeros); fp32 states and cotangents."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    n_states = batch if n_states is None else n_states
    inputs = {
        "q": rand(batch, length, heads, dim_k).to(dtype),
        "k": rand(batch, length, heads, dim_k).to(dtype),
        "v": rand(batch, length, heads, dim_v).to(dtype),
        "state0": rand(n_states, heads, dim_k, dim_v),
        "grad_out": rand(batch, length, heads, dim_v),
        "grad_final": rand(n_states, heads, dim_k, dim_v),
    }
    return {name: x.to(DEVICE) for name, x in inputs.items()}


def run_with_grads(fn, inputs, slopes, *, scale, use_state0, use_final=True, **kwargs):
    """o, final state and the gradients of <o, grad_out> + <final, grad_final>."""
    q, k, v, state0 = (inputs[n].detach().clone().requires_grad_() for n in ("q", "k", "v", "state0"))
    out, final = fn(q, k, v, slopes, scale=scale, initial_state=state0 if use_state0 else None, **kwargs)
    loss = (out.double() * inputs["grad_out"].double()).sum()
    if use_final:
        loss = loss + (final.double() * inputs["grad_final"].double()).sum()
    loss.backward()
    return {"o": out, "final": final, "dq": q.grad, "dk": k.grad, "dv": v.grad, "dstate0": state0.grad}


def fp64_oracle(inputs, slopes, **kwargs):
    as64 = {n: x.double() for n, x in inputs.items()}
    return run_with_grads(lightning_attn_recurrent, as64, slopes.double(), **kwargs)


def triton_run(inputs, slopes, **kwargs):
    return run_with_grads(triton_backend.lightning_attn_triton, inputs, slopes, **kwargs)


def assert_all_close(actual, expected, dtype, names=("o", "final", "dq", "dk", "dv", "dstate0")):
    for name in names:
        if expected[name] is None:
            assert actual[name] is None, f"{name}: expected no gradient"
            continue
        assert_close(actual[name], expected[name], dtype, name)


# T around the chunk (64), far past it, and 1; head dims D and E chosen independently,
# including the masked-tile sizes 48 and 96; slopes always include 0 (no decay) and a
# steep one (exp overflows unless the causal mask is applied before exp).
FORWARD_CASES = [
    # (T, D, E, slope, dtype, use_state0)
    (1, 16, 16, 0.5, torch.float32, True),
    (7, 48, 96, 3.0, torch.float32, True),
    (63, 64, 48, 4.0, torch.float32, False),
    (64, 96, 32, 0.05, torch.float32, True),
    (65, 32, 96, 0.3, torch.float32, True),
    (200, 48, 48, 1.0, torch.float32, False),
    (513, 32, 64, 0.02, torch.float32, True),
    (65, 48, 64, 0.3, torch.float16, True),
    (200, 96, 48, 0.1, torch.float16, False),
    (70, 192, 256, 0.2, torch.float32, True),
]


@pytest.mark.parametrize("length, dim_k, dim_v, slope, dtype, use_state0", FORWARD_CASES)
def test_outputs_states_and_gradients_match_fp64_recurrence(length, dim_k, dim_v, slope, dtype, use_state0):
    inputs = make_inputs(2, length, 2, dim_k, dim_v, dtype, seed=length)
    slopes = torch.tensor([0.0, slope], device=DEVICE)
    kwargs = dict(scale=0.7, use_state0=use_state0)
    assert_all_close(triton_run(inputs, slopes, **kwargs), fp64_oracle(inputs, slopes, **kwargs), dtype)


@pytest.mark.parametrize("length", [65, 200])
def test_matches_chunked_reference(length):
    """The same chunked algorithm in plain torch (fp32, autograd through it)."""
    inputs = make_inputs(1, length, 2, 48, 32, torch.float32, seed=1)
    slopes = torch.tensor([0.0, 0.25], device=DEVICE)
    kwargs = dict(scale=1.0, use_state0=True)
    expected = run_with_grads(lightning_attn_chunked, inputs, slopes, block_size=64, **kwargs)
    assert_all_close(triton_run(inputs, slopes, **kwargs), expected, torch.float32)


@pytest.mark.parametrize("use_final", [False, True])
def test_gradient_from_output_only_or_with_final_state(use_final):
    """final_state unused downstream (no cotangent) vs used: both paths of the backward."""
    inputs = make_inputs(1, 100, 2, 32, 48, torch.float32, seed=2)
    slopes = torch.tensor([0.0, 0.2], device=DEVICE)
    kwargs = dict(scale=1.0, use_state0=True, use_final=use_final)
    assert_all_close(triton_run(inputs, slopes, **kwargs), fp64_oracle(inputs, slopes, **kwargs), torch.float32)


def test_gradient_from_final_state_only():
    inputs = make_inputs(1, 90, 2, 32, 32, torch.float32, seed=3)
    slopes = torch.tensor([0.0, 0.3], device=DEVICE)
    inputs["grad_out"] = torch.zeros_like(inputs["grad_out"])  # only d(final_state) drives the backward
    kwargs = dict(scale=1.0, use_state0=True)
    actual, expected = triton_run(inputs, slopes, **kwargs), fp64_oracle(inputs, slopes, **kwargs)
    assert_all_close(actual, expected, torch.float32, names=("final", "dk", "dv", "dstate0"))
    assert actual["dq"].abs().max() == 0  # q never reaches the final state


# The forward strategies of the backend. "auto" picks one per call: under the interpreter (the
# CPU counts as one multiprocessor) sequential for fp16 when D fits its tile, split for fp32.
STRATEGIES = ["sequential", "split"]
# How the split forward and the backward get the per-chunk states (one walk per sequence, or
# every chunk at once and a cheap scan); "auto" walks under the interpreter.
STATE_STRATEGIES = ["sequential", "parallel"]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("length, dim_k, dim_v, slope, dtype, use_state0", [
    (1, 16, 16, 0.5, torch.float32, True),
    (63, 64, 48, 4.0, torch.float32, False),
    (65, 48, 96, 0.3, torch.float32, True),
    (200, 96, 48, 0.1, torch.float16, True),
    (513, 32, 64, 0.02, torch.float32, True),
])
def test_each_forward_strategy_matches_fp64_recurrence(monkeypatch, strategy, length, dim_k, dim_v, slope, dtype,
                                                       use_state0):
    """Both forwards on the same oracle (the backward is shared; its gradients are checked too)."""
    monkeypatch.setattr(triton_backend, "FORWARD", strategy)
    inputs = make_inputs(2, length, 2, dim_k, dim_v, dtype, seed=20 + length)
    slopes = torch.tensor([0.0, slope], device=DEVICE)
    kwargs = dict(scale=0.7, use_state0=use_state0)
    assert_all_close(triton_run(inputs, slopes, **kwargs), fp64_oracle(inputs, slopes, **kwargs), dtype)


CPU = torch.device("cpu")


@pytest.mark.parametrize("dims, batch, heads, dtype, expected", [
    ((64, 64), 2, 2, torch.float16, "sequential"),
    ((128, 256), 1, 1, torch.bfloat16, "sequential"),
    ((192, 64), 8, 8, torch.float16, "split"),  # D above one sequential tile
    ((64, 64), 8, 8, torch.float32, "split"),  # exact fp32 dots spill in the sequential kernel
])
def test_auto_strategy_on_one_multiprocessor(monkeypatch, dims, batch, heads, dtype, expected):
    monkeypatch.setattr(triton_backend, "FORWARD", "auto")
    assert triton_backend._forward_strategy(*dims, batch, heads, dtype, CPU) == expected


def test_auto_strategy_needs_a_program_per_multiprocessor(monkeypatch):
    """On a GPU with 132 multiprocessors, one sequence of 8 heads (long-context prefill) runs split."""
    monkeypatch.setattr(triton_backend, "FORWARD", "auto")
    monkeypatch.setattr(triton_backend, "_multiprocessors", lambda device: 132)
    assert triton_backend._forward_strategy(128, 128, 1, 8, torch.bfloat16, CPU) == "split"
    assert triton_backend._forward_strategy(128, 128, 8, 32, torch.bfloat16, CPU) == "sequential"


def test_forced_strategy_is_checked(monkeypatch):
    monkeypatch.setattr(triton_backend, "FORWARD", "sequential")
    with pytest.raises(ValueError, match="up to 128"):
        triton_backend._forward_strategy(192, 64, 1, 1, torch.float16, CPU)
    monkeypatch.setattr(triton_backend, "FORWARD", "parallel")
    with pytest.raises(ValueError, match="FORWARD must be"):
        triton_backend._forward_strategy(64, 64, 1, 1, torch.float16, CPU)


@pytest.mark.parametrize("states", STATE_STRATEGIES)
@pytest.mark.parametrize("length, dim_k, dim_v, dtype, use_state0", [
    (65, 48, 32, torch.float32, True),
    (200, 32, 96, torch.float16, False),
    (130, 96, 64, torch.float16, True),
])
def test_each_state_strategy_matches_fp64_recurrence(monkeypatch, states, length, dim_k, dim_v, dtype, use_state0):
    """The per-chunk states (split forward and backward) computed both ways, on the same oracle."""
    monkeypatch.setattr(triton_backend, "FORWARD", "split")
    monkeypatch.setattr(triton_backend, "STATES", states)
    inputs = make_inputs(2, length, 2, dim_k, dim_v, dtype, seed=40 + length)
    slopes = torch.tensor([0.0, 0.3], device=DEVICE)
    kwargs = dict(scale=0.7, use_state0=use_state0)
    assert_all_close(triton_run(inputs, slopes, **kwargs), fp64_oracle(inputs, slopes, **kwargs), dtype)


def test_auto_state_strategy(monkeypatch):
    monkeypatch.setattr(triton_backend, "_multiprocessors", lambda device: 132)
    # 1 sequence x 8 heads x 16 state tiles of 32x32 = 128 walks: too few, every chunk at once instead
    assert triton_backend._state_strategy(128, 128, 1, 8, CPU, "auto") == "parallel"
    assert triton_backend._state_strategy(128, 128, 2, 8, CPU, "auto") == "sequential"
    assert triton_backend._state_strategy(128, 128, 2, 8, CPU, "parallel") == "parallel"
    with pytest.raises(ValueError, match="STATES must be"):
        triton_backend._state_strategy(64, 64, 1, 1, CPU, "scan")


def test_backward_keeps_the_state_strategy_of_its_forward(monkeypatch):
    """STATES is read when the graph is recorded: changing it before backward() changes nothing."""
    seen, original = [], triton_backend._state_strategy
    monkeypatch.setattr(triton_backend, "_state_strategy", lambda *args: seen.append(args[-1]) or original(*args))
    monkeypatch.setattr(triton_backend, "FORWARD", "sequential")
    monkeypatch.setattr(triton_backend, "STATES", "parallel")
    q, k, v = (torch.randn(1, 70, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    out, _ = triton_backend.lightning_attn_triton(q, k, v, torch.tensor([0.0, 0.2], device=DEVICE))
    monkeypatch.setattr(triton_backend, "STATES", "sequential")
    out.sum().backward()
    assert seen == ["parallel", "parallel"]  # the two state computations of the backward


@pytest.mark.parametrize("strategy, states", [("sequential", "sequential"), ("split", "sequential"),
                                              ("split", "parallel")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_varlen_matches_per_sequence_runs(monkeypatch, dtype, strategy, states):
    """Uneven lengths (one empty, one of exactly a chunk, several crossing chunk borders)."""
    monkeypatch.setattr(triton_backend, "FORWARD", strategy)
    monkeypatch.setattr(triton_backend, "STATES", states)
    lengths = [7, 64, 0, 130, 1, 65]
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
    inputs = make_inputs(1, bounds[-1], 2, 48, 32, dtype, n_states=len(lengths), seed=4)
    slopes = torch.tensor([0.0, 0.15], device=DEVICE)
    packed = triton_run(inputs, slopes, scale=1.0, use_state0=True, cu_seqlens=cu_seqlens)
    for n, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        piece = {name: inputs[name][:, start:stop] for name in ("q", "k", "v", "grad_out")}
        piece.update({name: inputs[name][n : n + 1] for name in ("state0", "grad_final")})
        alone = fp64_oracle(piece, slopes, scale=1.0, use_state0=True)
        for name in ("o", "dq", "dk", "dv"):
            if stop > start:
                assert_close(packed[name][:, start:stop], alone[name], dtype, f"sequence {n} {name}")
        for name in ("final", "dstate0"):
            assert_close(packed[name][n : n + 1], alone[name], dtype, f"sequence {n} {name}")


@pytest.mark.parametrize("strategy, states", [("sequential", "sequential"), ("split", "parallel")])
def test_no_tokens_passes_the_state_through(monkeypatch, strategy, states):
    """T = 0 (every sequence empty): no output rows, final state = initial state, d(initial) = d(final)."""
    monkeypatch.setattr(triton_backend, "FORWARD", strategy)
    monkeypatch.setattr(triton_backend, "STATES", states)
    inputs = make_inputs(2, 0, 2, 32, 48, torch.float16, seed=30)
    slopes = torch.tensor([0.0, 0.3], device=DEVICE)
    actual = triton_run(inputs, slopes, scale=1.0, use_state0=True)
    assert actual["o"].shape == (2, 0, 2, 48)
    assert torch.equal(actual["final"], inputs["state0"])
    assert torch.equal(actual["dstate0"], inputs["grad_final"])


def test_strided_inputs_from_a_fused_projection():
    """q, k, v as non-contiguous views of one [B, T, H, 3D] tensor, as the model produces them."""
    gen = torch.Generator().manual_seed(5)
    fused = torch.randn(2, 70, 2, 3 * 32, generator=gen).to(DEVICE)
    q, k, v = fused.split(32, dim=-1)
    slopes = torch.tensor([0.0, 0.4], device=DEVICE)
    state0 = torch.randn(2, 2, 32, 32, generator=gen).to(DEVICE)
    out, final = triton_backend.lightning_attn_triton(q, k, v, slopes, scale=1.0, initial_state=state0)
    ref_out, ref_final = lightning_attn_recurrent(q.double(), k.double(), v.double(), slopes.double(), initial_state=state0.double())
    assert_close(out, ref_out, torch.float32, "o")
    assert_close(final, ref_final, torch.float32, "final")


@pytest.mark.parametrize("length", [1, 5])
def test_odd_strides_on_size_one_dims(length):
    """q, k, v (and the output gradient) transposed from ``[B, H, T, *]`` with T == 1 count as
    contiguous in PyTorch but step tokens by D, not H * D: the kernels must not read them as such."""
    inputs = make_inputs(3, length, 2, 16, 24, torch.float32, seed=11)
    heads_first = {n: torch.empty(x.transpose(1, 2).shape, device=DEVICE).copy_(x.transpose(1, 2)).transpose(1, 2)
                   for n, x in inputs.items() if n in ("q", "k", "v", "grad_out")}
    if length == 1:
        assert heads_first["q"].is_contiguous() and heads_first["q"].stride(1) == 16  # the layout under test
    slopes = torch.tensor([0.0, 0.4], device=DEVICE)
    kwargs = dict(scale=0.7, use_state0=True)
    expected = fp64_oracle(inputs, slopes, **kwargs)
    assert_all_close(triton_run({**inputs, **heads_first}, slopes, **kwargs), expected, torch.float32)
    # the custom-operator route that torch.compile takes
    compiled_route = run_with_grads(triton_ops.lightning_attn_compilable, {**inputs, **heads_first}, slopes, **kwargs)
    assert_all_close(compiled_route, expected, torch.float32)


def test_double_backward_is_refused():
    """The hand-written backward is not differentiable: asking for second derivatives must fail
    loudly instead of returning first-order gradients without a graph."""
    inputs = make_inputs(1, 9, 2, 16, 16, torch.float32, seed=12)
    q = inputs["q"].clone().requires_grad_()
    out, _ = triton_backend.lightning_attn_triton(q, inputs["k"], inputs["v"], torch.tensor([0.0, 0.3], device=DEVICE))
    (grad_q,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        grad_q.square().sum().backward()


def test_decode_under_autograd_takes_the_differentiable_step():
    """The Triton decode writes its state in place and records no graph: "auto" falls back to the
    PyTorch step when gradients are needed, and a forced "triton" says why it cannot."""
    inputs = make_inputs(2, 1, 2, 16, 16, torch.float32, seed=13)
    slopes = torch.tensor([0.0, 0.3], device=DEVICE)
    grads = {}
    for backend in ("torch", "auto"):
        q = inputs["q"][:, 0].clone().requires_grad_()
        out = lightning_attn_decode(q, inputs["k"][:, 0], inputs["v"][:, 0], slopes, inputs["state0"].clone(),
                                    backend=backend)
        out.square().sum().backward()
        grads[backend] = q.grad
    torch.testing.assert_close(grads["auto"], grads["torch"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="not differentiable"):
        lightning_attn_decode(inputs["q"][:, 0].requires_grad_(), inputs["k"][:, 0], inputs["v"][:, 0], slopes,
                              inputs["state0"].clone(), backend="triton")


def test_decode_checks_the_slopes_shape():
    inputs = make_inputs(2, 1, 4, 16, 16, torch.float32, seed=14)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="slopes must have shape"):
            lightning_attn_decode(inputs["q"][:, 0], inputs["k"][:, 0], inputs["v"][:, 0],
                                  torch.tensor([0.1, 0.2], device=DEVICE), inputs["state0"].clone(), backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_packed_sequences_gives_empty_results(backend):
    """``cu_seqlens=[0]``: no token and no sequence, on both backends (the shape of an empty shard)."""
    q = torch.randn(1, 0, 2, 16, device=DEVICE)
    out, final = lightning_attn(q, q, q, torch.tensor([0.0, 0.3], device=DEVICE), output_final_state=True,
                                cu_seqlens=torch.tensor([0], dtype=torch.int32, device=DEVICE), backend=backend)
    assert out.shape == (1, 0, 2, 16) and final.shape == (0, 2, 16, 16)
    with pytest.raises(ValueError, match="cu_seqlens"):
        lightning_attn(q, q, q, torch.tensor([0.0, 0.3], device=DEVICE), backend=backend,
                       cu_seqlens=torch.zeros(0, dtype=torch.int32, device=DEVICE))


def test_public_api_dispatches_to_triton():
    inputs = make_inputs(1, 40, 2, 32, 32, torch.float32, seed=6)
    slopes = torch.tensor([0.0, 0.3], device=DEVICE)
    args = (inputs["q"], inputs["k"], inputs["v"], slopes)
    kwargs = dict(initial_state=inputs["state0"], output_final_state=True)
    out, final = lightning_attn(*args, backend="triton", **kwargs)
    ref_out, ref_final = lightning_attn(*args, backend="torch", **kwargs)
    assert_close(out, ref_out, torch.float32, "o")
    assert_close(final, ref_final, torch.float32, "final")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_steps_match_recurrence(dtype):
    """Many one-token steps, in place on a state that is a strided view (as a cache holds it)."""
    batch, heads, dim_k, dim_v, steps = 3, 2, 48, 96, 40
    inputs = make_inputs(batch, steps, heads, dim_k, dim_v, dtype, seed=7)
    slopes = torch.tensor([0.0, 0.2], device=DEVICE)
    storage = torch.zeros(batch, heads + 1, dim_k, dim_v, device=DEVICE)
    state = storage[:, 1:]  # non-contiguous along the head axis
    state.copy_(inputs["state0"])
    outputs = [
        triton_backend.lightning_attn_decode_triton(
            inputs["q"][:, t], inputs["k"][:, t], inputs["v"][:, t], slopes, state, scale=0.5
        )
        for t in range(steps)
    ]
    out = torch.stack(outputs, dim=1)
    ref_out, ref_state = lightning_attn_recurrent(
        inputs["q"].double(), inputs["k"].double(), inputs["v"].double(), slopes.double(), scale=0.5,
        initial_state=inputs["state0"].double(),
    )
    assert out.dtype == dtype
    assert_close(out, ref_out, dtype, "decode outputs")
    assert_close(state, ref_state, torch.float32, "decode state")  # the state is fp32 whatever the inputs
    assert storage[:, 0].abs().max() == 0, "decode wrote outside its state view"


def test_prefill_then_decode_equals_full_forward():
    batch, heads, dim_k, dim_v, prompt, new = 2, 2, 32, 48, 70, 12
    inputs = make_inputs(batch, prompt + new, heads, dim_k, dim_v, torch.float32, seed=8)
    slopes = torch.tensor([0.0, 0.1], device=DEVICE)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    full_out, full_final = lightning_attn(q, k, v, slopes, backend="triton", output_final_state=True)
    pre_out, state = lightning_attn(q[:, :prompt], k[:, :prompt], v[:, :prompt], slopes, backend="triton", output_final_state=True)
    steps = [lightning_attn_decode(q[:, t], k[:, t], v[:, t], slopes, state, backend="triton") for t in range(prompt, prompt + new)]
    joined = torch.cat([pre_out, torch.stack(steps, dim=1)], dim=1)
    assert_close(joined, full_out, torch.float32, "prefill + decode outputs")
    assert_close(state, full_final, torch.float32, "state after decode")


@pytest.mark.skipif(not triton_backend._kernels_interpreted(), reason="checks the Triton interpreter's bf16 refusal")
def test_bf16_is_refused_under_the_interpreter():
    """The interpreter's bf16 tl.dot is wrong (relative errors of 1e8): the chunked kernels raise a clear
    error on every route (public API, the autograd.Function, the torch.compile custom operator) instead
    of returning garbage. backend="auto" on CPU tensors takes the PyTorch path and is unaffected; the
    decode kernel has no tl.dot and stays exact to bf16 rounding."""
    inputs = make_inputs(1, 40, 2, 32, 32, torch.bfloat16, seed=12)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    slopes = torch.tensor([0.0, 0.3], device=DEVICE)
    refusal = r"bf16 .*TRITON_INTERPRET=1.*wrongly.*fp32 or fp16.*backend='torch'"
    with pytest.raises(ValueError, match=refusal):
        lightning_attn(q, k, v, slopes, backend="triton", initial_state=inputs["state0"])
    with pytest.raises(ValueError, match=refusal):
        triton_backend.lightning_attn_triton(q.clone().requires_grad_(), k, v, slopes)
    with pytest.raises(ValueError, match=refusal):
        triton_ops.lightning_fwd(q, k, v, slopes, 1.0, None, None, triton_backend.CHUNK_SIZE)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(lambda q, k, v: lightning_attn(q, k, v, slopes, backend="triton")[0], backend="aot_eager")
        with pytest.raises(ValueError, match=refusal):
            compiled(q, k, v)
    finally:
        torch._dynamo.reset()
    kwargs = dict(scale=1.0, initial_state=inputs["state0"], output_final_state=True)
    out, final = lightning_attn(q, k, v, slopes, backend="auto", **kwargs)
    ref_out, ref_final = lightning_attn_recurrent(q.double(), k.double(), v.double(), slopes.double(),
                                                  scale=1.0, initial_state=inputs["state0"].double())
    assert out.dtype == torch.bfloat16
    assert_close(out, ref_out, torch.bfloat16, "auto backend o")
    assert_close(final, ref_final, torch.float32, "auto backend final state")
    state = inputs["state0"].clone()
    steps = [lightning_attn_decode(q[:, t], k[:, t], v[:, t], slopes, state, backend="triton") for t in range(40)]
    assert_close(torch.stack(steps, dim=1), ref_out, torch.bfloat16, "bf16 decode under the interpreter")
    assert_close(state, ref_final, torch.float32, "bf16 decode state")


@pytest.mark.skipif(not CUDA, reason="bf16 dots are only trustworthy on a GPU (the interpreter multiplies them wrongly)")
@pytest.mark.parametrize("length", [65, 1000])
def test_bf16_on_gpu(length):
    inputs = make_inputs(2, length, 4, 128, 128, torch.bfloat16, seed=9)
    slopes = torch.tensor([0.0, 0.01, 0.1, 0.5], device=DEVICE)
    kwargs = dict(scale=1.0, use_state0=True)
    assert_all_close(triton_run(inputs, slopes, **kwargs), fp64_oracle(inputs, slopes, **kwargs), torch.bfloat16)


# ------------------------------------------------------------------ real sizes, GPU only
# The interpreter would take hours at these sizes; scripts/gpu_session.sh runs them on a lent GPU.

GPU_ONLY = pytest.mark.skipif(not CUDA, reason="real sizes need a GPU")


@GPU_ONLY
@pytest.mark.parametrize("strategy, states", [("sequential", "sequential"), ("split", "parallel")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 96, 128, 256])
def test_real_sizes_on_gpu(monkeypatch, dim, dtype, strategy, states):
    """T = 4099 (64 chunks and a 3-token tail), every gradient, against the fp64 chunked form;
    every kernel runs (the two pairs of strategies between them)."""
    if strategy == "sequential" and dim > triton_backend.MAX_SEQUENTIAL_HEAD_DIM:
        pytest.skip("the sequential forward takes D <= 128")
    monkeypatch.setattr(triton_backend, "FORWARD", strategy)
    monkeypatch.setattr(triton_backend, "STATES", states)
    inputs = make_inputs(2, 4099, 4, dim, dim, dtype, seed=dim)
    slopes = torch.tensor([0.0, 0.002, 0.05, 0.5], device=DEVICE)
    kwargs = dict(scale=1.0, use_state0=True)
    as64 = {name: x.double() for name, x in inputs.items()}
    expected = run_with_grads(lightning_attn_chunked, as64, slopes.double(), block_size=256, **kwargs)
    assert_all_close(triton_run(inputs, slopes, **kwargs), expected, dtype)


@GPU_ONLY
def test_varlen_at_real_sizes_on_gpu():
    lengths = [1000, 3001, 64, 4000, 1]
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    inputs = make_inputs(1, int(bounds[-1]), 4, 128, 128, torch.bfloat16, n_states=len(lengths), seed=11)
    slopes = torch.tensor([0.0, 0.01, 0.1, 0.5], device=DEVICE)
    packed = triton_run(inputs, slopes, scale=1.0, use_state0=True, cu_seqlens=bounds)
    for n, (start, stop) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
        piece = {name: inputs[name][:, start:stop] for name in ("q", "k", "v", "grad_out")}
        piece.update({name: inputs[name][n : n + 1] for name in ("state0", "grad_final")})
        alone = triton_run(piece, slopes, scale=1.0, use_state0=True)
        for name in ("o", "dq", "dk", "dv"):
            assert_close(packed[name][:, start:stop], alone[name].float(), torch.bfloat16, f"sequence {n} {name}")
        for name in ("final", "dstate0"):
            assert_close(packed[name][n : n + 1], alone[name], torch.bfloat16, f"sequence {n} {name}")


@GPU_ONLY
def test_model_on_gpu_uses_triton_and_generates_like_the_full_forward(monkeypatch):
    """bf16 TNL model on CUDA: the lightning layers run the Triton kernels (auto backend), and
    prefill + token-by-token decode gives the logits of one full forward."""
    from tnl_model.testing import build_model, random_ids, tiny_config

    calls, original = [], triton_backend.lightning_attn_triton
    monkeypatch.setattr(triton_backend, "lightning_attn_triton", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = build_model(tiny_config(hidden_size=256, num_attention_heads=4, head_dim=64, rotary_dim=64))
    model = model.to(device=DEVICE, dtype=torch.bfloat16)
    ids = random_ids(2, 300, seed=12).to(DEVICE)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits.float()
        out = model(ids[:, :256], use_cache=True)
        steps, cache = [out.logits.float()], out.cache
        for t in range(256, 300):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits.float())
    assert calls, "the lightning layers did not use the Triton backend on CUDA"
    stepped = torch.cat(steps, dim=1)
    assert relative_error(stepped, full) < 3e-2
