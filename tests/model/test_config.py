"""TNLConfig: validation errors name the field; MiniMax spellings; the shipped configs load.

Types and single-field ranges are checked by transformers' strict-dataclass validation on every assignment
(messages "Validation error for field '<name>': ..."), the rules between fields by ``validate_architecture``;
either way the error is a ``TNLConfigError``: transformers' ``StrictDataclassError`` and a ``ValueError``.
"""

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModelForCausalLM

import tnl_model  # noqa: F401
from tnl_model import TNLConfig
from tnl_model.configuration_tnl import TNLConfigError
from tnl_model.snapshots import config_fingerprint

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"
LIN = "linear_attention"


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


# One case per rule of validate_architecture (the rules between fields), with the message it gives.
CROSS_FIELD_RULES = {
    "kv_heads_divide_heads": (dict(num_attention_heads=12, num_key_value_heads=5),
                              r"num_key_value_heads \(5\) must divide num_attention_heads \(12\); "
                              r"use one of \[1, 2, 3, 4, 6, 12\]"),
    "top_k_within_experts": (dict(num_local_experts=4, num_experts_per_tok=5),
                             r"num_experts_per_tok \(5\) cannot exceed num_local_experts \(4\)"),
    "rotary_dim_even": (dict(head_dim=16, rotary_dim=5),
                        r"rotary_dim must be an even number in \[0, head_dim=16\], got 5"),
    "rotary_dim_within_head": (dict(head_dim=16, rotary_dim=18), r"rotary_dim .* got 18"),
    "rotary_dim_not_negative": (dict(head_dim=16, rotary_dim=-2), r"rotary_dim .* got -2"),
    "layer_types_length": (dict(num_hidden_layers=3, layer_types=[LIN] * 4),
                           r"layer_types has 4 entries but num_hidden_layers is 3; give one entry per layer"),
    "layer_types_entries": (dict(num_hidden_layers=2, layer_types=[LIN, "sliding_attention"]),
                            r"layer_types has unknown entries \['sliding_attention'\]; allowed: "),
    "mlp_layer_types_length": (dict(num_hidden_layers=2, layer_types=[LIN] * 2, mlp_layer_types=["dense"]),
                               r"mlp_layer_types has 1 entries but num_hidden_layers is 2"),
    "mlp_layer_types_entries": (dict(num_hidden_layers=2, layer_types=[LIN] * 2, mlp_layer_types=["dense", "moe"]),
                                r"mlp_layer_types has unknown entries \['moe'\]"),
    "rope_type_known": (dict(rope_parameters={"rope_type": "spiral", "rope_theta": 1e4}),
                        r"rope_parameters.rope_type must be 'default' or one of transformers' .*got 'spiral'"),
    "rope_theta_positive": (dict(rope_theta=-5.0), r"rope_theta \(rope_parameters.rope_theta\) must be a number > 0, "
                                                   r"got -5.0"),
    "pad_token_in_vocab": (dict(vocab_size=50, pad_token_id=50),
                           r"pad_token_id must be None or a token id in \[0, vocab_size=50\), got 50"),
    "eos_tokens_in_vocab": (dict(vocab_size=50, eos_token_id=[1, 77]), r"eos_token_id .* got \[1, 77\]"),
}


@pytest.mark.parametrize("rule", CROSS_FIELD_RULES)
def test_each_cross_field_rule(rule):
    fields, message = CROSS_FIELD_RULES[rule]
    with pytest.raises(TNLConfigError, match=r"validator 'validate_architecture':\s+ValueError: " + message):
        TNLConfig(**fields)


def test_errors_are_value_errors_and_transformers_strict_errors():
    for make in (lambda: TNLConfig(hidden_size=0), lambda: TNLConfig(num_key_value_heads=3)):
        with pytest.raises(TNLConfigError) as excinfo:
            make()
        assert isinstance(excinfo.value, ValueError) and isinstance(excinfo.value, StrictDataclassError)


@pytest.mark.parametrize("fields, message", [
    (dict(hidden_size=-8), r"field 'hidden_size':\s+ValueError: Value must be a positive integer, got -8"),
    (dict(num_attention_heads=2.5), r"field 'num_attention_heads':\s+TypeError: .*expected int, got float"),
    (dict(num_hidden_layers=True), r"field 'num_hidden_layers':\s+TypeError: .*expected int, got bool"),
    (dict(initializer_range=2.0), r"field 'initializer_range':\s+ValueError: Value must be greater or equal to 0.0 "
                                  r"and smaller or equal to 1.0, got 2.0"),
    (dict(hidden_act="gelu"), r"field 'hidden_act':\s+TypeError: .*expected one of \('silu',\), got gelu"),
    (dict(linear_attn_gate="tanh"), r"field 'linear_attn_gate':[\s\S]*expected one of \('sigmoid', 'identity'\)"),
    (dict(linear_attn_activation_on="v"), r"field 'linear_attn_activation_on':[\s\S]*expected one of \('qkv', 'qk'\)"),
    (dict(layer_types="linear_attention"), r"field 'layer_types'"),
])
def test_single_field_checks_are_transformers_validation(fields, message):
    with pytest.raises(TNLConfigError, match=message):
        TNLConfig(**fields)


