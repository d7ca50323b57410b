"""Bad configs, bad inputs and bad files: each gets a clear ValueError naming the problem, and
no file is modified by a failed load."""

import hashlib
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import tnl_model  # noqa: F401
from tnl_model import TNLConfig, TNLForCausalLM
from tnl_model.checkpoint_io import CheckpointError
from tnl_model.load_checks import (CheckpointMismatchError, load_model, prepare_from_pretrained_kwargs,
                                   read_safetensors_header,
                                   strict_loading_installed, verify_checkpoint)
from tnl_model.testing import build_model, random_ids, tiny_config

HOOK_MISSING = ("StrictLoadingMixin is not among TNLPreTrainedModel's bases: apply the one-line hook from "
                "tnl_model/load_checks.py's docstring to modeling_tnl.py")

# ---------------------------------------------------------------------------------------- configs

BAD_CONFIGS = {
    # (transformers itself renames the legacy "mamba" -> "linear_attention", "attention" -> "full_attention")
    "unknown_layer_type": (dict(layer_types=["linear_attention", "retnet", "linear_attention", "linear_attention"]),
                           r"layer_types has unknown entries \['retnet'\]"),
    "sliding_window_layer_type": (dict(layer_types=["sliding_attention"] * 4),
                                  r"layer_types has unknown entries \['sliding_attention'\]"),
    "layer_types_wrong_length": (dict(layer_types=["linear_attention"] * 3),
                                 r"layer_types has 3 entries but num_hidden_layers is 4"),
    "mlp_layer_types_wrong_length": (dict(mlp_layer_types=["sparse"] * 5),
                                     r"mlp_layer_types has 5 entries but num_hidden_layers is 4"),
    "unknown_mlp_type": (dict(mlp_layer_types=["sparse", "moe", "dense", "sparse"]),
                         r"mlp_layer_types has unknown entries \['moe'\]"),
    "kv_heads_not_dividing": (dict(num_attention_heads=4, num_key_value_heads=3),
                              r"num_key_value_heads \(3\) must divide num_attention_heads \(4\)"),
    "experts_fewer_than_top_k": (dict(num_local_experts=2, num_experts_per_tok=3),
                                 r"num_experts_per_tok \(3\) cannot exceed num_local_experts \(2\)"),
    # single-field types and ranges: transformers' strict-dataclass wording, "field '<name>':" then the rule
    "negative_hidden_size": (dict(hidden_size=-48), r"field 'hidden_size':\s+ValueError: Value must be a positive "
                                                    r"integer, got -48"),
    "negative_intermediate_size": (dict(intermediate_size=-1), r"field 'intermediate_size':.*\s.*positive integer"),
    "zero_layers": (dict(num_hidden_layers=0, layer_types=[], mlp_layer_types=[]),
                    r"field 'num_hidden_layers':\s+ValueError: Value must be a positive integer, got 0"),
    "negative_vocab": (dict(vocab_size=-5),
                       r"field 'vocab_size':\s+ValueError: Value must be a positive integer, got -5"),
    "negative_shared_expert": (dict(shared_intermediate_size=-16),
                               r"field 'shared_intermediate_size':\s+ValueError: Value must be greater or equal to 0, "
                               r"got -16"),
    "odd_rotary_dim": (dict(rotary_dim=7), r"rotary_dim must be an even number in \[0, head_dim=12\], got 7"),
    "rotary_dim_beyond_head_dim": (dict(rotary_dim=16), r"rotary_dim must be an even number"),
    "fractional_heads": (dict(num_attention_heads=2.5), r"field 'num_attention_heads':\s+TypeError: Field "
                                                        r"'num_attention_heads' expected int, got float \(value: 2.5\)"),
    "negative_aux_coef": (dict(router_aux_loss_coef=-0.1),
                          r"field 'router_aux_loss_coef':\s+ValueError: Value must be greater or equal to 0.0, "
                          r"got -0.1"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_is_a_value_error_naming_the_field(case):
    overrides, message = BAD_CONFIGS[case]
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_bad_config_json_on_disk_is_a_value_error(tmp_path):
    good = tiny_config()
    good.save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text().replace('"num_experts_per_tok": 2', '"num_experts_per_tok": 9')
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=r"num_experts_per_tok \(9\) cannot exceed num_local_experts \(4\)"):
        TNLConfig.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config(max_position_embeddings=64))


