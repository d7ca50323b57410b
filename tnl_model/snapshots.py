"""Context snapshots: a processed prompt's cache saved as safetensors and loaded again, here or in another process.

Process a long document once, keep its cache, and answer many questions from it::

    out = model(doc_ids, use_cache=True)
    save_cache(out.cache, "doc.tnlctx", config=model.config, input_ids=doc_ids)
    ...
    cache, doc_ids = load_cache("doc.tnlctx", config=model.config)
    answer = model.generate(torch.cat([doc_ids, question_ids], 1), cache=cache, max_new_tokens=50)

The file holds each lightning layer's fp32 state, each softmax layer's keys and values in their
dtype, the token ids, the token count and a fingerprint of the config fields that change what the
cache means. Nothing is pickled. A snapshot is valid at any token boundary: the lightning state
after ``n`` tokens is all a lightning layer needs.

Fork semantics: ``generate()`` and ``forward`` update the cache they are given in place, so one
cache answers one question. Each :func:`load_cache` returns a new cache; in one process,
:func:`fork_cache` copies a cache for each question, so no question's tokens leak into the next.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import DynamicCache

from .cache_glue import prepare_cache
from .checkpoint_io import CheckpointError
from .configuration_tnl import LINEAR

FORMAT = "tnl-context-snapshot/1"

# The config fields that decide what a cached state or key means. Weights are not fingerprinted:
# a snapshot must be loaded into the model (checkpoint) that wrote it.
_COMPUTATION_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rotary_dim", "rope_parameters", "max_position_embeddings", "layer_types",
    "mlp_layer_types", "postnorm", "full_attn_alpha_factor", "full_attn_beta_factor", "linear_attn_alpha_factor",
    "linear_attn_beta_factor", "mlp_alpha_factor", "mlp_beta_factor", "linear_attn_norm", "linear_attn_norm_eps",
    "linear_attn_gate", "linear_attn_activation_on", "rms_norm_eps", "num_local_experts", "num_experts_per_tok",
    "dense_intermediate_size", "shared_intermediate_size", "tie_word_embeddings",
)


class SnapshotError(CheckpointError):
    """A snapshot file that cannot be used with this model (another architecture, damaged, ...)."""


def config_fingerprint(config) -> str:
    """sha256 over the computation-defining config fields (canonical JSON)."""
    fields = {name: getattr(config, name, None) for name in _COMPUTATION_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def fork_cache(cache: DynamicCache) -> DynamicCache:
    """An independent copy of ``cache`` (states, keys, values, token counts) for one more question."""
    return copy.deepcopy(cache)


def save_cache(cache: DynamicCache, path: str | os.PathLike, *, config, input_ids: torch.Tensor) -> Path:
    """Write ``cache`` (after ``input_ids [B, T]`` were processed) to ``path``; returns the path.

    Written to a temporary name and renamed, so a crash never leaves a half-written snapshot.
    """
    path = Path(path)
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
    prepare_cache(cache, config)
    length = cache.get_seq_length()
    if length != input_ids.shape[1]:
        raise ValueError(f"the cache holds {length} tokens but input_ids has {input_ids.shape[1]}: pass the ids "
                         "the cache was built from")
    tensors = {"input_ids": input_ids.detach().to("cpu", torch.int64).contiguous()}
    for idx, kind in enumerate(config.layer_types):
        layer = cache.layers[idx]
        if kind == LINEAR:
            if layer.state is None:
                raise ValueError(f"lightning layer {idx} holds no state: run the model over input_ids with this cache")
            tensors[f"layers.{idx}.state"] = layer.state.detach().to("cpu", torch.float32).contiguous()
        else:
            tensors[f"layers.{idx}.keys"] = layer.keys.detach().cpu().contiguous()
            tensors[f"layers.{idx}.values"] = layer.values.detach().cpu().contiguous()
    metadata = {"format": FORMAT, "fingerprint": config_fingerprint(config), "token_count": str(length),
                "layer_types": json.dumps(list(config.layer_types))}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def load_cache(path: str | os.PathLike, *, config, device=None, dtype: torch.dtype | None = None):
    """``(cache, input_ids)`` from a snapshot written by :func:`save_cache` for a model with ``config``.

    ``device`` places every tensor; ``dtype`` (a floating dtype) is the softmax keys' and values' dtype
    (default: as saved). Lightning states stay fp32. Every call returns a new, independent cache.
    """
    path = Path(path)
    if not path.is_file():
        raise SnapshotError(f"{path}: no such snapshot file" if not path.exists() else
                            f"{path} is not a regular file; give the path of a .tnlctx file")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise SnapshotError(f"dtype must be a floating torch dtype for the softmax keys and values, got {dtype!r}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            _check_metadata(path, metadata, config)
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        if isinstance(error, SnapshotError):
            raise
        raise SnapshotError(f"{path} is not a readable snapshot (truncated or corrupt: {error}); write it again "
                            "with save_cache or `tnl generate --save-context`") from error
    length = int(metadata["token_count"])
    input_ids = tensors.pop("input_ids", None)
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] != length:
        raise SnapshotError(f"{path}: the token ids do not match the snapshot's token count {length}")
    cache = DynamicCache(config=config)
    prepare_cache(cache, config)
    batch = input_ids.shape[0]
    for idx, kind in enumerate(config.layer_types):
        layer = cache.layers[idx]
        if kind == LINEAR:
            state = _take(tensors, f"layers.{idx}.state", path)
            expected = (batch, config.num_attention_heads, config.head_dim, config.head_dim)
            _check_shape(path, f"layers.{idx}.state", state, expected)
            layer.store(state.to(device=device, dtype=torch.float32))
            layer.seen_tokens = length
        else:
            keys, values = _take(tensors, f"layers.{idx}.keys", path), _take(tensors, f"layers.{idx}.values", path)
            expected = (batch, config.num_key_value_heads, length, config.head_dim)
            _check_shape(path, f"layers.{idx}.keys", keys, expected)
            _check_shape(path, f"layers.{idx}.values", values, expected)
            layer.update(keys.to(device=device, dtype=dtype or keys.dtype),
                         values.to(device=device, dtype=dtype or values.dtype))
    if tensors:
        raise SnapshotError(f"{path} holds tensors this model has no place for: {sorted(tensors)[:5]}")
    return cache, input_ids.to(device) if device is not None else input_ids


def snapshot_bytes(config, tokens: int, batch: int = 1, kv_dtype: torch.dtype = torch.bfloat16) -> int:
    """Size of a snapshot's tensors for ``tokens`` of context: constant for lightning layers, plus the
    softmax layers' keys and values per token, plus the token ids."""
    from .parameters import cache_bytes

    return cache_bytes(config, tokens, batch=batch, dtype=kv_dtype) + 8 * tokens * batch


