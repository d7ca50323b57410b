"""Parameter and memory accounting for TNL models, from a config alone or from a model.

Everything here can be computed from a :class:`~tnl_model.TNLConfig` without building
weights, so the 456B MiniMax-Text-01 shape is counted instantly::

    >>> from transformers import AutoConfig
    >>> config = AutoConfig.from_pretrained("configs/model/minimax-text-01.json")
    >>> total_parameters(config) / 1e9                               # doctest: +SKIP
    456.0
    >>> active_parameters(config, include_embeddings=False) / 1e9    # doctest: +SKIP
    45.9

What is counted (DESIGN.md 3):

* ``total_parameters``: every learned tensor once: token embedding, ``lm_head`` (unless
  tied to the embedding), per layer the attention projections (lightning:
  ``qkv_proj``, ``output_gate``, ``out_proj`` and the weighted output RMSNorm; softmax:
  ``q/k/v/o_proj``), the two RMSNorms, the router, all experts (``gate_up_proj`` and
  ``down_proj``), the shared expert and its mixing coefficient, or the dense FFN; the
  final RMSNorm. Decay rates are not parameters (computed from the config).
* ``active_parameters``: the parameters one token's forward pass multiplies with: as
  above, but only ``num_experts_per_tok`` of the ``num_local_experts`` routed experts
  of every MoE layer (the router itself, the shared expert and everything else is
  used by every token). With ``include_embeddings=False`` the embedding matrix and
  ``lm_head`` are left out: that is the convention of MiniMax-Text-01's published
  "45.9B activated" figure (with them it is 48.4B). The embedding lookup reads one row,
  so counting the whole matrix as "active" overstates compute; ``lm_head`` is a real
  matmul, but published MoE counts differ on it, hence the switch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .configuration_tnl import FULL, LINEAR, TNLConfig


@dataclass(frozen=True)
class ParameterBreakdown:
    """Parameter counts of a config, split by role."""

    embedding: int          # input embedding matrix
    lm_head: int            # 0 when tied to the embedding
    attention: int          # all token mixers (lightning + softmax), including the lightning output norm
    norms: int              # per-layer input/post-attention RMSNorms and the final norm
    routers: int            # MoE router weights
    routed_experts: int     # every routed expert of every MoE layer
    routed_experts_active: int  # num_experts_per_tok experts per MoE layer
    shared_experts: int     # shared experts and their mixing coefficients
    dense_mlps: int         # dense (non-MoE) FFN layers

    @property
    def total(self) -> int:
        return (self.embedding + self.lm_head + self.attention + self.norms + self.routers + self.routed_experts
                + self.shared_experts + self.dense_mlps)

    def active(self, include_embeddings: bool = True) -> int:
        body = (self.attention + self.norms + self.routers + self.routed_experts_active + self.shared_experts
                + self.dense_mlps)
        return body + (self.embedding + self.lm_head if include_embeddings else 0)


def _config_of(model_or_config) -> TNLConfig:
    if isinstance(model_or_config, TNLConfig):
        return model_or_config
    config = getattr(model_or_config, "config", None)
    if isinstance(config, TNLConfig):
        return config
    raise TypeError(f"expected a TNLConfig or a TNL model, got {type(model_or_config).__name__}")


def parameter_breakdown(config: TNLConfig) -> ParameterBreakdown:
    """Exact parameter counts of the model that ``TNLForCausalLM(config)`` builds."""
    d_model, heads, kv_heads, head_dim = (config.hidden_size, config.num_attention_heads,
                                          config.num_key_value_heads, config.head_dim)
    inner = heads * head_dim
    lightning = 3 * d_model * inner + d_model * inner + inner * d_model
    lightning += inner if config.linear_attn_norm == "rmsnorm" else 0
    softmax = d_model * inner + 2 * d_model * kv_heads * head_dim + inner * d_model
    attention = sum(lightning if kind == LINEAR else softmax for kind in config.layer_types)

    per_expert = 3 * config.intermediate_size * d_model  # gate + up ([2I, D]) and down ([D, I])
    sparse_layers = sum(kind == "sparse" for kind in config.mlp_layer_types)
    dense_layers = len(config.mlp_layer_types) - sparse_layers
    shared = 0
    if config.shared_intermediate_size > 0:
        shared = sparse_layers * (3 * config.shared_intermediate_size * d_model + d_model)
    embedding = config.vocab_size * d_model
    return ParameterBreakdown(
        embedding=embedding,
        lm_head=0 if config.tie_word_embeddings else embedding,
        attention=attention,
        norms=(2 * config.num_hidden_layers + 1) * d_model,
        routers=sparse_layers * config.num_local_experts * d_model,
        routed_experts=sparse_layers * config.num_local_experts * per_expert,
        routed_experts_active=sparse_layers * config.num_experts_per_tok * per_expert,
        shared_experts=shared,
        dense_mlps=dense_layers * 3 * config.dense_intermediate_size * d_model,
    )


def _numel(param: torch.Tensor) -> int:
    # ZeRO-3 partitions parameters in place and keeps the full size in ds_numel.
    return int(getattr(param, "ds_numel", param.numel()))


def total_parameters(model_or_config, include_embeddings: bool = True) -> int:
    """Number of parameters (tied weights counted once).

    From a config: the exact count of ``TNLForCausalLM(config)``. From a model: the
    model's own parameters (so a ``TNLModel`` has no ``lm_head``), which also works
    on the meta device and under ZeRO-3 partitioning.
    """
    if isinstance(model_or_config, TNLConfig):
        breakdown = parameter_breakdown(model_or_config)
        return breakdown.total - (0 if include_embeddings else breakdown.embedding + breakdown.lm_head)
    model = model_or_config
    _config_of(model)
    excluded = set()
    if not include_embeddings:
        excluded = {id(p) for m in (model.get_input_embeddings(), _output_embeddings(model)) if m is not None
                    for p in m.parameters()}
    seen, total = set(), 0
    for param in model.parameters():
        if id(param) in seen or id(param) in excluded:
            continue
        seen.add(id(param))
        total += _numel(param)
    return total


def _output_embeddings(model):
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if getter is not None else None


def active_parameters(model_or_config, include_embeddings: bool = True) -> int:
    """Parameters used for one token: all but the ``E - k`` routed experts each MoE layer skips.

    ``include_embeddings=False`` leaves out the embedding and ``lm_head`` matrices, the
    convention of MiniMax-Text-01's published 45.9B (see the module docstring).
    """
    config = _config_of(model_or_config)
    if isinstance(model_or_config, TNLConfig):
        return parameter_breakdown(config).active(include_embeddings)
    from .moe import TNLExperts

    total = total_parameters(model_or_config, include_embeddings=include_embeddings)
    for module in model_or_config.modules():
        if isinstance(module, TNLExperts):
            num_experts = tuple(getattr(module.gate_up_proj, "ds_shape", module.gate_up_proj.shape))[0]
            expert_params = _numel(module.gate_up_proj) + _numel(module.down_proj)
            unused = num_experts - min(config.num_experts_per_tok, num_experts)
            total -= expert_params * unused // num_experts
    return total


def recurrent_state_bytes(config: TNLConfig, batch: int = 1) -> int:
    """Bytes of the fp32 lightning-attention states of ``batch`` sequences (independent of length).

    Each lightning layer keeps ``[batch, heads, head_dim, head_dim]`` fp32 (DESIGN.md 5).
    """
    per_layer = config.num_attention_heads * config.head_dim * config.head_dim * 4
    return batch * per_layer * sum(kind == LINEAR for kind in config.layer_types)


def kv_cache_bytes_per_token(config: TNLConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes the softmax layers' key/value cache grows by per token and sequence."""
    element = torch.empty((), dtype=dtype).element_size()
    per_layer = 2 * config.num_key_value_heads * config.head_dim * element
    return per_layer * sum(kind == FULL for kind in config.layer_types)


def cache_bytes(config: TNLConfig, length: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
    """Whole generation cache for ``batch`` sequences of ``length`` tokens."""
    return recurrent_state_bytes(config, batch) + batch * length * kv_cache_bytes_per_token(config, dtype)


def format_count(n: int) -> str:
    """``456_012_345_678 -> '456.01B'``."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


__all__ = ["ParameterBreakdown", "parameter_breakdown", "total_parameters", "active_parameters",
           "recurrent_state_bytes", "kv_cache_bytes_per_token", "cache_bytes", "format_count", "format_bytes"]
