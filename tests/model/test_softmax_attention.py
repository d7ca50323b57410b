"""The softmax layer's continuation path on the CPU (queries after cached keys, no padding):
prefix and new block attended separately by the flash kernel and merged by log-sum-exp must
equal one masked softmax over all keys, computed in fp64 as the reference."""

import pytest
import torch

from tnl_model.continuation_attention import attention_after_prefix
from tnl_model.softmax_attention import TNLSoftmaxAttention
from tnl_model.testing import tiny_config

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def _reference(layer, q, k, v, past):
    groups = layer.num_heads // layer.num_kv_heads
    q, k, v = q.double(), k.repeat_interleave(groups, 1).double(), v.repeat_interleave(groups, 1).double()
    length, total = q.shape[2], k.shape[2]
    scores = (q @ k.transpose(-1, -2)) * layer.scaling
    visible = torch.arange(total)[None, :] <= torch.arange(past, past + length)[:, None]
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ v


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("past, length", [(1, 2), (5, 3), (37, 64), (300, 129), (1000, 1)])
def test_continuation_after_cache_matches_masked_softmax(past, length, dtype, kv_heads):
    layer = TNLSoftmaxAttention(tiny_config(num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16), 1)
    generator = torch.Generator().manual_seed(past * 7 + length)
    # q as the layer makes it: a head-major view of a token-major projection
    q = torch.randn(2, length, 4, 16, generator=generator).to(dtype).transpose(1, 2)
    k = torch.randn(2, kv_heads, past + length, 16, generator=generator).to(dtype) * 2  # peaked rows
    v = torch.randn(2, kv_heads, past + length, 16, generator=generator).to(dtype)
    out = attention_after_prefix(q, k, v, past, layer.scaling)
    ref = _reference(layer, q, k, v, past)
    error = (out.double() - ref).norm() / ref.norm()
    assert out.dtype == dtype and error < TOL[dtype], error
