"""``TNLConfig``: the configuration of a TNL hybrid lightning-attention MoE model.

Field names follow transformers' ``MiniMaxConfig`` where the concept is shared, so a
MiniMax config.json loads here with the same meaning. The original MiniMax-Text-01
spellings (``attn_type_list``, ``layernorm_*_alpha/beta``, ``rotary_dim``,
``rope_theta``, ``shared_intermediate_size``) are accepted too (DESIGN.md 3.5).
Every inconsistent value raises ``ValueError`` naming the field.
"""

import math

from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

LINEAR = "linear_attention"
FULL = "full_attention"
LAYER_TYPES = (LINEAR, FULL)
MLP_TYPES = ("sparse", "dense")

# Original MiniMax-Text-01 residual scale names -> transformers' names.
_ORIGINAL_SCALE_NAMES = {
    "layernorm_full_attention_alpha": "full_attn_alpha_factor",
    "layernorm_full_attention_beta": "full_attn_beta_factor",
    "layernorm_linear_attention_alpha": "linear_attn_alpha_factor",
    "layernorm_linear_attention_beta": "linear_attn_beta_factor",
    "layernorm_mlp_alpha": "mlp_alpha_factor",
    "layernorm_mlp_beta": "mlp_beta_factor",
}


def minimax_layer_pattern(num_layers: int, period: int = 8) -> list[str]:
    """MiniMax-Text-01's pattern: softmax at 0-based layers period-1, 2*period-1, ...; the rest linear."""
    return [FULL if (i + 1) % period == 0 else LINEAR for i in range(num_layers)]


