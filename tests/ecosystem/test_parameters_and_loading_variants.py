"""Parameter counting (config-only and from a model), meta-device instantiation of the real
MiniMax-Text-01 shape, and the from_pretrained keyword arguments users habitually pass."""

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import tnl_model  # noqa: F401
from tnl_model import TNLForCausalLM, TNLModel
from tnl_model.parameters import (active_parameters, cache_bytes, kv_cache_bytes_per_token, parameter_breakdown,
                                  recurrent_state_bytes, total_parameters)
from tnl_model.testing import build_model, random_ids, tiny_config

MINIMAX_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "model" / "minimax-text-01.json"

CONFIG_VARIANTS = {
    "tiny": {},
    "shared_expert_tied": dict(shared_intermediate_size=16, tie_word_embeddings=True),
    "transnormer": dict(postnorm=False, linear_attn_norm="srmsnorm", linear_attn_gate="identity",
                        linear_attn_activation_on="qk", dense_intermediate_size=40),
}


@pytest.mark.parametrize("variant", CONFIG_VARIANTS)
def test_config_only_counts_equal_the_built_model(variant):
    config = tiny_config(**CONFIG_VARIANTS[variant])
    model = build_model(config)
    assert total_parameters(config) == model.num_parameters() == total_parameters(model)
    # include_embeddings=False drops the embedding and the lm_head; transformers' exclude_embeddings
    # drops nn.Embedding modules only.
    lm_head = 0 if config.tie_word_embeddings else model.lm_head.weight.numel()
    embeddings = model.num_parameters() - model.num_parameters(exclude_embeddings=True) + lm_head
    assert total_parameters(config, include_embeddings=False) == model.num_parameters(exclude_embeddings=True) - lm_head
    assert total_parameters(model, include_embeddings=False) == total_parameters(config, include_embeddings=False)
    # Active: every parameter except the (E - k) routed experts a token skips in each MoE layer.
    skipped = sum((config.num_local_experts - config.num_experts_per_tok) * 3 * config.intermediate_size
                  * config.hidden_size for kind in config.mlp_layer_types if kind == "sparse")
    assert active_parameters(config) == active_parameters(model) == model.num_parameters() - skipped
    assert active_parameters(config, include_embeddings=False) == model.num_parameters() - skipped - embeddings
    assert active_parameters(model, include_embeddings=False) == active_parameters(config, include_embeddings=False)


def test_base_model_counts_have_no_lm_head():
    config = tiny_config()
    base = TNLModel(config)
    assert total_parameters(base) == total_parameters(config) - config.vocab_size * config.hidden_size


def test_minimax_text_01_counts_match_the_published_456b_and_45_9b():
    config = AutoConfig.from_pretrained(MINIMAX_CONFIG)
    total = total_parameters(config)
    active = active_parameters(config, include_embeddings=False)
    active_with_embeddings = active_parameters(config)
    parts = parameter_breakdown(config)
    print(f"MiniMax-Text-01: total {total:,}; active per token {active:,} without embedding+lm_head, "
          f"{active_with_embeddings:,} with them; embedding {parts.embedding:,}, lm_head {parts.lm_head:,}")
    # Published: 456B total, 45.9B activated per token (the activated figure excludes the
    # embedding and lm_head matrices: with them it would be 48.4B).
    assert abs(total / 1e9 - 456) < 0.5
    assert abs(active / 1e9 - 45.9) < 0.05
    assert abs(active_with_embeddings / 1e9 - 48.4) < 0.05
    # Lightning states: 70 layers x 64 heads x 128 x 128 fp32 = 280 MiB per sequence, whatever the length.
    assert recurrent_state_bytes(config) == 70 * 64 * 128 * 128 * 4
    assert kv_cache_bytes_per_token(config) == 10 * 2 * 8 * 128 * 2
    assert cache_bytes(config, 1000, batch=2) == 2 * (recurrent_state_bytes(config) + 1000 * 40960)


def test_minimax_text_01_builds_on_the_meta_device():
    config = AutoConfig.from_pretrained(MINIMAX_CONFIG)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, TNLForCausalLM) and model.device.type == "meta"
    print(f"meta-device MiniMax-Text-01: num_parameters() = {model.num_parameters():,}")
    assert model.num_parameters() == total_parameters(config) == total_parameters(model)
    assert active_parameters(model, include_embeddings=False) == active_parameters(config, include_embeddings=False)
    layer = model.model.layers[7]
    assert layer.self_attn.q_proj.weight.shape == (64 * 128, 6144)
    assert layer.mlp.experts.gate_up_proj.shape == (32, 2 * 9216, 6144)


def test_accelerate_init_empty_weights_also_works():
    from accelerate import init_empty_weights

    config = tiny_config()
    with init_empty_weights():
        model = TNLForCausalLM(config)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.num_parameters() == total_parameters(config)


@pytest.mark.parametrize("kwargs", [
    dict(torch_dtype=torch.bfloat16),
    dict(dtype="auto"),
    dict(device_map="auto"),
    dict(low_cpu_mem_usage=True),
    dict(dtype=torch.bfloat16, device_map="auto", low_cpu_mem_usage=True),
], ids=["torch_dtype", "dtype_auto", "device_map_auto", "low_cpu_mem_usage", "all_three"])
@torch.no_grad()
def test_from_pretrained_keyword_arguments(saved_model_dir, kwargs):
    reference = AutoModelForCausalLM.from_pretrained(saved_model_dir)
    model = AutoModelForCausalLM.from_pretrained(saved_model_dir, **kwargs)
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype", torch.float32))
    dtype = torch.float32 if dtype == "auto" else dtype
    assert model.dtype == dtype
    assert not any(p.device.type == "meta" for p in model.parameters())
    for (name, a), (_, b) in zip(reference.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a.to(dtype), b), name
    ids = random_ids(1, 12)
    tol = 0 if dtype == torch.float32 else 0.15
    torch.testing.assert_close(model(ids).logits.float(), reference(ids).logits, atol=tol, rtol=0)
    assert model.model.layers[0].self_attn.slopes(torch.device("cpu")).dtype == torch.float32