def test_assignment_is_validated_and_validate_rechecks_the_rules_between_fields(tmp_path):
    config = TNLConfig()
    with pytest.raises(TNLConfigError, match="field 'rms_norm_eps'"):
        config.rms_norm_eps = -1.0
    with pytest.raises(TNLConfigError, match="field 'mlp_alpha_factor'"):
        config.layernorm_mlp_alpha = "2"  # a MiniMax alias is validated as the field it names
    config.num_experts_per_tok = 9  # fine alone; the rule between fields is checked by validate()
    with pytest.raises(TNLConfigError, match=r"num_experts_per_tok \(9\) cannot exceed num_local_experts \(8\)"):
        config.validate()
    with pytest.raises(TNLConfigError, match="num_experts_per_tok"):
        config.save_pretrained(tmp_path)  # transformers validates before writing
    assert not (tmp_path / "config.json").exists()


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


def test_original_minimax_spellings_map_onto_fields_both_ways():
    config = TNLConfig(num_hidden_layers=2, layer_types=[LIN, LIN], layernorm_linear_attention_alpha=2.0,
                       layernorm_mlp_beta=0.5, num_experts=4)
    assert (config.linear_attn_alpha_factor, config.mlp_beta_factor, config.num_local_experts) == (2.0, 0.5, 4)
    assert (config.layernorm_linear_attention_alpha, config.layernorm_mlp_beta, config.num_experts) == (2.0, 0.5, 4)
    config.attn_type_list = [1, 0]
    assert config.layer_types == ["full_attention", LIN] and config.attn_type_list == [1, 0]
    config.layernorm_full_attention_beta = 0.25
    assert config.full_attn_beta_factor == 0.25
    saved = config.to_dict()  # the aliases are read and written, never serialised
    assert not {"attn_type_list", "num_experts", "layernorm_mlp_beta", "rope_theta"} & set(saved)
    assert saved["mlp_beta_factor"] == 0.5 and saved["layer_types"] == ["full_attention", LIN]


@pytest.mark.parametrize("value", [[0, 2], [0, True], [0.0, 1.0], "01"])
def test_attn_type_list_takes_zeros_and_ones(value):
    with pytest.raises(ValueError, match=r"attn_type_list entries must be 0 \(linear\) or 1 \(softmax\)"):
        TNLConfig(num_hidden_layers=2, attn_type_list=value)


def test_dropped_and_ignored_keys_of_old_config_files_are_accepted(tmp_path):
    """block_size (MiniMax's lightning block; TNL's kernels pick their own) is no longer a field: old TNL and
    MiniMax config.json files that carry it load, and it is not written back; likewise the original
    layernorm_full_attention_eps."""
    old = TNLConfig(num_hidden_layers=2, layer_types=[LIN, "full_attention"]).to_dict()
    old.update(block_size=128, layernorm_full_attention_eps=1e-5, shared_moe_mode="sigmoid", hidden_act="silu")
    (tmp_path / "config.json").write_text(json.dumps(old))
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, TNLConfig)
    assert not {"block_size", "layernorm_full_attention_eps", "shared_moe_mode"} & set(config.to_dict())
    assert not hasattr(config, "block_size")  # the MiniMax export writes MiniMax's own value (MINIMAX_BLOCK_SIZE)
    config.save_pretrained(tmp_path / "again")
    assert "block_size" not in json.loads((tmp_path / "again" / "config.json").read_text())
    with pytest.raises(ValueError, match="shared_moe_mode"):
        TNLConfig(shared_moe_mode="softmax")


def test_dropping_block_size_keeps_snapshot_fingerprints():
    """Snapshots written before block_size was dropped still load: the fingerprint of the same computation is the
    same (these are the values the previous TNLConfig gave)."""
    assert config_fingerprint(TNLConfig()) == "dc49b68293eb4d3eb3bbbdd13468dcd42d3398832cdabbb014f0274cccc41b30"
    minimax = AutoConfig.from_pretrained(CONFIGS / "minimax-text-01.json")
    assert config_fingerprint(minimax) == "51541b82acb5aae363f9ad7d05bd7c23f22c779e5fcfa202ad92cabebe017ad3"


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
    assert "block_size" not in config.to_dict()  # the file carries it; it is ignored
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
