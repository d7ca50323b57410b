"""Partial rotary position embedding (DESIGN.md 3.3), from transformers' RoPE utilities.

RoPE (rotate-half convention) is applied to the first ``rotary_dim`` dims of each softmax head
only; the remaining dims pass through unchanged (MiniMax-Text-01 rotates 64 of 128 dims with
theta = 1e7). The inverse frequencies and any context-extension scaling (``rope_type`` linear,
dynamic, yarn, longrope, llama3, ...) come from transformers' ``ROPE_INIT_FUNCTIONS`` and
``dynamic_rope_update``: the config carries ``rope_parameters["partial_rotary_factor"] =
rotary_dim / head_dim``, which those functions read to size the rotated part.
"""

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

from .configuration_tnl import partial_rotary_factor


def default_rope_parameters(config, device=None, seq_len=None, **kwargs) -> tuple[torch.Tensor, float]:
    """Plain RoPE on the rotated part: ``theta ** (-2i / rotary_dim)``, no attention scaling."""
    rotary_dim = config.rotary_dim
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float32) / rotary_dim
    return 1.0 / (config.rope_theta**exponents), 1.0


class TNLRotaryEmbedding(nn.Module):
    """cos/sin tables ``[B, T, rotary_dim]`` for the rotated part of each softmax head.

    The attribute names (``rope_type``, ``inv_freq``, ``original_inv_freq``, ``max_seq_len_cached``,
    ``original_max_seq_len``, ``attention_scaling``, ``config``, ``compute_default_rope_parameters``) are
    the ones transformers' ``dynamic_rope_update`` and weight initialisation read and update.
    """

    compute_default_rope_parameters = staticmethod(default_rope_parameters)

    def __init__(self, config, device=None):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        init = self.compute_default_rope_parameters if self.rope_type == "default" else ROPE_INIT_FUNCTIONS[self.rope_type]
        # rope_parameters replaced after the config was built lack the derived factor: restore it.
        config.rope_parameters.setdefault("partial_rotary_factor", partial_rotary_factor(config.rotary_dim, config.head_dim))
        inv_freq, self.attention_scaling = init(config, device)
        if inv_freq.numel() != config.rotary_dim // 2:
            raise ValueError(f"rope_parameters give {2 * inv_freq.numel()} rotary dims but rotary_dim is "
                             f"{config.rotary_dim}: set rotary_dim, not rope_parameters['partial_rotary_factor']")
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.original_inv_freq = self.inv_freq.clone()

    def _apply(self, fn, recurse=True):
        # Frequencies stay fp32 whatever `model.to(dtype)` asks: bf16 frequencies would shift every
        # rotation angle (at position 1e5 by whole turns). Device moves still apply.
        for name, buffer in self._buffers.items():
            if buffer is not None:
                moved = fn(buffer)
                self._buffers[name] = moved if moved.dtype == buffer.dtype else buffer.to(moved.device)
        return self

    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        """``position_ids [B, T]`` -> ``(cos, sin)`` of shape ``[B, T, rotary_dim]`` in ``x.dtype``."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=position_ids.device, dtype=torch.float32)
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos() * self.attention_scaling, angles.sin() * self.attention_scaling
        return cos.to(x.dtype), sin.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the leading ``cos.shape[-1]`` dims of ``x [B, H, T, d]``; ``cos, sin: [B, T, r]``."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == 0:
        return x
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotated, passthrough = x[..., :rotary_dim], x[..., rotary_dim:]
    rotated = rotated * cos + _rotate_half(rotated) * sin
    return torch.cat((rotated, passthrough), dim=-1) if passthrough.shape[-1] else rotated
