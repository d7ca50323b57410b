"""The model's inputs: checks that read values are made once, where tokens enter; defaults for the rest.

A check that reads a tensor's values (are the token ids inside the vocabulary, does the attention
mask hold padding) makes the host wait for the device. Such checks run at the boundaries of a call:
``generate()`` checks the prompt once before its loop, a chunked prefill checks the whole prompt once,
and a forward that is not a decode step checks its own inputs. A decode step (one new token after
cached ones) reads nothing back: it trusts what the boundary checked, as transformers' masks do (a
generated token is never padding, and ``generate()`` drops an all-ones mask before its loop).
Shape and dtype checks read only metadata and always run. Traced graphs (torch.compile,
torch.export) hold no data-dependent branch: there the eager boundary checked.
"""

from contextlib import contextmanager
from contextvars import ContextVar

import torch
from transformers.masking_utils import find_packed_sequence_indices
from transformers.utils.import_utils import is_tracing

#: vocabulary size the token ids of the running call were checked against (generate, chunked prefill)
_CHECKED_VOCAB: ContextVar[int | None] = ContextVar("tnl_checked_vocab", default=None)


def check_token_ids(input_ids: torch.Tensor, vocab_size: int, values: bool = True) -> None:
    """Integer ids, at least one, and with ``values`` all in ``[0, vocab_size)`` (one host sync, eager mode only)."""
    if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise ValueError("input_ids is empty: give at least one token (e.g. the BOS token) to run the model")
    if not values or is_tracing(input_ids):
        return
    if bool(((input_ids < 0) | (input_ids >= vocab_size)).any()):
        low, high = int(input_ids.min()), int(input_ids.max())
        bad = low if low < 0 else high
        raise ValueError(f"input_ids contains token id {bad}, outside the vocabulary [0, {vocab_size}) of this model; "
                         "check that the tokenizer matches the model")


def token_ids_checked(vocab_size: int) -> bool:
    """Whether the running call (generate, chunked prefill) already checked its ids for this vocabulary."""
    if torch.compiler.is_compiling():
        return True
    checked = _CHECKED_VOCAB.get()
    return checked is not None and checked <= vocab_size


@contextmanager
def checked_token_ids(vocab_size: int):
    """Within this block the forwards of the call skip the token-id check (ids below ``vocab_size`` were checked)."""
    token = _CHECKED_VOCAB.set(vocab_size)
    try:
        yield
    finally:
        _CHECKED_VOCAB.reset(token)


def check_attention_mask(attention_mask, batch: int, past: int, length: int) -> None:
    """A 2-D ``[batch, past + new tokens]`` tensor; per-layer-type masks are built inside the model."""
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(
            f"attention_mask must be a 2-D [batch, past + new tokens] tensor of 1s and 0s, got a "
            f"{type(attention_mask).__name__} (per-layer-type 4-D masks are built inside the model)"
        )
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] != past + length:
        raise ValueError(
            f"attention_mask must be 2-D [batch, past + new tokens] = [{batch}, {past + length}], "
            f"got shape {tuple(attention_mask.shape)}"
        )


def padding_mask(attention_mask, batch: int, past: int, length: int, decoding: bool) -> torch.Tensor | None:
    """The 2-D mask if it may mark padding, else None (so the unpadded fast paths run).

    Outside a decode step an all-ones mask is dropped (one host sync). A decode step never reads the
    mask: ``generate()`` passes one only when its prompt was padded."""
    if attention_mask is None:
        return None
    check_attention_mask(attention_mask, batch, past, length)
    if decoding or is_tracing(attention_mask):
        return attention_mask
    return None if bool(attention_mask.all()) else attention_mask


def document_ids(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """Index of the packed document each of ``length`` positions belongs to."""
    positions = torch.arange(length, device=cu_seqlens.device)
    return torch.bucketize(positions, cu_seqlens[1:].to(positions.dtype), right=True)


def packed_documents(position_ids, attention_mask, cache, use_cache, batch: int, length: int) -> torch.Tensor | None:
    """``cu_seqlens`` of sequences flattened into one row (transformers' ``DataCollatorWithFlattening``: one row,
    positions that restart, no mask and no cache), or None.

    Where transformers' masks would see packed sequences (``find_packed_sequence_indices``: the positions
    do not step by one), the lightning layers must reset their state too. A padded row (``generate()``
    gives pads position 0, so positions repeat there) or an explicit ``use_cache=True`` is an ordinary
    sequence, never a packed batch."""
    if position_ids is None or position_ids.dim() != 2 or batch != 1 or length < 2:
        return None
    if cache is not None or use_cache:
        return None
    if isinstance(attention_mask, torch.Tensor) and not bool(attention_mask.all()):
        return None
    sequence = find_packed_sequence_indices(position_ids[:1])
    if sequence is None:
        return None
    starts = torch.nonzero(sequence[0, 1:] != sequence[0, :-1]).squeeze(1) + 1
    zero, end = starts.new_zeros(1), starts.new_full((1,), length)
    return torch.cat([zero, starts, end]).to(torch.int32)


def default_position_ids(length: int, past: int, device, shard=None, cu_seqlens=None, padding=None,
                         from_padding: bool = True) -> torch.Tensor:
    """Positions when the caller gives none: the shard's global positions (sequence parallelism), each
    packed document from 0, left-padded rows from their first real token (as ``generate()`` numbers them),
    or ``past ..`` after the cached tokens."""
    if shard is not None:
        return torch.arange(shard.offset, shard.offset + length, device=device).unsqueeze(0)
    if cu_seqlens is not None:
        docs = document_ids(cu_seqlens, length)
        return (torch.arange(length, device=device) - cu_seqlens[docs]).unsqueeze(0)
    if padding is not None and from_padding:
        return (padding.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
    return torch.arange(past, past + length, device=device).unsqueeze(0)
