"""Chunked prefill (DESIGN.md 5): a long prompt fed through the cache ``chunk`` tokens at a time.

The result equals one pass (the lightning states and the softmax keys carry over in the cache) while
the activation memory is bounded by the chunk: nothing of size ``[T, hidden]`` is built, since the
token ids are chunked, not their embeddings. :func:`prefill_in_chunks` wraps the base model's
``forward`` outside transformers' ``capture_outputs``, so each chunk is one ordinary forward with its
own output capture; the router logits of the chunks are put back in the single pass's order.
"""

from functools import wraps

import torch
from transformers.modeling_outputs import MoeModelOutputWithPast

from .cache_glue import reserve_kv_capacity
from .inputs import check_token_ids, checked_token_ids, packed_documents, token_ids_checked


def prefill_in_chunks(forward):
    """Decorator for ``TNLModel.forward``: with ``prefill_chunk_size`` (or ``config.prefill_chunk_size``) below
    the input length, no autograd and a cache, the forward runs once per chunk.

    ``keep_last > 0`` returns only the last ``keep_last`` hidden states (generate() needs the last
    position only), so the output does not grow with the prompt either. Chunking bounds inference
    memory only: under autograd every chunk's activations are kept for backward anyway, and the state
    carried between chunks would cut the gradient.
    """

    @wraps(forward)
    def wrapper(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, cu_seqlens=None, sequence_parallel_group=None, prefill_chunk_size=None, keep_last=0,
                **kwargs):
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                      inputs_embeds=inputs_embeds, use_cache=use_cache, cu_seqlens=cu_seqlens,
                      sequence_parallel_group=sequence_parallel_group)
        chunk = prefill_chunk_size or self.config.prefill_chunk_size
        tokens = input_ids if input_ids is not None else inputs_embeds
        if (not chunk or tokens is None or tokens.dim() < 2 or tokens.shape[1] <= chunk or torch.is_grad_enabled()
                or sequence_parallel_group is not None):
            return forward(self, **inputs, **kwargs)
        packed = (cu_seqlens is not None or kwargs.get("cu_seq_lens_q") is not None
                  or packed_documents(position_ids, attention_mask, cache, use_cache, *tokens.shape[:2]) is not None)
        if packed:  # each packed sequence ends with its own state: nothing to carry between chunks
            return forward(self, **inputs, **kwargs)
        cache = self._resolve_cache(cache, use_cache, packed=False)
        if cache is None:
            return forward(self, **inputs, **kwargs)
        return _run_in_chunks(self, forward, tokens, attention_mask, position_ids, cache, chunk, keep_last, kwargs)

    return wrapper


def _run_in_chunks(model, forward, tokens, attention_mask, position_ids, cache, chunk, keep_last, kwargs):
    config = model.config
    if kwargs.get("output_attentions", config.output_attentions) or kwargs.get("output_hidden_states",
                                                                                  config.output_hidden_states):
        raise ValueError("output_attentions/output_hidden_states are not available with chunked prefill")
    return_dict = kwargs.pop("return_dict", None)
    is_ids = not tokens.is_floating_point()
    if is_ids and not token_ids_checked(config.vocab_size):
        check_token_ids(tokens, config.vocab_size)  # once for the whole prompt
    batch, length = tokens.shape[:2]
    start_past = cache.get_seq_length()
    reserve_kv_capacity(cache, start_past + length)  # the softmax caches grow once, not per chunk
    pieces, router_logits = [], []
    with checked_token_ids(config.vocab_size):
        for start in range(0, length, chunk):
            stop = min(length, start + chunk)
            out = forward(
                model,
                input_ids=tokens[:, start:stop] if is_ids else None,
                inputs_embeds=None if is_ids else tokens[:, start:stop],
                attention_mask=None if attention_mask is None else attention_mask[:, : start_past + stop],
                position_ids=None if position_ids is None else position_ids[:, start:stop],
                cache=cache, use_cache=True, return_dict=True, **kwargs,
            )
            if not keep_last or stop > length - keep_last:
                pieces.append(out.last_hidden_state)
            if out.router_logits:
                router_logits.append(out.router_logits)
    hidden = torch.cat(pieces, dim=1)
    if keep_last:
        hidden = hidden[:, -keep_last:]
    merged = tuple(merge_chunk_router_logits(per_layer, batch) for per_layer in zip(*router_logits)) or None
    result = MoeModelOutputWithPast(last_hidden_state=hidden, cache=cache, router_logits=merged)
    if return_dict is None:
        return_dict = config.return_dict
    return result if return_dict is not False else result.to_tuple()


def merge_chunk_router_logits(chunks, batch: int) -> torch.Tensor:
    """One layer's router logits of consecutive chunks, each ``[B*Tc, E]``, as the single pass's ``[B*T, E]``:
    batch-major (each row's tokens together), not chunk-major."""
    return torch.cat([part.reshape(batch, -1, part.shape[-1]) for part in chunks], dim=1).flatten(0, 1)
