"""``TNLConfig``: the configuration of a TNL hybrid lightning-attention MoE model.

Declared as transformers 5 declares its own configs (``MiniMaxConfig``, ``LlamaConfig``): annotated
fields, type-checked by ``huggingface_hub``'s ``@strict`` on every assignment, transformers' field
validators for ranges (``positive_int_field``, ``interval``), and one ``validate_architecture`` for the
rules between fields. ``@strict``'s ``validate()`` runs it (with transformers' own ``validate_*`` checks)
at the end of ``__init__``, and ``save_pretrained`` runs it again.

Field names follow transformers' ``MiniMaxConfig`` where the concept is shared, so a MiniMax config.json
loads here with the same meaning. MiniMax-Text-01's original spellings (DESIGN.md 3.5) are read and
written too: ``layernorm_{full_attention,linear_attention,mlp}_{alpha,beta}`` and ``num_experts`` through
``attribute_map``, ``attn_type_list`` (0/1 per layer) and ``rope_theta`` as properties over
``layer_types`` and ``rope_parameters``; ``rotary_dim``, ``postnorm`` and ``shared_intermediate_size``
are fields under their original names.

An invalid value raises :class:`TNLConfigError` (both ``@strict``'s ``StrictDataclassError`` and a
``ValueError``), naming the field and the value.
"""

import functools
import math
from typing import Literal

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters
from transformers.utils.type_validators import interval, positive_int_field

LINEAR = "linear_attention"
FULL = "full_attention"
LAYER_TYPES = (LINEAR, FULL)
MLP_TYPES = ("sparse", "dense")
#: transformers' ``MiniMaxConfig.block_size`` (its lightning block); TNL's kernels choose their own block.
MINIMAX_BLOCK_SIZE = 256

# Keys of MiniMax (or older TNL) config.json files that configure nothing here: accepted and ignored.
# ``block_size``: the lightning block length, chosen by the kernels for the head dim (it never changes the
# result); ``layernorm_full_attention_eps``: an original MiniMax-Text-01 key that its own code never reads.
_IGNORED_KEYS = ("block_size", "layernorm_full_attention_eps")


def minimax_layer_pattern(num_layers: int, period: int = 8) -> list[str]:
    """MiniMax-Text-01's pattern: softmax at 0-based layers period-1, 2*period-1, ...; the rest linear."""
    return [FULL if (i + 1) % period == 0 else LINEAR for i in range(num_layers)]


class TNLConfigError(StrictDataclassError, ValueError):
    """An invalid :class:`TNLConfig` value: transformers' strict-dataclass error, and a ``ValueError``."""


