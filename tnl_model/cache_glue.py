"""TNL layers in transformers' hybrid ``DynamicCache``.

``DynamicCache(config=...)`` builds a generic ``LinearAttentionLayer`` for every
``"linear_attention"`` entry of ``config.layer_types`` and a key/value ``DynamicLayer`` for
softmax layers; beam reordering, batch selection and offloading come from transformers.
:func:`prepare_cache` gives each lightning layer a :class:`~tnl_model.lightning_cache.LightningStateLayer`
(fp32 state, token count, exact rollback) and each softmax layer a :class:`GrowingKeyValueLayer`,
which appends into spare capacity instead of copying the whole key/value cache once per token.
"""

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, LinearAttentionCacheLayerMixin

from .lightning_cache import LightningStateLayer


def check_cache_type(cache) -> None:
    """Only transformers' ``DynamicCache`` (and subclasses) is supported; say so before any work.

    A ``StaticCache`` (``generate(cache_implementation="static")``) pads every softmax layer's keys
    to ``max_cache_len`` and hands the model 4-D masks built for it; the lightning layers keep a
    constant-size state anyway, and :class:`GrowingKeyValueLayer` already appends decode keys
    without copies, so the dynamic cache is the one this model is built and tested for.
    """
    if cache is None or isinstance(cache, DynamicCache):
        return
    kind = type(cache).__name__
    raise ValueError(
        f"tnl-model supports transformers' DynamicCache only, got a {kind}: drop cache_implementation=... "
        "from generate(), or pass DynamicCache(config=model.config)"
    )


def prepare_cache(cache: Cache | None, config) -> None:
    """Give ``cache`` (in place, so the caller's object is the one updated) the layers this model uses.

    A plain ``DynamicCache()`` (no layers yet) gets the layers ``DynamicCache(config=config)`` builds; it
    would otherwise grow key/value layers on demand, with no room for a lightning layer's state.
    """
    if cache is None:
        return
    check_cache_type(cache)
    if not cache.layers:
        cache.layers.extend(DynamicCache(config=config).layers)
        cache.layer_class_to_replicate = None  # as a config-built cache: every layer exists from the start
    if len(cache.layers) != len(config.layer_types):
        raise TypeError(f"the cache has {len(cache.layers)} layers but the model has {len(config.layer_types)}: "
                         "build the cache with DynamicCache(config=model.config)")
    for idx, kind in enumerate(config.layer_types):
        layer = cache.layers[idx]
        expected = LinearAttentionCacheLayerMixin if kind == "linear_attention" else DynamicLayer
        if not isinstance(layer, expected):
            raise TypeError(f"cache layer {idx} is a {type(layer).__name__}, but the model's layer {idx} is "
                             f"{kind!r}: build the cache with DynamicCache(config=model.config)")
        if kind == "linear_attention" and not isinstance(layer, LightningStateLayer):
            cache.layers[idx] = LightningStateLayer.adopt(layer)
    use_growing_kv_layers(cache, config.layer_types)


def lightning_layer(cache: Cache | None, layer_idx: int) -> LightningStateLayer | None:
    """The cache entry of lightning layer ``layer_idx`` (after :func:`prepare_cache`), or None without a cache."""
    return None if cache is None else cache.layers[layer_idx]


