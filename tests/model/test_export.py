"""``torch.export.export`` of a prefill forward: one graph, the eager model's logits.

The token-id range check is a data-dependent branch, kept in eager mode only; fp32 experts run a
gathered-weights path under export (grouped GEMM's meta function accepts bf16 only).
"""

import pytest
import torch

from tnl_model.testing import build_model, random_ids, tiny_config


@pytest.mark.parametrize("layout", [None, ["linear_attention"] * 4], ids=["hybrid", "all_linear"])
@torch.no_grad()
def test_exported_prefill_equals_eager(layout):
    model = build_model(tiny_config(**({"layer_types": layout} if layout else {})))
    ids = random_ids(2, 16)
    exported = torch.export.export(model, (ids,), kwargs={"use_cache": False})
    other = random_ids(2, 16, seed=5)  # the graph holds no values of the traced batch
    torch.testing.assert_close(exported.module()(other, use_cache=False).logits, model(other, use_cache=False).logits,
                               atol=1e-5, rtol=0)


def test_eager_forward_still_checks_token_ids():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        build_model(tiny_config())(torch.tensor([[5, 97]]))
