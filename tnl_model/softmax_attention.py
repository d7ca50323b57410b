"""The softmax attention layer (DESIGN.md 3.3): GQA, causal, no bias, partial RoPE.

Projections, RoPE on the first ``rotary_dim`` dims, the cache (or, under sequence parallelism, the
keys and values of the earlier shards), then the attention function that ``config._attn_implementation``
names in :data:`tnl_model.attention_functions.ATTENTION_FUNCTIONS` (transformers' ``AttentionInterface``
with TNL's ``"sdpa"`` and ``"eager"``). Masks come from the model (``transformers.masking_utils``);
``output_attentions`` runs the eager function, which returns the weights.
"""

import math

from torch import nn

from .attention_functions import ATTENTION_FUNCTIONS, eager_attention
from .rotary import apply_partial_rotary
from .sequence_parallel import gather_earlier_shards


class TNLSoftmaxAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads  # read by transformers' attention functions
        self.head_dim = config.head_dim
        self.scaling = 1.0 / math.sqrt(self.head_dim)
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, shard=None,
                output_attentions: bool = False, **kwargs):
        """hidden_states ``[B, T, hidden]``; position_embeddings = (cos, sin) ``[B, T, rotary_dim]``;
        attention_mask as ``create_causal_mask`` builds it (None: causal after the cached tokens).

        ``shard`` (sequence parallelism): this rank's queries attend to the keys and values of every earlier
        shard, gathered from the group, as a continuation after that many cached tokens would."""
        batch, length, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if position_embeddings is not None:
            q, k = apply_partial_rotary(q, *position_embeddings), apply_partial_rotary(k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        elif shard is not None:
            k, v = gather_earlier_shards(k, 2, shard), gather_earlier_shards(v, 2, shard)
        implementation = "eager" if output_attentions else (self.config._attn_implementation or "sdpa")
        attention = ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention)
        out, weights = attention(self, q, k, v, attention_mask, dropout=self.attention_dropout if self.training else 0.0,
                                 scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(batch, length, self.num_heads * self.head_dim)), weights
