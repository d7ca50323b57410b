"""PEFT LoRA on the attention projections (nn.Linear) and on the stacked expert weights
(raw nn.Parameters, through peft's ``target_parameters``): wrap, train, save, reload, merge."""

import pytest
import torch

from tnl_model.testing import build_model, random_ids, tiny_config

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

LINEAR_TARGETS = ["qkv_proj", "output_gate", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj",
                  "gate_proj", "up_proj", "down_proj"]
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _config():
    return tiny_config(shared_intermediate_size=16)


def test_lora_on_attention_and_experts_trains_saves_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = build_model(_config(), seed=0).train()
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LINEAR_TARGETS,
                      target_parameters=EXPERT_TARGETS)
    peft_model = get_peft_model(model, lora)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for module in ("qkv_proj", "output_gate", "out_proj", "q_proj", "o_proj", "shared_mlp.gate_proj",
                   "layers.2.mlp.down_proj"):
        assert any(module in n for n in trainable), module
    assert any("mlp.experts" in n for n in trainable)  # the stacked experts got adapters too
    frozen_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}

    ids = random_ids(2, 16, seed=7)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(4):
        out = peft_model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for name, value in frozen_before.items():  # base weights untouched
        assert torch.equal(value, dict(peft_model.named_parameters())[name]), name

    peft_model.eval()
    with torch.no_grad():
        reference = peft_model(ids).logits
        base_logits = build_model(_config(), seed=0)(ids).logits
    assert (reference - base_logits).abs().max() > 1e-3  # the adapters changed the model
    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert not list((tmp_path / "adapter").glob("*.bin"))

    reloaded = PeftModel.from_pretrained(build_model(_config(), seed=0), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, reference, atol=1e-6, rtol=0)
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, reference, atol=1e-5, rtol=0)
    assert type(merged).__name__ == "TNLForCausalLM"


def test_lora_generation_uses_the_cache_exactly():
    model = get_peft_model(build_model(_config()), LoraConfig(r=2, target_modules=["qkv_proj", "o_proj"],
                                                              init_lora_weights=False)).eval()
    prompt = random_ids(1, 9, seed=2)
    with torch.no_grad():
        cached = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
        uncached = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
