"""Reading and writing TNL layer state in transformers' hybrid ``DynamicCache``.

``DynamicCache(config=...)`` builds a ``LinearAttentionLayer`` for every
``"linear_attention"`` entry of ``config.layer_types`` and a key/value
``DynamicLayer`` for softmax layers, so beam reordering, batch selection and
offloading come from transformers. The linear layer's bookkeeping is made for
conv + recurrent states, so the recurrent-only use here goes through these
helpers: the fp32 state lives in ``recurrent_states[0]``.
"""

import torch
from transformers.cache_utils import Cache, LinearAttentionCacheLayerMixin


def _linear_layer(cache: Cache, layer_idx: int):
    layer = cache.layers[layer_idx]
    if not isinstance(layer, LinearAttentionCacheLayerMixin):
        raise TypeError(
            f"cache layer {layer_idx} is a {type(layer).__name__}, but the model's layer {layer_idx} is a lightning "
            "layer: build the cache with DynamicCache(config=model.config)"
        )
    return layer


def get_linear_state(cache: Cache | None, layer_idx: int) -> torch.Tensor | None:
    """The fp32 recurrent state ``[B, H, D, E]`` of a lightning layer, or None before the first token."""
    if cache is None:
        return None
    layer = _linear_layer(cache, layer_idx)
    if not layer.is_recurrent_states_initialized[0] or not layer.has_previous_state[0]:
        return None
    return layer.recurrent_states[0]


def set_linear_state(cache: Cache, layer_idx: int, state: torch.Tensor) -> None:
    """Store a lightning layer's state (kept fp32 whatever the model dtype)."""
    layer = _linear_layer(cache, layer_idx)
    state = state.detach().float()
    current = layer.recurrent_states[0]
    if current is not None and current.shape != state.shape:
        # The batch changed (e.g. a new prompt batch reusing the cache object): start a fresh buffer.
        layer.is_recurrent_states_initialized[0] = False
    layer.update_recurrent_state(state, 0)
    layer.device, layer.dtype = state.device, state.dtype
    layer.has_previous_state[0] = True


def mark_linear_state_updated(cache: Cache, layer_idx: int) -> None:
    """After an in-place decode step on the cached buffer."""
    _linear_layer(cache, layer_idx).has_previous_state[0] = True


def past_length(cache: Cache | None, layer_types: list[str]) -> int:
    """Tokens already in the cache, read from the first softmax layer (linear layers keep no length)."""
    if cache is None:
        return 0
    for idx, kind in enumerate(layer_types):
        if kind == "full_attention":
            return cache.get_seq_length(idx) if idx < len(cache.layers) else 0
    return getattr(cache, "_tnl_seen_tokens", 0)


def add_seen_tokens(cache: Cache | None, count: int) -> None:
    """All-linear models have no KV layer to count tokens in; keep the count on the cache object."""
    if cache is not None:
        cache._tnl_seen_tokens = getattr(cache, "_tnl_seen_tokens", 0) + count