@pytest.mark.parametrize("bad_id", [97, 10**6, -1])
def test_token_ids_outside_the_vocabulary(model, bad_id):
    ids = random_ids(2, 6)
    ids[1, 3] = bad_id
    with pytest.raises(ValueError, match=rf"input_ids contains token id {bad_id}, outside the vocabulary \[0, 97\)"):
        model(ids)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate(ids, max_new_tokens=2)


def test_float_token_ids(model):
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        model(torch.rand(1, 4))


def test_empty_prompt(model):
    with pytest.raises(ValueError, match="input_ids is empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)


@pytest.mark.parametrize("shape", [(2, 7), (1, 6), (2, 6, 1), (6,)])
def test_attention_mask_of_the_wrong_shape(model, shape):
    with pytest.raises(ValueError, match=r"attention_mask must be 2-D \[batch, past \+ new tokens\] = \[2, 6\]"):
        model(random_ids(2, 6), attention_mask=torch.ones(shape, dtype=torch.long))


def test_attention_mask_that_is_not_a_tensor(model):
    with pytest.raises(ValueError, match="attention_mask must be a 2-D .* tensor of 1s and 0s, got a dict"):
        model(random_ids(2, 6), attention_mask={"full_attention": torch.ones(2, 1, 6, 6)})


def test_static_cache_is_refused_by_name(model):
    # StaticCache would otherwise reach the model with per-layer-type 4-D masks and fail obscurely.
    with pytest.raises(ValueError, match="supports transformers' DynamicCache only, got a StaticCache"):
        model.generate(random_ids(1, 5), max_new_tokens=2, do_sample=False, cache_implementation="static")


def test_prompt_longer_than_max_position_embeddings_runs(model):
    # As every RoPE model in transformers: the softmax layers extrapolate (tests/model/test_rope.py: one warning).
    assert torch.isfinite(model(random_ids(1, 65)).logits).all()
    out = model.generate(random_ids(1, 60), max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert out.shape[1] == 70


def test_all_linear_model_has_no_position_limit():
    model = build_model(tiny_config(max_position_embeddings=16, layer_types=["linear_attention"] * 4))
    assert torch.isfinite(model(random_ids(1, 40)).logits).all()


# ---------------------------------------------------------------------------------------- files


def _digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture()
def model_dir(tmp_path):
    directory = tmp_path / "model"
    build_model(tiny_config()).save_pretrained(directory)
    return directory


LOADERS = {
    "load_model": lambda path, **kw: load_model(path, **kw),
    "AutoModelForCausalLM": lambda path, **kw: AutoModelForCausalLM.from_pretrained(path, **kw),
}


def _loader(name):
    if name == "AutoModelForCausalLM" and not strict_loading_installed():
        pytest.fail(HOOK_MISSING)
    return LOADERS[name]


@pytest.mark.parametrize("loader", LOADERS)
def test_truncated_safetensors(model_dir, loader):
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    before = _digest(model_dir)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or corrupt: its header describes "
                                              r"\d+ bytes but the file has \d+"):
        _loader(loader)(model_dir)
    assert _digest(model_dir) == before


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("damage", ["garbage", "empty", "header_cut"])
def test_corrupt_safetensors(model_dir, loader, damage):
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"garbage": b"\x93NUMPY" + bytes(200), "empty": b"", "header_cut": data[:50]}[damage])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is (truncated or )?corrupt"):
        _loader(loader)(model_dir)


@pytest.mark.parametrize("loader", LOADERS)
def test_checkpoint_from_a_different_config_lists_the_mismatched_tensors(model_dir, tmp_path, loader):
    """The directory's config.json was edited (6 experts instead of 4): every affected tensor is named."""
    (model_dir / "config.json").write_text(
        (model_dir / "config.json").read_text().replace('"num_local_experts": 4', '"num_local_experts": 6'))
    before = _digest(model_dir)
    with pytest.raises(CheckpointMismatchError) as excinfo:
        _loader(loader)(model_dir)
    message = str(excinfo.value)
    assert "9 tensor(s) have a different shape" in message
    for layer in (0, 1, 3):
        assert f"model.layers.{layer}.mlp.gate.weight: checkpoint [4, 48] vs model [6, 48]" in message
        assert f"model.layers.{layer}.mlp.experts.gate_up_proj: checkpoint [4, 64, 48] vs model [6, 64, 48]" in message
        assert f"model.layers.{layer}.mlp.experts.down_proj: checkpoint [4, 48, 32] vs model [6, 48, 32]" in message
    assert isinstance(excinfo.value, ValueError)
    assert _digest(model_dir) == before


