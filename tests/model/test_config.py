"""TNLConfig: validation errors name the field; MiniMax spellings; the shipped configs load."""

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import tnl_model  # noqa: F401
from tnl_model import TNLConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"


@pytest.mark.parametrize(
    "fields, field_named",
    [
        (dict(num_hidden_layers=3, layer_types=["linear_attention"] * 2), "layer_types"),
        (dict(layer_types=["linear_attention"] * 7 + ["mamba2"]), "layer_types"),
        (dict(mlp_layer_types=["sparse"] * 7 + ["big"]), "mlp_layer_types"),
        (dict(num_attention_heads=16, num_key_value_heads=5), "num_key_value_heads"),
        (dict(num_local_experts=2, num_experts_per_tok=3), "num_experts_per_tok"),
        (dict(hidden_size=-8), "hidden_size"),
        (dict(intermediate_size=0), "intermediate_size"),
        (dict(rotary_dim=200), "rotary_dim"),
        (dict(linear_attn_norm="layernorm"), "linear_attn_norm"),
        (dict(lightning_backend="cuda"), "lightning_backend"),
        (dict(attn_type_list=[0, 2, 0, 1, 0, 0, 0, 1]), "attn_type_list"),
        (dict(prefill_chunk_size=0), "prefill_chunk_size"),
    ],
)
def test_inconsistent_values_raise_value_error_naming_the_field(fields, field_named):
    with pytest.raises(ValueError, match=field_named):
        TNLConfig(**fields)


@pytest.mark.parametrize(
    "fields, field_named",
    [
        (dict(vocab_size=100, pad_token_id=100), "pad_token_id"),
        (dict(vocab_size=100, pad_token_id=-1), "pad_token_id"),
        (dict(vocab_size=100, bos_token_id=99999), "bos_token_id"),
        (dict(vocab_size=100, eos_token_id=[2, 100]), "eos_token_id"),
        (dict(eos_token_id="2"), "eos_token_id"),
        (dict(prefill_chunk_size=2.5), "prefill_chunk_size"),
        (dict(prefill_chunk_size=True), "prefill_chunk_size"),
        (dict(prefill_chunk_size="64"), "prefill_chunk_size"),
        (dict(mlp_alpha_factor="1.5"), "mlp_alpha_factor"),
        (dict(full_attn_beta_factor=None), "full_attn_beta_factor"),
        (dict(layernorm_linear_attention_alpha=[1.0]), "linear_attn_alpha_factor"),
        (dict(linear_attn_norm_eps=-1.0), "linear_attn_norm_eps"),
        (dict(linear_attn_norm_eps=0), "linear_attn_norm_eps"),
        (dict(rms_norm_eps="1e-6"), "rms_norm_eps"),
        (dict(rms_norm_eps=None), "rms_norm_eps"),
        (dict(attention_dropout=1.5), "attention_dropout"),
        (dict(attention_dropout=1.0), "attention_dropout"),
        (dict(attention_dropout=-0.1), "attention_dropout"),
        (dict(shared_intermediate_size=None), "shared_intermediate_size"),
        (dict(shared_intermediate_size=1.5), "shared_intermediate_size"),
        (dict(router_jitter_noise="0.1"), "router_jitter_noise"),
        (dict(rope_theta=0), "rope_theta"),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": -1.0}), "rope_theta"),
    ],
)
def test_values_that_would_fail_later_raise_value_error_naming_the_field(fields, field_named):
    with pytest.raises(ValueError, match=field_named):
        TNLConfig(**fields)


@pytest.mark.parametrize("fields", [
    dict(pad_token_id=None, bos_token_id=None, eos_token_id=None),
    dict(vocab_size=100, pad_token_id=99, eos_token_id=[2, 99]),
    dict(prefill_chunk_size=None), dict(prefill_chunk_size=1),
    dict(mlp_alpha_factor=2, full_attn_beta_factor=0.5, attention_dropout=0.1, shared_intermediate_size=0),
])
def test_valid_edge_values_are_accepted(fields):
    TNLConfig(**fields)


def test_original_minimax_spellings_map_onto_fields():
    config = TNLConfig(
        num_hidden_layers=3, attn_type_list=[0, 1, 0], layernorm_full_attention_alpha=2.5,
        layernorm_linear_attention_beta=0.5, layernorm_mlp_alpha=3.0, rope_theta=1e7, rotary_dim=32,
        hidden_size=256, num_attention_heads=4, postnorm=False,
    )
    assert config.layer_types == ["linear_attention", "full_attention", "linear_attention"]
    assert (config.full_attn_alpha_factor, config.linear_attn_beta_factor, config.mlp_alpha_factor) == (2.5, 0.5, 3.0)
    assert config.rope_theta == 1e7 and config.rotary_dim == 32 and config.postnorm is False


def test_default_layout_is_minimax_pattern():
    config = TNLConfig(num_hidden_layers=16)
    softmax_layers = [i for i, kind in enumerate(config.layer_types) if kind == "full_attention"]
    assert softmax_layers == [7, 15]


def test_minimax_text_01_config_loads_and_builds_on_meta():
    config = AutoConfig.from_pretrained(CONFIGS / "minimax-text-01.json")
    assert config.model_type == "tnl"
    assert [i for i, k in enumerate(config.layer_types) if k == "full_attention"] == list(range(7, 80, 8))
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (6144, 64, 8, 128)
    assert (config.rotary_dim, config.rope_theta, config.num_local_experts, config.num_experts_per_tok) == (64, 1e7, 32, 2)
    assert (config.intermediate_size, config.vocab_size) == (9216, 200064)
    assert config.mlp_alpha_factor == pytest.approx(3.5565588200778455)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    assert 4.5e11 < total < 4.6e11  # MiniMax-Text-01: 456B total parameters


@pytest.mark.parametrize("name", ["tiny.json", "small.json"])
def test_shipped_configs_load(name):
    config = AutoConfig.from_pretrained(CONFIGS / name)
    model = AutoModelForCausalLM.from_config(config)
    assert model.config.layer_types[0] == "linear_attention"


def test_config_json_round_trip(tmp_path):
    config = TNLConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, rotary_dim=8,
                       mlp_layer_types=["sparse", "dense", "sparse", "dense"], shared_intermediate_size=16)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, TNLConfig)
    for field in ("layer_types", "mlp_layer_types", "rotary_dim", "shared_intermediate_size", "rope_parameters"):
        assert getattr(loaded, field) == getattr(config, field)
