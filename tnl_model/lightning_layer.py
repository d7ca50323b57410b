"""The lightning-attention layer (DESIGN.md 3.2, MiniMax-Text-01 form by default)::

    qkv = SiLU(x W_qkv^T)          rows per head laid out [q_h | k_h | v_h]
    o   = lightning_attn(q, k, v, s)
    y   = RMSNorm_{H*d}(concat_h o)
    y   = sigmoid(x W_gate^T) * y
    out = y W_out^T

Prefill and any continuation run the chunked operator seeded with the cached
state; a single new token runs the recurrent decode step. Padded positions get
zero k and v, so they never enter the state.
"""

import torch
from torch import nn
from torch.nn import functional as F

from tnl_kernels import build_slopes, lightning_attn, lightning_attn_decode, lightning_attn_sequence_parallel

from .cache_glue import lightning_layer
from .norms import RMSNorm, SimpleRMSNorm


class TNLLightningAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.backend = config.lightning_backend
        inner = self.num_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * inner, bias=False)
        self.output_gate = nn.Linear(config.hidden_size, inner, bias=False)
        self.out_proj = nn.Linear(inner, config.hidden_size, bias=False)
        norm_class = RMSNorm if config.linear_attn_norm == "rmsnorm" else SimpleRMSNorm
        self.norm = norm_class(inner, eps=config.linear_attn_norm_eps)
        self.sigmoid_gate = config.linear_attn_gate == "sigmoid"
        self.activate_values = config.linear_attn_activation_on == "qkv"
        self.num_layers = config.num_hidden_layers
        # Decay rates are a pure function of the config: fp32, never in the state dict, and out of
        # reach of `nn.Module.to()` so bf16 models keep exact fp32 decays (a buffer would also be
        # left on the meta device by meta-device instantiation). A plain tensor attribute, moved to
        # the input's device on first use: torch.compile then shares one compiled layer between
        # all layers instead of specialising (and recompiling) on each layer's index.
        self._slopes = build_slopes(self.num_heads, layer_idx, self.num_layers, device="cpu")

    def slopes(self, device: torch.device) -> torch.Tensor:
        # Rebuilt, not cast, when not fp32: DeepSpeed's zero.Init casts every floating tensor made
        # during __init__ to the training dtype (bf16 rates would change the model).
        if self._slopes.device != device or self._slopes.dtype != torch.float32:
            self._slopes = build_slopes(self.num_heads, self.layer_idx, self.num_layers, device=device)
        return self._slopes

    def _project_qkv(self, x: torch.Tensor, token_mask: torch.Tensor | None):
        batch, length, _ = x.shape
        qkv = self.qkv_proj(x).view(batch, length, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        q, k = F.silu(q), F.silu(k)
        if self.activate_values:
            v = F.silu(v)
        if token_mask is not None:
            keep = token_mask[:, :, None, None].to(k.dtype)
            k, v = k * keep, v * keep
        return q, k, v

    def forward(self, hidden_states, attention_mask=None, cache=None, cu_seqlens=None, shard=None,
                output_attentions: bool = False, **kwargs):
        """hidden_states ``[B, T, hidden]``; attention_mask ``[B, T]`` (1 = real token) or None, as
        ``transformers.masking_utils.create_recurrent_attention_mask`` gives it.

        Returns ``(output, state)``: ``state`` is the fp32 recurrent state after these tokens when
        ``output_attentions`` asks for it (transformers' MiniMax convention for a lightning layer's
        "attention weights"), else None.
        """
        x = hidden_states
        length = x.shape[1]
        q, k, v = self._project_qkv(x, attention_mask)
        slopes = self.slopes(x.device)
        if shard is not None:
            # The state entering this shard comes from one all-gather of every shard's own state.
            out, final_state = lightning_attn_sequence_parallel(q, k, v, slopes, group=shard.group,
                                                                output_final_state=output_attentions,
                                                                backend=self.backend, shard_lengths=shard.lengths)
            return self._output(x, out), final_state
        cached = lightning_layer(cache, self.layer_idx)
        state = None
        if cached is not None:
            state = cached.state
            cached.begin_update(k, v, slopes)
        if state is not None and length == 1 and cu_seqlens is None:
            if torch.is_grad_enabled():
                state = state.clone()  # keep the cached tensor out of any autograd graph
            out = lightning_attn_decode(q[:, 0], k[:, 0], v[:, 0], slopes, state, backend=self.backend).unsqueeze(1)
            final_state = state
            if torch.is_grad_enabled():
                cached.store(state)
        else:
            if state is not None and torch.is_grad_enabled():
                # The kernel saves initial_state for backward and the decode step writes the cached
                # buffer in place: hand the kernel its own copy.
                state = state.clone()
            out, final_state = lightning_attn(
                q, k, v, slopes,
                initial_state=state,
                output_final_state=cached is not None or output_attentions,
                cu_seqlens=cu_seqlens,
                backend=self.backend,
            )
            if cached is not None:
                cached.store(final_state)
        return self._output(x, out), (final_state.clone() if output_attentions else None)

    def _output(self, x, out):
        """Norm over all heads, output gate, output projection."""
        batch, length, _ = x.shape
        y = self.norm(out.reshape(batch, length, self.num_heads * self.head_dim))
        gate = self.output_gate(x)
        y = (torch.sigmoid(gate) if self.sigmoid_gate else gate) * y
        return self.out_proj(y)
