"""Property test over random valid configs: the model builds, the loss is finite, and
prefill + token-by-token decode reproduces the full forward."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tnl_model.testing import build_model, tiny_config

ATOL = 2e-5  # fp32 end to end


@st.composite
def configs(draw):
    layers = draw(st.integers(1, 4))
    heads = draw(st.sampled_from([1, 2, 3, 4, 6]))
    kv_heads = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
    head_dim = draw(st.sampled_from([8, 12, 16]))
    rotary = draw(st.sampled_from([r for r in range(0, head_dim + 1, 2)]))
    experts = draw(st.integers(1, 5))
    fields = dict(
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rotary_dim=rotary,
        hidden_size=draw(st.sampled_from([16, 24, 32])),
        intermediate_size=draw(st.sampled_from([8, 16, 24])),
        layer_types=draw(st.lists(st.sampled_from(["linear_attention", "full_attention"]),
                                  min_size=layers, max_size=layers)),
        mlp_layer_types=draw(st.lists(st.sampled_from(["sparse", "dense"]), min_size=layers, max_size=layers)),
        num_local_experts=experts,
        num_experts_per_tok=draw(st.integers(1, experts)),
        shared_intermediate_size=draw(st.sampled_from([0, 8])),
        dense_intermediate_size=draw(st.sampled_from([None, 20])),
        postnorm=draw(st.booleans()),
        linear_attn_norm=draw(st.sampled_from(["rmsnorm", "srmsnorm"])),
        linear_attn_gate=draw(st.sampled_from(["sigmoid", "identity"])),
        linear_attn_activation_on=draw(st.sampled_from(["qkv", "qk"])),
        tie_word_embeddings=draw(st.booleans()),
        full_attn_alpha_factor=draw(st.sampled_from([1.0, 1.3])),
        linear_attn_alpha_factor=draw(st.sampled_from([1.0, 1.3])),
        mlp_alpha_factor=draw(st.sampled_from([1.0, 1.3])),
        router_z_loss_coef=draw(st.sampled_from([0.0, 0.01])),
    )
    return tiny_config(**fields), draw(st.integers(1, 9)), draw(st.integers(1, 6)), draw(st.integers(0, 10**6))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(configs())
@torch.no_grad()
def test_random_valid_configs(case):
    config, prefill, decode, seed = case
    model = build_model(config, seed=seed % 1000)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, config.vocab_size, (2, prefill + decode), generator=generator)
    full = model(ids, labels=ids, use_cache=False)
    assert torch.isfinite(full.loss) and torch.isfinite(full.logits).all()
    if "sparse" in config.mlp_layer_types:
        assert torch.isfinite(full.aux_loss) and torch.isfinite(full.z_loss)
    out = model(ids[:, :prefill], use_cache=True)
    pieces, cache = [out.logits], out.cache
    for t in range(prefill, prefill + decode):
        out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
        pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full.logits, atol=ATOL, rtol=0)
