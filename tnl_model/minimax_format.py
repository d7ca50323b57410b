"""Mapping between MiniMax-Text-01 checkpoints and TNL checkpoints (DESIGN.md 6).

MiniMax on disk (the original release and transformers' ``save_pretrained``)::

    model.layers.{i}.block_sparse_moe.gate.weight             [E, D]
    model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight   [I, D]  gate
    model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight   [I, D]  up
    model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight   [D, I]  down
    model.layers.{i}.self_attn.{slope_rate,query_decay,...}           decay buffers (dropped)

TNL (and transformers' in-memory MiniMax) stacks the experts::

    model.layers.{i}.mlp.experts.gate_up_proj   [E, 2I, D]   (w1 rows, then w3 rows)
    model.layers.{i}.mlp.experts.down_proj      [E, D, I]

The optional shared expert sits on the decoder layer in MiniMax-Text-01 (its modeling code
and vLLM's ``MiniMaxText01DecoderLayer``) and in the MoE block in TNL::

    model.layers.{i}.shared_mlp.{gate,up,down}_proj.weight   <->  model.layers.{i}.mlp.shared_mlp.*
    model.layers.{i}.coefficient.weight                      <->  model.layers.{i}.mlp.coefficient.weight

transformers' ``MiniMaxForCausalLM`` has no shared expert. Every other name is shared. Config
fields are translated both ways; ``to-minimax`` writes both transformers' and the original spellings.
"""

import re

import torch

from .configuration_tnl import FULL, MINIMAX_BLOCK_SIZE, TNLConfig

DECAY_BUFFERS = re.compile(r"\.(slope_rate|query_decay|key_decay|diagonal_decay)$")
PER_EXPERT = re.compile(r"^(model\.layers\.\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w[123])\.weight$")
STACKED = re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
SHARED_ON_LAYER = re.compile(r"^(model\.layers\.\d+)\.(shared_mlp|coefficient)\.")  # MiniMax-Text-01 layout
SHARED_IN_MLP = re.compile(r"^(model\.layers\.\d+)\.mlp\.(shared_mlp|coefficient)\.")  # TNL layout

# transformers' MiniMaxLightningAttention builds its output norm with MiniMaxRMSNorm's default eps,
# whatever the config says.
MINIMAX_LINEAR_ATTN_NORM_EPS = 1e-6

# Config keys of a MiniMax config.json that are bookkeeping, not architecture.
_DROP_CONFIG_KEYS = {"architectures", "auto_map", "model_type", "transformers_version", "_name_or_path", "sliding_window"}


# ---------------------------------------------------------------- config

def config_from_minimax(minimax: dict) -> TNLConfig:
    """A TNLConfig with the same meaning as a MiniMax config.json (either spelling)."""
    if minimax.get("sliding_window") is not None:
        raise ValueError("MiniMax configs with sliding_window are not supported (MiniMax-Text-01 has none)")
    fields = {k: v for k, v in minimax.items() if k not in _DROP_CONFIG_KEYS}
    if "rotary_dim" not in fields:
        # transformers' MiniMax rotates every dim of the head; the original config states rotary_dim.
        heads = fields.get("num_attention_heads")
        fields["rotary_dim"] = fields.get("head_dim") or fields["hidden_size"] // heads
    fields.setdefault("postnorm", True)
    fields.setdefault("mlp_layer_types", ["sparse"] * fields["num_hidden_layers"])
    return TNLConfig(**fields)


def _check_expressible(config: TNLConfig) -> None:
    problems = []
    if "dense" in config.mlp_layer_types:
        problems.append("dense FFN layers (MiniMax layers are all MoE)")
    if config.linear_attn_norm != "rmsnorm":
        problems.append("linear_attn_norm='srmsnorm'")
    if config.linear_attn_gate != "sigmoid":
        problems.append("linear_attn_gate='identity'")
    if config.linear_attn_activation_on != "qkv":
        problems.append("linear_attn_activation_on='qk'")
    if not config.postnorm:
        problems.append("postnorm=False (transformers' MiniMax decoder layer is post-norm only)")
    if config.linear_attn_norm_eps != MINIMAX_LINEAR_ATTN_NORM_EPS:
        problems.append(f"linear_attn_norm_eps={config.linear_attn_norm_eps} (transformers' MiniMax always uses "
                        f"{MINIMAX_LINEAR_ATTN_NORM_EPS})")
    if problems:
        raise ValueError("this TNL model cannot be expressed in the MiniMax format: " + "; ".join(problems))