def _check_metadata(path: Path, metadata: dict, config) -> None:
    if metadata.get("format") != FORMAT:
        raise SnapshotError(f"{path} is not a tnl context snapshot (format {metadata.get('format')!r}, expected "
                            f"{FORMAT!r})")
    saved_types = json.loads(metadata.get("layer_types", "[]"))
    if metadata.get("fingerprint") != config_fingerprint(config):
        detail = ("its layer pattern differs" if saved_types != list(config.layer_types)
                  else "a field that changes the computation differs")
        raise SnapshotError(f"{path} was written by a model of another architecture ({detail}): load it with the "
                            "model that wrote it")
    if not metadata.get("token_count", "").isdigit():
        raise SnapshotError(f"{path}: no valid token count in its metadata")


def _take(tensors: dict, name: str, path: Path) -> torch.Tensor:
    if name not in tensors:
        raise SnapshotError(f"{path} lacks {name}: it is incomplete; write it again")
    return tensors.pop(name)


def _check_shape(path: Path, name: str, tensor: torch.Tensor, expected: tuple) -> None:
    if tuple(tensor.shape) != expected:
        raise SnapshotError(f"{path}: {name} has shape {tuple(tensor.shape)}, expected {expected}")


__all__ = ["save_cache", "load_cache", "fork_cache", "snapshot_bytes", "config_fingerprint", "SnapshotError"]