def _tnl_config_errors(cls):
    """Finish ``@strict``'s work on ``cls``: an ``attribute_map`` alias is validated as the field it names
    (``@strict`` looks its validators up under the name as written, and transformers maps aliases after
    that), and a failed check raises :class:`TNLConfigError` (the ``tnl`` tools catch ``ValueError``)."""

    def raising_tnl_errors(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except TNLConfigError:
                raise
            except StrictDataclassError as err:
                raise TNLConfigError(str(err)) from err

        return wrapper

    strict_setattr = raising_tnl_errors(cls.__setattr__)

    def __setattr__(self, name, value):
        strict_setattr(self, cls.attribute_map.get(name, name), value)

    cls.__setattr__ = __setattr__
    cls.__init__ = raising_tnl_errors(cls.__init__)
    cls.validate = raising_tnl_errors(cls.validate)
    return cls


@_tnl_config_errors
@strict
class TNLConfig(PreTrainedConfig):
    r"""Configuration of :class:`~tnl_model.TNLForCausalLM`.

    Beyond the standard decoder fields:

    layer_types: ``"linear_attention"`` (lightning) or ``"full_attention"`` (softmax) per layer
        (default: MiniMax's pattern, softmax at layers 7, 15, ...). MiniMax-Text-01: ``attn_type_list``.
    mlp_layer_types: ``"sparse"`` (routed MoE) or ``"dense"`` (one SwiGLU FFN) per layer (default: all sparse).
    rotary_dim: leading dims of each softmax head that get RoPE (MiniMax-Text-01: 64 of 128); even,
        at most ``head_dim`` (default: ``head_dim``, or ``rope_parameters["partial_rotary_factor"]`` of it).
    postnorm: MiniMax post-norm ``x' = alpha*RMSNorm(x) + beta*f(RMSNorm(x))`` when True,
        pre-norm ``alpha*x + beta*f(RMSNorm(x))`` (TransNormerLLM) when False.
    *_alpha_factor / *_beta_factor: the DeepNorm-style residual scales per sub-block
        (MiniMax-Text-01: ``layernorm_*_alpha`` / ``layernorm_*_beta``).
    linear_attn_norm: ``"rmsnorm"`` (weighted, MiniMax) or ``"srmsnorm"`` (no weight, TransNormerLLM).
    linear_attn_gate: ``"sigmoid"`` (MiniMax) or ``"identity"`` (TransNormerLLM ``u = x W_u``).
    linear_attn_activation_on: ``"qkv"`` (MiniMax) or ``"qk"`` (TransNormerLLM: SiLU on q, k only).
    dense_intermediate_size: hidden size of the dense FFN layers (default: ``intermediate_size``).
    shared_intermediate_size: > 0 adds a shared expert mixed by a sigmoid coefficient.
    router_z_loss_coef: weight of the router z-loss (0 disables it).
    prefill_chunk_size: prompts longer than this are prefilled chunk by chunk through the cache, to bound
        inference memory; only when autograd is off (a forward under autograd runs in one pass, so its
        gradients are the single pass's).
    lightning_backend: ``"auto"``, ``"torch"`` or ``"triton"`` for the lightning operator.
    hidden_act: ``"silu"`` only (the experts' activation); kept so that a MiniMax config.json naming another
        activation is refused rather than computed with SiLU.
    """

    model_type = "tnl"
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {
        "num_experts": "num_local_experts",
        "layernorm_full_attention_alpha": "full_attn_alpha_factor",
        "layernorm_full_attention_beta": "full_attn_beta_factor",
        "layernorm_linear_attention_alpha": "linear_attn_alpha_factor",
        "layernorm_linear_attention_beta": "linear_attn_beta_factor",
        "layernorm_mlp_alpha": "mlp_alpha_factor",
        "layernorm_mlp_beta": "mlp_beta_factor",
    }
    default_theta = 10000.0

    vocab_size: int = positive_int_field(default=32000)
    hidden_size: int = positive_int_field(default=1024)
    intermediate_size: int = positive_int_field(default=2048)
    num_hidden_layers: int = positive_int_field(default=8)
    num_attention_heads: int = positive_int_field(default=16)
    num_key_value_heads: int | None = positive_int_field(default=None)
    head_dim: int | None = positive_int_field(default=None)
    hidden_act: Literal["silu"] = "silu"
    max_position_embeddings: int = positive_int_field(default=8192)
    initializer_range: float = interval(min=0.0, max=1.0)(default=0.02)
    rms_norm_eps: float = interval(min=0.0, exclude_min=True)(default=1e-6)
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    attention_dropout: float | int = interval(min=0.0, max=1.0, exclude_max=True)(default=0.0)
    rope_parameters: RopeParameters | dict | None = None
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
    linear_attn_norm: Literal["rmsnorm", "srmsnorm"] = "rmsnorm"
    linear_attn_norm_eps: float = interval(min=0.0, exclude_min=True)(default=1e-6)
    linear_attn_gate: Literal["sigmoid", "identity"] = "sigmoid"
    linear_attn_activation_on: Literal["qkv", "qk"] = "qkv"
    num_local_experts: int = positive_int_field(default=8)
    num_experts_per_tok: int = positive_int_field(default=2)
    dense_intermediate_size: int | None = positive_int_field(default=None)
    shared_intermediate_size: int = interval(min=0)(default=0)
    output_router_logits: bool = False
    router_aux_loss_coef: float | int = interval(min=0.0)(default=0.001)
    router_z_loss_coef: float | int = interval(min=0.0)(default=0.0)
    router_jitter_noise: float | int = interval(min=0.0)(default=0.0)
    prefill_chunk_size: int | None = positive_int_field(default=None)
    lightning_backend: Literal["auto", "torch", "triton"] = "auto"

    def __post_init__(self, **kwargs):
        for key in _IGNORED_KEYS:
            kwargs.pop(key, None)
        if kwargs.pop("shared_moe_mode", "sigmoid") not in ("sigmoid", None):
            raise ValueError("shared_moe_mode: only 'sigmoid' mixing of the shared expert is supported")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
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
        # Moves rope_theta / rope_scaling into rope_parameters, then sets the remaining keyword arguments:
        # the original MiniMax spellings land on their fields through attribute_map and attn_type_list.
        super().__post_init__(**kwargs)
        if not self.rope_parameters:
            self.rope_parameters = {"rope_type": "default", "rope_theta": self.default_theta}
        self.rope_parameters.setdefault("rope_type", "default")
        self.rope_parameters.setdefault("rope_theta", self.default_theta)
        # transformers' RoPE functions size the rotated part as int(head_dim * partial_rotary_factor):
        # rotary_dim is the field that holds it, the factor is derived (rounded up past float error).
        self.rope_parameters["partial_rotary_factor"] = partial_rotary_factor(self.rotary_dim, self.head_dim)

    def validate_architecture(self) -> None:
        """TNL's rules between fields (types and single-field ranges are checked on assignment)."""
        super().validate_architecture()
        heads, kv_heads = self.num_attention_heads, self.num_key_value_heads
        if heads % kv_heads:
            raise ValueError(f"num_key_value_heads ({kv_heads}) must divide num_attention_heads ({heads}); "
                             f"use one of {[d for d in range(1, heads + 1) if heads % d == 0]}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) cannot exceed num_local_experts "
                             f"({self.num_local_experts})")
        if not 0 <= self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be an even number in [0, head_dim={self.head_dim}], "
                             f"got {self.rotary_dim}")
        for name, allowed in (("layer_types", LAYER_TYPES), ("mlp_layer_types", MLP_TYPES)):
            values = getattr(self, name)
            if len(values) != self.num_hidden_layers:
                raise ValueError(f"{name} has {len(values)} entries but num_hidden_layers is "
                                 f"{self.num_hidden_layers}; give one entry per layer")
            unknown = sorted({v for v in values if v not in allowed})
            if unknown:
                raise ValueError(f"{name} has unknown entries {unknown}; allowed: {allowed}")
        rope_type = self.rope_parameters.get("rope_type", "default")
        if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"rope_parameters.rope_type must be 'default' or one of transformers' "
                             f"{sorted(ROPE_INIT_FUNCTIONS)}, got {rope_type!r}")
        theta = self.rope_parameters.get("rope_theta", self.default_theta)
        finite = isinstance(theta, (int, float)) and not isinstance(theta, bool) and math.isfinite(theta)
        if not finite or theta <= 0:  # the rotary frequencies are theta ** (-2i / dim)
            raise ValueError(f"rope_theta (rope_parameters.rope_theta) must be a number > 0, got {theta!r}")
        # transformers only warns; here pad indexes the embedding and bos/eos the logits.
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, list) else [value]
            if any(i is not None and not 0 <= i < self.vocab_size for i in ids):
                raise ValueError(f"{name} must be None or a token id in [0, vocab_size={self.vocab_size}), "
                                 f"got {value!r}")

    @property
    def attn_type_list(self) -> list[int]:
        """MiniMax-Text-01's spelling of ``layer_types``: 0 = lightning (linear) attention, 1 = softmax."""
        return [int(kind == FULL) for kind in self.layer_types]

    @attn_type_list.setter
    def attn_type_list(self, value: list[int]) -> None:
        if not isinstance(value, list) or any(type(t) is not int or t not in (0, 1) for t in value):
            raise ValueError(f"attn_type_list entries must be 0 (linear) or 1 (softmax), got {value!r}")
        self.layer_types = [FULL if t == 1 else LINEAR for t in value]

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
        factor = math.nextafter(factor, math.inf)
    return factor


__all__ = ["TNLConfig", "TNLConfigError", "minimax_layer_pattern", "LINEAR", "FULL"]
