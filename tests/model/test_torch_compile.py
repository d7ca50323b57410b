"""torch.compile: a compiled model computes what the eager one does, forward and backward.

The compiler's ``aot_eager`` backend traces every graph with fake tensors and runs it through
AOT autograd, which is where models break (an op whose meta function refuses an input the eager
kernel accepts, ``out=`` into a strided view), without Inductor's code generation: seconds here
instead of a minute. The hot operators must also trace with no graph break at all.
"""

import pytest
import torch

from tnl_kernels import build_slopes, lightning_attn
from tnl_kernels.moe_dispatch import moe_dispatch
from tnl_model.testing import build_model, random_ids, tiny_config

BACKEND = "aot_eager"
ATOL = 1e-5  # fp32 end to end; eager and compiled run the same kernels in the same order


@pytest.fixture(autouse=True)
def fresh_compiler():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _loss_and_grads(model, ids, labels, run=None):
    model.zero_grad(set_to_none=True)
    out = (model if run is None else run)(ids, labels=labels)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def test_compiled_training_step_equals_eager():
    model = build_model(tiny_config()).train()  # hybrid, MoE (fp32 grouped GEMM) and a dense layer
    ids = random_ids(2, 75)
    labels = ids.clone()
    labels[0, :9] = -100
    logits, loss, grads = _loss_and_grads(model, ids, labels)
    c_logits, c_loss, c_grads = _loss_and_grads(model, ids, labels, run=torch.compile(model, backend=BACKEND))
    torch.testing.assert_close(c_logits, logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(c_loss, loss, atol=ATOL, rtol=0)
    assert c_grads.keys() == grads.keys() and len(grads) > 20
    for name in grads:
        torch.testing.assert_close(c_grads[name], grads[name], atol=ATOL, rtol=1e-4, msg=name)


@torch.no_grad()
def test_compiled_inference_with_padding_equals_eager():
    model = build_model(tiny_config())
    ids = random_ids(2, 40)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding reaches the softmax layer's mask
    expected = model(ids, attention_mask=mask).logits
    got = torch.compile(model, backend=BACKEND)(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_layers_of_one_kind_share_one_compiled_frame():
    """Nothing per layer (its index, its decay rates) and nothing per batch (its token ids) may be
    specialised on: a deep model would otherwise recompile per layer and, past dynamo's recompile
    limit, silently run the remaining layers eagerly."""
    layer_types = ["linear_attention"] * 4 + ["full_attention"] + ["linear_attention"] * 4
    model = build_model(tiny_config(num_hidden_layers=9, layer_types=layer_types, mlp_layer_types=["sparse"] * 9))
    compiled = torch.compile(model.train(), backend=BACKEND)
    # Two kinds of decoder layer (lightning or softmax attention, each with MoE): two entries per frame.
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        for seed in range(3):
            ids = random_ids(2, 40, seed=seed, low=10)
            ids[0, :2] = torch.tensor([3 + seed, 90 + seed])  # each batch: a different smallest and largest id
            compiled(ids, labels=ids, use_cache=False).loss.backward()


def _graph_breaks(fn, *args):
    return torch._dynamo.explain(fn)(*args).graph_break_count


def test_lightning_operator_traces_in_one_graph():
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 150, 4, 16, generator=generator) for _ in range(2))
    v = torch.randn(2, 150, 4, 24, generator=generator)
    state = torch.randn(2, 4, 16, 24, generator=generator)
    slopes = build_slopes(4, layer_idx=1, num_layers=4)

    def run(q, k, v, state):
        return lightning_attn(q, k, v, slopes, initial_state=state, output_final_state=True, backend="torch")

    assert _graph_breaks(run, q, k, v, state) == 0
    torch._dynamo.reset()
    expected = run(q, k, v, state)
    got = torch.compile(run, backend=BACKEND, fullgraph=True)(q, k, v, state)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_bf16_moe_dispatch_traces_in_one_graph():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 32, generator=generator).bfloat16()
    gate_up = (torch.randn(4, 48, 32, generator=generator) / 6).bfloat16()
    down = (torch.randn(4, 32, 24, generator=generator) / 5).bfloat16()
    topk_index = torch.randint(0, 4, (64, 2), generator=generator)
    topk_index[:, 1] = (topk_index[:, 0] + 1) % 4  # two distinct experts per token
    topk_weight = torch.rand(64, 2, generator=generator).bfloat16()

    def run(hidden, gate_up, down, topk_index, topk_weight):
        return moe_dispatch(hidden, gate_up, down, topk_index, topk_weight, impl="grouped_mm")

    assert _graph_breaks(run, hidden, gate_up, down, topk_index, topk_weight) == 0
    torch._dynamo.reset()
    expected = run(hidden, gate_up, down, topk_index, topk_weight)
    got = torch.compile(run, backend=BACKEND, fullgraph=True)(hidden, gate_up, down, topk_index, topk_weight)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def _triton_inputs(lengths=(70,), heads=2, dim=16, seed=0):
    """q, k, v, initial state (all requiring grad), slopes and cu_seqlens (None for one sequence)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)

    def leaf(*shape):
        return (torch.randn(*shape, generator=generator) * 0.5).to(device).requires_grad_()

    q, k, v = leaf(1, total, heads, dim), leaf(1, total, heads, dim), leaf(1, total, heads, dim)
    state = leaf(len(lengths), heads, dim, dim)
    cu_seqlens = None
    if len(lengths) > 1:
        cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, state, build_slopes(heads, layer_idx=0, num_layers=2).to(device), cu_seqlens


@pytest.mark.parametrize("lengths", [(70,), (33, 1, 64)], ids=["one_sequence", "varlen"])
def test_compiled_triton_operator_equals_eager(lengths):
    """Under torch.compile the Triton path is two custom operators (forward, backward): same launches,
    same bits, and no graph break for one sequence (varlen checks cu_seqlens on the host first)."""
    pytest.importorskip("triton")
    q, k, v, state, slopes, cu_seqlens = _triton_inputs(lengths)
    weights = torch.randn(q.shape[:3] + (v.shape[-1],), generator=torch.Generator().manual_seed(5)).to(q.device)

    def run(q, k, v, state):
        out, final = lightning_attn(q, k, v, slopes, initial_state=state, output_final_state=True, cu_seqlens=cu_seqlens,
                                    backend="triton")
        return (out * weights).sum() + (final * final).sum()

    if cu_seqlens is None:
        assert _graph_breaks(run, q, k, v, state) == 0
        torch._dynamo.reset()
    expected = run(q, k, v, state)
    expected_grads = torch.autograd.grad(expected, (q, k, v, state))
    got = torch.compile(run, backend=BACKEND)(q, k, v, state)
    got_grads = torch.autograd.grad(got, (q, k, v, state))
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_triton_custom_operators_pass_opcheck():
    """Schema, fake (shape-only) implementation and autograd registration, as PyTorch checks them."""
    pytest.importorskip("triton")
    from tnl_kernels.triton_ops import lightning_bwd, lightning_fwd

    for lengths in [(40,), (17, 40)]:
        q, k, v, state, slopes, cu_seqlens = _triton_inputs(lengths, seed=len(lengths))
        torch.library.opcheck(lightning_fwd, (q, k, v, slopes, 1.0, state, cu_seqlens, 64))
        grad_out, grad_final = torch.randn_like(v).detach(), torch.randn_like(state).detach()
        inputs = [x.detach() for x in (q, k, v)]
        torch.library.opcheck(lightning_bwd, (*inputs, grad_out, slopes, 1.0, state.detach(), grad_final, cu_seqlens,
                                              64, "auto"), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the Triton kernels and the bf16 grouped GEMM on CUDA")
def test_compiled_bf16_training_step_on_gpu_equals_eager():
    model = build_model(tiny_config()).to(device="cuda", dtype=torch.bfloat16).train()
    ids = random_ids(2, 300).cuda()
    logits, loss, grads = _loss_and_grads(model, ids, ids)
    c_logits, c_loss, c_grads = _loss_and_grads(model, ids, ids, run=torch.compile(model, backend=BACKEND))
    # Same kernels in the same order; bf16 tolerances only for ops the tracer may reorder.
    torch.testing.assert_close(c_logits, logits, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(c_loss, loss, atol=1e-2, rtol=0)
    assert c_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(c_grads[name], grads[name], atol=2e-2, rtol=5e-2, msg=name)