@pytest.mark.parametrize("loader", LOADERS)
def test_checkpoint_with_missing_tensors_is_refused_unless_allowed(model_dir, loader):
    config = tiny_config(num_hidden_layers=5, layer_types=None, mlp_layer_types=None)
    config.save_pretrained(model_dir)  # a 5-layer config over a 4-layer checkpoint
    with pytest.raises(CheckpointMismatchError, match=r"lacks \d+ tensor\(s\) the model needs") as excinfo:
        _loader(loader)(model_dir)
    assert "model.layers.4.input_layernorm.weight" in str(excinfo.value)
    model = _loader(loader)(model_dir, allow_missing_weights=True)
    assert model.config.num_hidden_layers == 5


def test_a_base_model_checkpoint_loads_into_the_causal_lm_with_a_new_head(tmp_path):
    """transformers' standard flow: the body loads, the missing head is initialised (and transformers warns)."""
    source = build_model(tiny_config())
    source.model.save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    for name, tensor in source.model.state_dict().items():
        torch.testing.assert_close(model.model.state_dict()[name], tensor, atol=0, rtol=0)
    assert torch.isfinite(model.lm_head.weight).all() and model.lm_head.weight.abs().sum() > 0


def test_verify_checkpoint_reads_headers_only(model_dir):
    report = verify_checkpoint(model_dir)
    assert report.ok and report.num_tensors == len(build_model(tiny_config()).state_dict())
    report = verify_checkpoint(model_dir, tiny_config(hidden_size=64, head_dim=16))
    assert not report.ok and ("model.embed_tokens.weight", (97, 48), (97, 64)) in report.mismatched
    with pytest.raises(CheckpointMismatchError, match=r"model\.embed_tokens\.weight: checkpoint \[97, 48\] vs model "
                                                      r"\[97, 64\]"):
        report.raise_for_problems()
    header = read_safetensors_header(model_dir / "model.safetensors")
    assert header["model.layers.0.mlp.experts.gate_up_proj"] == ("F32", (4, 64, 48))


def _pickle_only_dir(model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    directory = tmp_path / "pickle_only"
    directory.mkdir()
    shutil.copy(model_dir / "config.json", directory / "config.json")
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    return directory, model


@pytest.mark.parametrize("loader", LOADERS)
def test_pickle_only_directory_is_refused_unless_the_user_opts_in(model_dir, tmp_path, loader, monkeypatch):
    directory, original = _pickle_only_dir(model_dir, tmp_path)
    unpickled = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: unpickled.append(k.get("weights_only")) or real_load(*a, **k))
    with pytest.raises(CheckpointError, match=r"only has pickle weights \(pytorch_model\.bin\).*refused.*"
                                              r"allow_pickle=True"):
        _loader(loader)(directory)
    with pytest.raises(CheckpointError, match="weights_only=False would unpickle"):
        _loader(loader)(directory, allow_pickle=True, weights_only=False)
    assert unpickled == []  # nothing was unpickled on the refused paths
    model = _loader(loader)(directory, allow_pickle=True)
    assert unpickled and all(flag is True for flag in unpickled)
    for (name, a), (_, b) in zip(original.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("loader", LOADERS)
def test_use_safetensors_false_needs_the_opt_in(model_dir, loader):
    """A directory with both formats: asking for the pickle one is the same opt-in."""
    torch.save(AutoModelForCausalLM.from_pretrained(model_dir).state_dict(), model_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        _loader(loader)(model_dir, use_safetensors=False)
    assert isinstance(_loader(loader)(model_dir), TNLForCausalLM)  # the safetensors file is used


def test_hub_repositories_are_forced_to_safetensors():
    """No network here: check the keyword arguments transformers would be called with."""
    assert prepare_from_pretrained_kwargs("org/model", {})["use_safetensors"] is True
    with pytest.raises(CheckpointError, match="use_safetensors=False would load pickle weights"):
        prepare_from_pretrained_kwargs("org/model", {"use_safetensors": False})
    assert prepare_from_pretrained_kwargs("org/model", {"use_safetensors": False}, allow_pickle=True) == {
        "use_safetensors": False, "weights_only": True}


def test_empty_directory(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="has no weights"):
        load_model(tmp_path)


def test_strict_loading_keeps_normal_loads_working(model_dir):
    """Tied embeddings, a base-model load and the decay buffers of old checkpoints are not errors."""
    tied = model_dir.parent / "tied"
    build_model(tiny_config(tie_word_embeddings=True)).save_pretrained(tied)
    assert verify_checkpoint(tied).ok
    model = load_model(tied)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert isinstance(load_model(model_dir), TNLForCausalLM)