class TNLConfig(PreTrainedConfig):
    r"""Configuration of :class:`~tnl_model.TNLForCausalLM`.

    Beyond the standard decoder fields:

    layer_types: ``"linear_attention"`` (lightning) or ``"full_attention"`` (softmax) per layer.
    mlp_layer_types: ``"sparse"`` (routed MoE) or ``"dense"`` (one SwiGLU FFN) per layer.
    rotary_dim: leading dims of each softmax head that get RoPE (MiniMax-Text-01: 64 of 128).
    postnorm: MiniMax post-norm ``x' = alpha*RMSNorm(x) + beta*f(RMSNorm(x))`` when True,
        pre-norm ``x + f(RMSNorm(x))`` (TransNormerLLM) when False.
    *_alpha_factor / *_beta_factor: the DeepNorm-style residual scales per sub-block.
    linear_attn_norm: ``"rmsnorm"`` (weighted, MiniMax) or ``"srmsnorm"`` (no weight, TransNormerLLM).
    linear_attn_gate: ``"sigmoid"`` (MiniMax) or ``"identity"`` (TransNormerLLM ``u = x W_u``).
    linear_attn_activation_on: ``"qkv"`` (MiniMax) or ``"qk"`` (TransNormerLLM: SiLU on q, k only).
    shared_intermediate_size: > 0 adds a shared expert mixed by a sigmoid coefficient.
    router_z_loss_coef: weight of the router z-loss (0 disables it).
    prefill_chunk_size: prompts longer than this are prefilled chunk by chunk through the cache, to bound
        inference memory; only when autograd is off (a forward under autograd runs in one pass, so its
        gradients are the single pass's).
    lightning_backend: ``"auto"``, ``"torch"`` or ``"triton"`` for the lightning operator.
    """

    model_type = "tnl"
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {"num_experts": "num_local_experts"}
    default_theta = 10000.0

    vocab_size: int = 32000
    hidden_size: int = 1024
    intermediate_size: int = 2048
    num_hidden_layers: int = 8
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    attention_dropout: float | int = 0.0
    rope_parameters: dict | None = None
    rotary_dim: int | None = None
    layer_types: list[str] | None = None
    mlp_layer_types: list[str] | None = None
    postnorm: bool = True
    full_attn_alpha_factor: int | float = 1
    full_attn_beta_factor: int | float = 1
    linear_attn_alpha_factor: int | float = 1
    linear_attn_beta_factor: int | float = 1
    mlp_alpha_factor: int | float = 1
    mlp_beta_factor: int | float = 1
    linear_attn_norm: str = "rmsnorm"
    linear_attn_norm_eps: float = 1e-6
    linear_attn_gate: str = "sigmoid"
    linear_attn_activation_on: str = "qkv"
    block_size: int = 256
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    dense_intermediate_size: int | None = None
    shared_intermediate_size: int = 0
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.0
    router_jitter_noise: float = 0.0
    prefill_chunk_size: int | None = None
    lightning_backend: str = "auto"

    def __post_init__(self, **kwargs):
        self._accept_original_minimax_names(kwargs)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rotary_dim is None:
            factor = (self.rope_parameters or {}).get("partial_rotary_factor")
            self.rotary_dim = self.head_dim if factor is None else int(round(self.head_dim * factor))
        if self.layer_types is None:
            self.layer_types = minimax_layer_pattern(self.num_hidden_layers)
        if self.mlp_layer_types is None:
            self.mlp_layer_types = ["sparse"] * self.num_hidden_layers
        if self.dense_intermediate_size is None:
            self.dense_intermediate_size = self.intermediate_size
        super().__post_init__(**kwargs)
        if not self.rope_parameters:
            self.rope_parameters = {"rope_type": "default", "rope_theta": self.default_theta}
        self.rope_parameters.setdefault("rope_type", "default")
        self.rope_parameters.setdefault("rope_theta", self.default_theta)
        self.validate_tnl()
        # transformers' RoPE functions size the rotated part as int(head_dim * partial_rotary_factor):
        # rotary_dim is the field that holds it, the factor is derived (rounded up past float error).
        self.rope_parameters["partial_rotary_factor"] = partial_rotary_factor(self.rotary_dim, self.head_dim)
        self.validate_rope()

    def _accept_original_minimax_names(self, kwargs: dict) -> None:
        """Map MiniMax-Text-01's original config spellings onto this config's fields."""
        attn_type_list = kwargs.pop("attn_type_list", None)
        if attn_type_list is not None and self.layer_types is None:
            # Original convention: 0 = lightning (linear) attention, 1 = softmax attention.
            unknown = sorted({t for t in attn_type_list if t not in (0, 1)})
            if unknown:
                raise ValueError(f"attn_type_list entries must be 0 (linear) or 1 (softmax), got {unknown}")
            self.layer_types = [FULL if t == 1 else LINEAR for t in attn_type_list]
        for original, ours in _ORIGINAL_SCALE_NAMES.items():
            if original in kwargs:
                setattr(self, ours, kwargs.pop(original))
        if "shared_moe_mode" in kwargs and kwargs.pop("shared_moe_mode") not in ("sigmoid", None):
            raise ValueError("shared_moe_mode: only 'sigmoid' mixing of the shared expert is supported")
        # Original field with no meaning here (the lightning block size is chosen by the kernels).
        kwargs.pop("layernorm_full_attention_eps", None)

    def validate_tnl(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        positive = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "max_position_embeddings", "num_local_experts",
                    "num_experts_per_tok", "dense_intermediate_size", "block_size"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not _is_int(self.shared_intermediate_size) or self.shared_intermediate_size < 0:
            raise ValueError(f"shared_intermediate_size must be >= 0 (an integer; 0: no shared expert), "
                             f"got {self.shared_intermediate_size!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) cannot exceed num_local_experts "
                f"({self.num_local_experts})"
            )
        if not 0 <= self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be an even number in [0, head_dim={self.head_dim}], got {self.rotary_dim}")
        self._validate_per_layer("layer_types", LAYER_TYPES)
        self._validate_per_layer("mlp_layer_types", MLP_TYPES)
        choices = {
            "linear_attn_norm": ("rmsnorm", "srmsnorm"),
            "linear_attn_gate": ("sigmoid", "identity"),
            "linear_attn_activation_on": ("qkv", "qk"),
            "lightning_backend": ("auto", "torch", "triton"),
            "hidden_act": ("silu",),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        rope_type = self.rope_parameters.get("rope_type", "default")
        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"rope_parameters.rope_type must be 'default' or one of transformers' "
                             f"{sorted(ROPE_INIT_FUNCTIONS)}, got {rope_type!r}")
        theta = self.rope_parameters.get("rope_theta", self.default_theta)
        if not _is_number(theta) or theta <= 0:  # the rotary frequencies are theta ** (-2i / dim)
            raise ValueError(f"rope_theta (rope_parameters.rope_theta) must be a number > 0, got {theta!r}")
        chunk = self.prefill_chunk_size
        if chunk is not None and (not _is_int(chunk) or chunk <= 0):
            raise ValueError(f"prefill_chunk_size must be a positive integer or None, got {chunk!r}")
        self._validate_numbers()
        self._validate_token_ids()

    def _validate_numbers(self) -> None:
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_jitter_noise"):
            if not _is_number(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (a number), got {getattr(self, name)!r}")
        for name in ("rms_norm_eps", "linear_attn_norm_eps"):
            if not _is_number(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a number > 0, got {getattr(self, name)!r}")
        for name in _ORIGINAL_SCALE_NAMES.values():
            if not _is_number(getattr(self, name)):
                raise ValueError(f"{name} must be a number, got {getattr(self, name)!r}")
        dropout = self.attention_dropout
        if not _is_number(dropout) or not 0 <= dropout < 1:
            raise ValueError(f"attention_dropout must be a number in [0, 1), got {dropout!r}")

    def _validate_token_ids(self) -> None:
        """Special token ids index the embedding (pad) and the logits (bos, eos): they must be in the vocabulary."""
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) else [value]
            if any(i is not None and (not _is_int(i) or not 0 <= i < self.vocab_size) for i in ids):
                raise ValueError(f"{name} must be None or a token id in [0, vocab_size={self.vocab_size}), got {value!r}")

    def _validate_per_layer(self, name: str, allowed: tuple[str, ...]) -> None:
        values = getattr(self, name)
        if len(values) != self.num_hidden_layers:
            raise ValueError(
                f"{name} has {len(values)} entries but num_hidden_layers is {self.num_hidden_layers}; "
                "give one entry per layer"
            )
        unknown = sorted({v for v in values if v not in allowed})
        if unknown:
            raise ValueError(f"{name} has unknown entries {unknown}; allowed: {allowed}")

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters.get("rope_theta", self.default_theta))

    @property
    def num_experts_layers(self) -> int:
        return sum(t == "sparse" for t in self.mlp_layer_types)


def partial_rotary_factor(rotary_dim: int, head_dim: int) -> float:
    """The smallest float ``f`` with ``int(head_dim * f) == rotary_dim`` (``rotary_dim / head_dim`` can fall short)."""
    factor = rotary_dim / head_dim
    while int(head_dim * factor) < rotary_dim:
        factor = math.nextafter(factor, 2.0)
    return factor


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


__all__ = ["TNLConfig", "minimax_layer_pattern", "LINEAR", "FULL"]
