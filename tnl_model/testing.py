"""Tiny randomly initialised TNL models for tests and examples."""

import torch

from .configuration_tnl import TNLConfig
from .modeling_tnl import TNLForCausalLM


def tiny_config(**overrides) -> TNLConfig:
    """A 4-layer hybrid with layer 0 linear (the real MiniMax layout), GQA, partial rotary and a dense layer."""
    fields = dict(
        vocab_size=97, hidden_size=48, intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, rotary_dim=8, max_position_embeddings=4096,
        layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
        mlp_layer_types=["sparse", "sparse", "dense", "sparse"], num_local_experts=4, num_experts_per_tok=2,
        full_attn_alpha_factor=1.3, linear_attn_alpha_factor=1.3, mlp_alpha_factor=1.3,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    fields.update(overrides)
    return TNLConfig(**fields)


def build_model(config: TNLConfig, seed: int = 0, dtype=torch.float32) -> TNLForCausalLM:
    """A model in eval mode with weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return TNLForCausalLM(config).to(dtype).eval()


def random_ids(batch: int, length: int, seed: int = 1, vocab: int = 97, low: int = 3) -> torch.Tensor:
    """Token ids that avoid the special ids below ``low``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab, (batch, length), generator=generator)