class GrowingKeyValueLayer(DynamicLayer):
    """A ``DynamicLayer`` that appends into spare capacity instead of concatenating.

    ``keys`` / ``values`` are views ``[:, :, :length]`` of buffers with room for more tokens;
    when one is full, a buffer ``HEADROOM`` larger is allocated and the cache copied once,
    so a decode costs amortised O(1) copies per token instead of O(context) (at 1M tokens
    of context a softmax layer of MiniMax-Text-01 holds 4 GiB of bf16 keys and values).
    Everything else is ``DynamicLayer``'s: a method that replaces ``keys`` with a new tensor
    (beam reorder, batch selection, offloading) just makes the next update adopt it into a
    new buffer, and ``crop`` leaves a shorter view whose tail the next update overwrites.
    Under autograd it concatenates like ``DynamicLayer`` (in-place writes into a shared
    buffer would tie every step's graph together).
    """

    HEADROOM = 1 / 8  # spare capacity allocated on growth, as a fraction of the cached length
    MIN_HEADROOM = 256  # tokens

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._key_buffer = self._value_buffer = None
        self._reserved = 0  # tokens the next buffer should hold at least (see reserve())

    def reserve(self, tokens: int) -> None:
        """Make the next buffer hold ``tokens`` at least, e.g. a whole prompt that a chunked prefill
        appends piece by piece: one allocation instead of a growth (and a copy) per chunk."""
        self._reserved = max(self._reserved, tokens + self.MIN_HEADROOM)

    @classmethod
    def adopt(cls, layer: DynamicLayer) -> "GrowingKeyValueLayer":
        """A growing layer holding ``layer``'s state (its keys are adopted at the next update)."""
        grown = cls()
        grown.__dict__.update({k: v for k, v in layer.__dict__.items()
                               if k not in ("_key_buffer", "_value_buffer", "_reserved")})
        return grown

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        self._reserved = 0
        super().reset()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            self._key_buffer = self._value_buffer = None
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length, new = self.get_seq_length(), key_states.shape[-2]
        if not (_is_prefix_view(self.keys, self._key_buffer, key_states, length + new)
                and _is_prefix_view(self.values, self._value_buffer, value_states, length + new)):
            capacity = length + new + max(self.MIN_HEADROOM, int((length + new) * self.HEADROOM))
            capacity = max(capacity, self._reserved)
            self._key_buffer = _grown(self.keys, key_states, length, capacity)
            self._value_buffer = _grown(self.values, value_states, length, capacity)
        self._key_buffer[:, :, length : length + new].copy_(key_states)
        self._value_buffer[:, :, length : length + new].copy_(value_states)
        self.keys = self._key_buffer[:, :, : length + new]
        self.values = self._value_buffer[:, :, : length + new]
        return self.keys, self.values


def _is_prefix_view(view, buffer, incoming, needed: int) -> bool:
    """``view`` is ``buffer[:, :, :n]`` and the buffer fits ``incoming`` rows up to ``needed`` tokens."""
    return (
        buffer is not None
        and view.dim() == 4
        and view.data_ptr() == buffer.data_ptr()
        and view.stride() == buffer.stride()
        and view.shape[:2] == buffer.shape[:2] == incoming.shape[:2]
        and view.shape[-1] == buffer.shape[-1] == incoming.shape[-1]
        and buffer.dtype == incoming.dtype
        and buffer.device == incoming.device
        and needed <= buffer.shape[2]
    )


def _grown(cached: torch.Tensor, incoming: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
    batch, heads, _, dim = incoming.shape
    buffer = incoming.new_empty(batch, heads, capacity, dim)
    if length:
        buffer[:, :, :length].copy_(cached)
    return buffer


def use_growing_kv_layers(cache: Cache | None, layer_types: list[str]) -> None:
    """Swap the plain ``DynamicLayer`` of each softmax layer for a :class:`GrowingKeyValueLayer`.

    Left alone: caches that offload (each layer is moved to the CPU and back every step, so
    there is nothing to grow in place) and layers of any other class (static, quantized, ...).
    """
    if cache is None or getattr(cache, "offloading", False):
        return
    for idx, kind in enumerate(layer_types):
        if kind == "full_attention" and idx < len(cache.layers) and type(cache.layers[idx]) is DynamicLayer:
            cache.layers[idx] = GrowingKeyValueLayer.adopt(cache.layers[idx])


def reserve_kv_capacity(cache: Cache | None, tokens: int) -> None:
    """Ask every growing key/value layer of ``cache`` to make room for ``tokens`` in one go."""
    for layer in [] if cache is None else cache.layers:
        if isinstance(layer, GrowingKeyValueLayer):
            layer.reserve(tokens)
