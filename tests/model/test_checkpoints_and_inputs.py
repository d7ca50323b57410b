"""save_pretrained / from_pretrained round trips, dtype handling, and clear errors on bad input."""

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoModelForCausalLM

import tnl_model  # noqa: F401
from tnl_model import TNLForCausalLM, TNLModel
from tnl_model.checkpoint_io import CheckpointError, SafetensorsDirectory
from tnl_model.testing import build_model, random_ids, tiny_config


@torch.no_grad()
def test_save_then_auto_load_is_bit_exact(tmp_path):
    model = build_model(tiny_config(shared_intermediate_size=16))
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files and "config.json" in files and not [f for f in files if f.endswith(".bin")]
    keys = set(safe_open(str(tmp_path / "model.safetensors"), "pt").keys())
    assert not [k for k in keys if "slope" in k or "decay" in k]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, TNLForCausalLM)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = random_ids(2, 33)
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert isinstance(AutoModel.from_pretrained(tmp_path), TNLModel)


@torch.no_grad()
def test_bf16_load_keeps_decays_and_state_in_fp32(tmp_path):
    build_model(tiny_config()).save_pretrained(tmp_path)
    legacy_spelling = AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert legacy_spelling.lm_head.weight.dtype == torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    out = model(random_ids(1, 9), use_cache=True)
    assert out.cache.layers[0].recurrent_states[0].dtype == torch.float32
    assert model.model.layers[0].self_attn.slopes(torch.device("cpu")).dtype == torch.float32


@torch.no_grad()
def test_decay_rates_survive_construction_that_casts_new_tensors(monkeypatch):
    """DeepSpeed's zero.Init (ZeRO-3 construction) casts every floating tensor made by torch.tensor,
    torch.empty, ... during __init__ to the training dtype; the fp32 decay rates must come out exact."""
    from tnl_kernels import build_slopes

    reference = build_model(tiny_config())
    make_tensor = torch.tensor

    def like_zero_init(*args, **kwargs):
        tensor = make_tensor(*args, **kwargs)
        return tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "tensor", like_zero_init)
    model = build_model(tiny_config())
    monkeypatch.undo()
    ids = random_ids(2, 30)
    assert torch.equal(model(ids).logits, reference(ids).logits)
    attention = model.model.layers[2].self_attn
    assert torch.equal(attention.slopes(torch.device("cpu")), build_slopes(4, 2, 4))


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("enable", ["activation_checkpointing_enable", "gradient_checkpointing_enable"])
def test_activation_checkpointing_gives_the_same_gradients(enable):
    """transformers 5.24 renamed gradient_checkpointing_enable; the old name stays until v6."""
    config = tiny_config()
    ids = random_ids(2, 20)
    grads = []
    for checkpointing in (False, True):
        model = build_model(config).train()
        if checkpointing:
            getattr(model, enable)()
            assert model.model.gradient_checkpointing
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_loss_includes_aux_and_z_terms():
    model = build_model(tiny_config(router_z_loss_coef=0.01)).train()
    ids = random_ids(2, 16)
    out = model(ids, labels=ids)
    expected = out.lm_loss + 0.001 * out.aux_loss + 0.01 * out.z_loss
    torch.testing.assert_close(out.loss, expected)
    assert out.aux_loss > 0 and out.z_loss > 0
    out.loss.backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [97, 500, -1])
def test_token_ids_outside_the_vocabulary_are_a_clear_error(bad):
    model = build_model(tiny_config())
    ids = random_ids(1, 5)
    ids[0, 2] = bad
    with pytest.raises(ValueError, match=f"token id {bad}.*vocabulary"):
        model(ids)


def test_empty_prompt_and_bad_mask_are_clear_errors():
    model = build_model(tiny_config())
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must be 2-D"):
        model(random_ids(2, 5), attention_mask=torch.ones(2, 4))


def test_pickle_only_directory_is_refused(tmp_path):
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        SafetensorsDirectory(tmp_path)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    build_model(tiny_config()).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt|unreadable"):
        reader = SafetensorsDirectory(tmp_path)
        for key in reader.keys():
            reader.get(key)
