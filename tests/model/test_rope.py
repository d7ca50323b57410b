"""RoPE of the softmax layers comes from transformers' rope utilities, on the first rotary_dim dims only.

Oracle: transformers' own Llama rotary embedding on a config whose whole head is our rotated part
(head_dim = rotary_dim): same inverse frequencies and attention scaling for every rope_type, by an
independent route (no partial_rotary_factor involved).
"""

import logging

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from tnl_model.testing import build_model, random_ids, tiny_config

SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}


def _config(rope=None, **overrides):
    rope_parameters = {"rope_theta": 500.0, **(rope or {"rope_type": "default"})}
    return tiny_config(max_position_embeddings=64, rope_parameters=rope_parameters, **overrides)


@pytest.mark.parametrize("kind", ["default", *SCALINGS])
@pytest.mark.parametrize("head_dim,rotary_dim", [(12, 8), (44, 30), (16, 16)])
def test_frequencies_equal_transformers_llama_on_the_rotated_part(kind, head_dim, rotary_dim):
    rope = SCALINGS.get(kind, {"rope_type": "default"})
    config = _config(rope, head_dim=head_dim, rotary_dim=rotary_dim)
    ours = build_model(config).model.rotary_emb
    reference = LlamaRotaryEmbedding(LlamaConfig(
        hidden_size=rotary_dim * 4, num_attention_heads=4, head_dim=rotary_dim, max_position_embeddings=64,
        rope_parameters={"rope_theta": 500.0, **rope}))
    torch.testing.assert_close(ours.inv_freq, reference.inv_freq.float(), atol=0, rtol=1e-6)
    assert ours.attention_scaling == pytest.approx(reference.attention_scaling)
    x = torch.zeros(1, 1, dtype=torch.float32)
    positions = torch.arange(200)[None]  # past max_position_embeddings: dynamic scaling kicks in
    for got, want in zip(ours(x, positions), reference(x, positions)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_yarn_applies_its_attention_factor():
    rotary = build_model(_config(SCALINGS["yarn"])).model.rotary_emb
    assert rotary.attention_scaling > 1.0
    cos, sin = rotary(torch.zeros(1, 1), torch.arange(5)[None])
    torch.testing.assert_close(cos[0, 0], torch.full_like(cos[0, 0], rotary.attention_scaling))  # position 0
    torch.testing.assert_close(cos**2 + sin**2, torch.full_like(cos, rotary.attention_scaling**2))


@torch.no_grad()
def test_each_scaling_changes_the_outputs_where_it_should():
    ids = random_ids(1, 100)  # past max_position_embeddings=64
    default = build_model(_config())(ids).logits
    for kind, rope in SCALINGS.items():
        scaled = build_model(_config(rope))(ids).logits
        assert (scaled - default).abs().max() > 1e-5, kind
        if kind == "dynamic":  # within the trained length, dynamic NTK is plain RoPE
            torch.testing.assert_close(build_model(_config(rope))(ids[:, :60]).logits, default[:, :60], atol=1e-6,
                                       rtol=0)


@torch.no_grad()
def test_rope_parameters_changed_after_construction_reach_the_model():
    ids = random_ids(1, 20)
    config = _config()
    default = build_model(config)(ids).logits
    config.rope_parameters = {"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0}
    assert (build_model(config)(ids).logits - default).abs().max() > 1e-5


@torch.no_grad()
def test_all_linear_model_ignores_rope():
    ids = random_ids(1, 20)
    layers = ["linear_attention"] * 4
    torch.testing.assert_close(build_model(_config(SCALINGS["linear"], layer_types=layers))(ids).logits,
                               build_model(_config(layer_types=layers))(ids).logits, atol=0, rtol=0)


@torch.no_grad()
def test_positions_past_max_position_embeddings_run_with_one_warning(caplog):
    model = build_model(_config())
    with caplog.at_level(logging.WARNING):
        out = model.generate(random_ids(1, 60), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.shape == (1, 70)
    warnings = [r for r in caplog.records if "beyond max_position_embeddings=64" in r.getMessage()]
    assert len(warnings) <= 1  # warning_once: at most once per process (an earlier test may have seen it)
    assert torch.isfinite(model(random_ids(1, 100)).logits).all()


def test_frequencies_stay_fp32_in_a_bf16_model():
    model = build_model(_config(), dtype=torch.bfloat16)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, build_model(_config()).model.rotary_emb.inv_freq, atol=0, rtol=0)
