"""Our model vs transformers' MiniMaxForCausalLM, through the converter, both directions.

transformers is the oracle only where it is correct: power-of-two head counts and
full rotary. Partial rotary and non-power-of-two heads are checked against our own
independent references, and the tests show that transformers differs there.
"""

import json
import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, MiniMaxConfig, MiniMaxForCausalLM

import tnl_model  # noqa: F401
from tnl_kernels import alibi_base_slopes, build_slopes
from tnl_kernels.reference import lightning_attn_recurrent
from tnl_model.convert import from_minimax, main as convert_main
from tnl_model.testing import random_ids

PARITY_RTOL = 1e-5  # relative L2 error of fp32 logits


def minimax_model(heads=4, layer_types=None, seed=0, **extra):
    layer_types = layer_types or ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
    config = MiniMaxConfig(
        vocab_size=101, hidden_size=16 * heads, intermediate_size=40, num_hidden_layers=len(layer_types),
        num_attention_heads=heads, num_key_value_heads=heads // 2 if heads % 2 == 0 else heads, head_dim=16,
        num_local_experts=4, num_experts_per_tok=2, layer_types=layer_types, max_position_embeddings=1024,
        full_attn_alpha_factor=1.9, linear_attn_alpha_factor=1.9, mlp_alpha_factor=1.9, **extra,
    )
    torch.manual_seed(seed)
    return MiniMaxForCausalLM(config).eval()


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("layer_types", [
    ["linear_attention", "full_attention", "linear_attention", "linear_attention"],
    ["full_attention", "linear_attention", "linear_attention", "full_attention"],
], ids=["layer0_linear", "layer0_softmax"])
@torch.no_grad()
def test_from_minimax_gives_the_same_logits(tmp_path, layer_types):
    theirs = minimax_model(layer_types=layer_types)
    theirs.save_pretrained(tmp_path / "minimax")
    assert convert_main(["from-minimax", str(tmp_path / "minimax"), str(tmp_path / "tnl")]) == 0
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "tnl").eval()
    ids = random_ids(2, 300, vocab=101)
    error = relative_error(ours(ids).logits, theirs(ids).logits)
    print(f"from-minimax parity ({layer_types[0]} first): relative logit error {error:.2e}")
    assert error <= PARITY_RTOL


@torch.no_grad()
def test_to_minimax_loads_in_transformers_with_the_same_logits(tmp_path):
    theirs = minimax_model(seed=3)
    theirs.save_pretrained(tmp_path / "minimax")
    from_minimax(tmp_path / "minimax", tmp_path / "tnl")
    assert convert_main(["to-minimax", str(tmp_path / "tnl"), str(tmp_path / "back")]) == 0  # the CLI
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    assert exported["attn_type_list"] == [0, 1, 0, 0] and exported["layer_types"][1] == "full_attention"
    assert exported["layernorm_mlp_alpha"] == exported["mlp_alpha_factor"] == 1.9
    reloaded = MiniMaxForCausalLM.from_pretrained(tmp_path / "back").eval()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "tnl").eval()
    ids = random_ids(1, 200, vocab=101)
    assert relative_error(reloaded(ids).logits, ours(ids).logits) <= PARITY_RTOL
    assert torch.equal(reloaded(ids).logits, theirs(ids).logits)  # same weights, same code: bit-identical


def test_converted_checkpoint_has_no_decay_buffers_and_no_pickles(tmp_path):
    minimax_model().save_pretrained(tmp_path / "minimax")
    from_minimax(tmp_path / "minimax", tmp_path / "tnl")
    from safetensors import safe_open
    keys = list(safe_open(str(tmp_path / "tnl" / "model.safetensors"), "pt").keys())
    assert not [k for k in keys if "decay" in k or "slope" in k]
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys
    assert not list((tmp_path / "tnl").glob("*.bin"))


def test_original_spelling_config_converts(tmp_path):
    """A config in MiniMax-Text-01's original spelling (attn_type_list, layernorm_*, rotary_dim)."""
    theirs = minimax_model()
    theirs.save_pretrained(tmp_path / "minimax")
    import json
    path = tmp_path / "minimax" / "config.json"
    raw = json.loads(path.read_text())
    for key in ("layer_types", "full_attn_alpha_factor", "linear_attn_alpha_factor", "mlp_alpha_factor", "rope_parameters"):
        raw.pop(key)
    raw.update(attn_type_list=[0, 1, 0, 0], layernorm_full_attention_alpha=1.9, layernorm_linear_attention_alpha=1.9,
               layernorm_mlp_alpha=1.9, rotary_dim=8, rope_theta=1e7, postnorm=True)
    path.write_text(json.dumps(raw))
    config = from_minimax(tmp_path / "minimax", tmp_path / "tnl")
    assert config.layer_types[1] == "full_attention" and config.rotary_dim == 8 and config.rope_theta == 1e7
    assert config.mlp_alpha_factor == 1.9