def config_to_minimax(config: TNLConfig) -> dict:
    """MiniMax config.json carrying transformers' and the original spellings with one meaning."""
    _check_expressible(config)
    theta = config.rope_theta
    scales = {
        "full_attn_alpha_factor": config.full_attn_alpha_factor,
        "full_attn_beta_factor": config.full_attn_beta_factor,
        "linear_attn_alpha_factor": config.linear_attn_alpha_factor,
        "linear_attn_beta_factor": config.linear_attn_beta_factor,
        "mlp_alpha_factor": config.mlp_alpha_factor,
        "mlp_beta_factor": config.mlp_beta_factor,
    }
    original_scales = {
        "layernorm_full_attention_alpha": config.full_attn_alpha_factor,
        "layernorm_full_attention_beta": config.full_attn_beta_factor,
        "layernorm_linear_attention_alpha": config.linear_attn_alpha_factor,
        "layernorm_linear_attention_beta": config.linear_attn_beta_factor,
        "layernorm_mlp_alpha": config.mlp_alpha_factor,
        "layernorm_mlp_beta": config.mlp_beta_factor,
    }
    return {
        "architectures": ["MiniMaxForCausalLM"],
        "model_type": "minimax",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": config.hidden_act,
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "num_local_experts": config.num_local_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
        "router_aux_loss_coef": config.router_aux_loss_coef,
        "block_size": MINIMAX_BLOCK_SIZE,
        # transformers' spelling
        "layer_types": list(config.layer_types),
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        **scales,
        # the original MiniMax-Text-01 spelling (read by vLLM and the original modeling code)
        "attn_type_list": [1 if kind == FULL else 0 for kind in config.layer_types],
        "rotary_dim": config.rotary_dim,
        "rope_theta": theta,
        "postnorm": config.postnorm,
        "shared_intermediate_size": config.shared_intermediate_size,
        "shared_moe_mode": "sigmoid",
        **original_scales,
    }


# ---------------------------------------------------------------- weights

def tensors_from_minimax(source, config: TNLConfig):
    """Yield ``(tnl_name, tensor)`` from a MiniMax checkpoint (``SafetensorsDirectory``-like)."""
    per_expert: dict[str, dict[tuple[int, str], str]] = {}
    for key in source.keys():
        if DECAY_BUFFERS.search(key):
            continue  # decays are recomputed from the config
        match = PER_EXPERT.match(key)
        if match:
            per_expert.setdefault(match.group(1), {})[(int(match.group(2)), match.group(3))] = key
            continue
        # Shared expert: on the decoder layer in MiniMax-Text-01; under block_sparse_moe in older exports.
        name = SHARED_ON_LAYER.sub(r"\1.mlp.\2.", key)
        yield name.replace(".block_sparse_moe.", ".mlp."), source.get(key)
    for layer, parts in sorted(per_expert.items(), key=lambda item: int(item[0].rsplit(".", 1)[1])):
        experts = sorted({e for e, _ in parts})
        if experts != list(range(config.num_local_experts)):
            raise ValueError(f"{layer}: expected experts 0..{config.num_local_experts - 1}, found {experts}")
        missing = [f"{e}.{w}" for e in experts for w in ("w1", "w2", "w3") if (e, w) not in parts]
        if missing:
            raise ValueError(f"{layer}: missing expert weights {missing}")
        gate_up = torch.stack([torch.cat([source.get(parts[(e, "w1")]), source.get(parts[(e, "w3")])]) for e in experts])
        down = torch.stack([source.get(parts[(e, "w2")]) for e in experts])
        yield f"{layer}.mlp.experts.gate_up_proj", gate_up
        yield f"{layer}.mlp.experts.down_proj", down


def tensors_to_minimax(source, config: TNLConfig):
    """Yield ``(minimax_name, tensor)`` in the on-disk MiniMax layout from a TNL checkpoint."""
    _check_expressible(config)
    intermediate = config.intermediate_size
    for key in source.keys():
        match = STACKED.match(key)
        if not match:
            name = SHARED_IN_MLP.sub(r"\1.\2.", key)  # the shared expert goes onto the decoder layer
            yield name.replace(".mlp.", ".block_sparse_moe."), source.get(key)
            continue
        layer, kind = match.groups()
        stacked = source.get(key)
        for expert in range(stacked.shape[0]):
            prefix = f"{layer}.block_sparse_moe.experts.{expert}"
            if kind == "gate_up_proj":
                yield f"{prefix}.w1.weight", stacked[expert, :intermediate].clone()
                yield f"{prefix}.w3.weight", stacked[expert, intermediate:].clone()
            else:
                yield f"{prefix}.w2.weight", stacked[expert].clone()
