"""One attention mask per layer type, from ``transformers.masking_utils`` (as transformers' hybrid models build them).

- ``"linear_attention"``: ``create_recurrent_attention_mask``, the ``[B, T]`` padding mask of the new tokens
  (None at a decode step or without padding); the lightning layers zero k and v where it is 0.
- ``"full_attention"``: ``create_causal_mask`` where a mask is needed: padding, or packed documents for an
  attention function that cannot keep them apart from ``cu_seqlens`` (eager). Otherwise None, which TNL's
  attention functions (and flash-attn) read as causal with the queries aligned to the last keys: a
  continuation after cached tokens then needs no ``[T, past+T]`` mask, which ``create_causal_mask``
  would build.
"""

import torch
from transformers.masking_utils import (create_causal_mask, create_recurrent_attention_mask,
                                        packed_sequence_mask_function)

from .attention_functions import SPLITS_DOCUMENTS
from .configuration_tnl import FULL, LINEAR
from .inputs import document_ids


def layer_masks(config, inputs_embeds: torch.Tensor, padding: torch.Tensor | None, cache, cu_seqlens,
                output_attentions: bool) -> dict:
    """``{layer type: mask}`` for this forward. ``padding`` is the 2-D mask when it may mark padding
    (``tnl_model.inputs.padding_mask``), else None. Nothing here reads tensor values, except that transformers'
    ``create_recurrent_attention_mask`` checks a padding mask once more outside a decode step."""
    masks = {}
    if LINEAR in config.layer_types:
        # Without padding it would return None too; not calling it then keeps one more function (and its
        # deprecation wrapper) out of torch.compile's frames.
        masks[LINEAR] = None if padding is None else create_recurrent_attention_mask(config, inputs_embeds, padding,
                                                                                      cache=cache)
    if FULL in config.layer_types:
        masks[FULL] = _softmax_mask(config, inputs_embeds, padding, cache, cu_seqlens, output_attentions)
    return masks


def _softmax_mask(config, inputs_embeds, padding, cache, cu_seqlens, output_attentions):
    if padding is None and cu_seqlens is None:
        return None
    implementation = "eager" if output_attentions else config._attn_implementation
    if padding is None and implementation in SPLITS_DOCUMENTS:
        return None  # per-document SDPA / varlen flash-attn from cu_seqlens: no (sum of lengths)^2 mask
    same_document = None
    if cu_seqlens is not None:
        same_document = packed_sequence_mask_function(document_ids(cu_seqlens, inputs_embeds.shape[1])[None])
    # The padding is known to be there (an all-ones mask was dropped), so no skip test reads the mask again.
    return create_causal_mask(config=config, inputs_embeds=inputs_embeds, attention_mask=padding, cache=cache,
                              and_mask_function=same_document, allow_is_causal_skip=False)