@torch.no_grad()
def test_partial_rotary_matches_an_independent_attention_reference():
    """MiniMax-Text-01 rotates 64 of 128 dims: ours does; transformers rotates all of them."""
    from tnl_model.testing import build_model, tiny_config
    model = build_model(tiny_config(rotary_dim=4, head_dim=12, num_key_value_heads=2))
    layer = model.model.layers[1].self_attn
    x = torch.randn(2, 19, model.config.hidden_size)
    positions = torch.arange(19).expand(2, -1)
    ours, _ = layer(x, position_embeddings=model.model.rotary_emb(x, positions))

    def reference(x, rotary_dim):
        heads, kv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
        q = layer.q_proj(x).view(2, 19, heads, d)
        k = layer.k_proj(x).view(2, 19, kv, d).repeat_interleave(heads // kv, dim=2)
        v = layer.v_proj(x).view(2, 19, kv, d).repeat_interleave(heads // kv, dim=2)
        inv = 1.0 / (model.config.rope_theta ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
        angle = torch.arange(19).float()[:, None] * inv[None]  # [T, r/2]
        def rope(t):
            a, b, rest = t[..., : rotary_dim // 2], t[..., rotary_dim // 2 : rotary_dim], t[..., rotary_dim:]
            c, s = angle.cos()[None, :, None], angle.sin()[None, :, None]
            return torch.cat([a * c - b * s, b * c + a * s, rest], dim=-1)
        q, k = rope(q), rope(k)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d)
        scores = scores.masked_fill(torch.ones(19, 19).triu(1).bool(), float("-inf"))
        out = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(2, 19, heads * d)
        return layer.o_proj(out)

    torch.testing.assert_close(ours, reference(x, 4), atol=1e-5, rtol=1e-5)
    full_rotary = reference(x, 12)  # transformers' behaviour: every dim rotated
    assert relative_error(ours, full_rotary) > 1e-2


def test_non_power_of_two_heads_use_the_alibi_fallback_slopes():
    # ALiBi for 6 heads: the 4-head slopes, then every other of the 8-head slopes.
    expected = [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]
    assert alibi_base_slopes(6) == pytest.approx(expected)
    transformers_base = [(1 / 2 ** (8 / 6)) ** (h + 1) for h in range(6)]
    assert max(abs(a - b) for a, b in zip(transformers_base, expected)) > 0.05  # transformers' formula is wrong here
    # layer factor 1 - l/(L-1) + 1e-5
    torch.testing.assert_close(build_slopes(6, 2, 5), torch.tensor(expected) * (1 - 2 / 4 + 1e-5))


@torch.no_grad()
def test_six_head_model_lightning_layer_matches_fp64_recurrence(tmp_path):
    theirs = minimax_model(heads=6, layer_types=["linear_attention", "linear_attention", "full_attention"])
    theirs.save_pretrained(tmp_path / "minimax")
    from_minimax(tmp_path / "minimax", tmp_path / "tnl")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "tnl").eval()
    layer = ours.model.layers[1].self_attn
    x = torch.randn(1, 70, ours.config.hidden_size)
    q, k, v = layer._project_qkv(x, None)
    expected, _ = lightning_attn_recurrent(q.double(), k.double(), v.double(), torch.tensor(alibi_base_slopes(6)).double() * (1 - 1 / 2 + 1e-5))
    out, _ = layer(x)
    reference = layer.out_proj(torch.sigmoid(layer.output_gate(x)) * layer.norm(expected.float().reshape(1, 70, -1)))
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-4)


def _tnl_checkpoint(path, **overrides):
    from tnl_model.testing import build_model, tiny_config
    model = build_model(tiny_config(mlp_layer_types=["sparse"] * 4, rotary_dim=12, **overrides))
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("overrides, named", [
    (dict(postnorm=False), "postnorm=False"),
    (dict(linear_attn_norm_eps=1e-2), "linear_attn_norm_eps=0.01"),
], ids=["prenorm", "linear_attn_norm_eps"])
def test_to_minimax_refuses_settings_transformers_minimax_cannot_carry(tmp_path, capsys, overrides, named):
    _tnl_checkpoint(tmp_path / "tnl", **overrides)
    assert convert_main(["to-minimax", str(tmp_path / "tnl"), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "cannot be expressed in the MiniMax format" in error and named in error
    assert not (tmp_path / "out").exists()


def _renamed(directory, rename):
    from safetensors.torch import load_file, save_file
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    save_file({rename(k): v for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


@torch.no_grad()
def test_shared_expert_uses_the_minimax_text_01_layout_both_ways(tmp_path, capsys):
    """MiniMax-Text-01's code and vLLM keep shared_mlp and coefficient on the decoder layer."""
    from safetensors import safe_open
    ours = _tnl_checkpoint(tmp_path / "tnl", shared_intermediate_size=16)
    assert convert_main(["to-minimax", str(tmp_path / "tnl"), str(tmp_path / "mm")]) == 0
    assert "transformers' MiniMaxForCausalLM has no shared expert" in capsys.readouterr().out
    keys = set(safe_open(str(tmp_path / "mm" / "model.safetensors"), "pt").keys())
    for part in ("shared_mlp.gate_proj", "shared_mlp.up_proj", "shared_mlp.down_proj", "coefficient"):
        assert f"model.layers.3.{part}.weight" in keys
    assert not [k for k in keys if "block_sparse_moe.shared_mlp" in k or "block_sparse_moe.coefficient" in k]
    ids = random_ids(1, 9, vocab=97)
    from_minimax(tmp_path / "mm", tmp_path / "back")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert torch.equal(back(ids).logits, ours(ids).logits)
    # Checkpoints written by earlier versions of to-minimax (shared expert under block_sparse_moe) still import.
    old_layout = re.compile(r"\.layers\.(\d+)\.(shared_mlp|coefficient)\.")
    _renamed(tmp_path / "mm", lambda k: old_layout.sub(r".layers.\1.block_sparse_moe.\2.", k))
    from_minimax(tmp_path / "mm", tmp_path / "old")
    old = AutoModelForCausalLM.from_pretrained(tmp_path / "old").eval()
    assert torch.equal(old(ids).logits, ours(ids).logits)
