"""Log-likelihood scoring of continuations, the call lm-evaluation-harness makes.

``loglikelihood(model, tokenizer, [(context, continuation), ...])`` returns, per
request, ``(sum of log p(continuation tokens | context), is_greedy)`` where
``is_greedy`` says whether greedy decoding would have produced exactly the
continuation. A request is two token-id lists (scored as given) or two strings,
which need a tokenizer and are tokenised exactly as lm-evaluation-harness's
Hugging Face model (``lm_eval.models.huggingface.HFLM``, causal backend) does:

- trailing whitespace of the context moves to the front of the continuation;
- ``whole = encode(context + continuation)``, ``context_ids = encode(context)`` and
  the continuation is ``whole[len(context_ids):]`` (joint encoding, so a
  sentencepiece tokenizer splits the word boundary the way it would in running text);
- ``encode`` lets the tokenizer add its special tokens (BOS) unless the text already
  starts with the prefix token's text, or ``add_bos_token`` (HFLM's model argument of
  that name) says otherwise;
- an empty context becomes the prefix token (the tokenizer's BOS, else its EOS) and
  the continuation is encoded without special tokens; if the continuation already
  starts with the prefix token, that token becomes the context.

``tests/ecosystem/test_lm_eval.py`` runs lm-eval itself and checks the numbers agree.
Batches are padded (right padding by default; left padding with ``padding_side="left"``)
and the numbers equal one-request-at-a-time scoring up to float rounding of the
batched matmuls (tested to 1e-4 absolute in fp32).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F


def _as_ids(piece) -> list[int]:
    if isinstance(piece, torch.Tensor):
        return [int(t) for t in piece.reshape(-1).tolist()]
    return [int(t) for t in piece]


def _first(value):
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    return value


def _prefix_token(model, tokenizer) -> int:
    """The token an empty context is replaced by: HFLM's ``prefix_token_id`` (the tokenizer's BOS,
    else its EOS), falling back to the model config's BOS/EOS when there is no tokenizer."""
    for source in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None),
                   model.config.bos_token_id, model.config.eos_token_id):
        source = _first(source)
        if source is not None:
            return int(source)
    raise ValueError("a request has an empty context and the model has no bos/eos token to condition on")


def _encode(tokenizer, text: str, prefix: int, add_bos_token: bool | None,
            add_special_tokens: bool | None = None) -> list[int]:
    """HFLM's ``tok_encode``: the tokenizer's own special tokens unless told otherwise or the
    text already starts with the prefix token's text."""
    if add_special_tokens is not None:
        kwargs = {"add_special_tokens": add_special_tokens}
    elif add_bos_token is not None:
        kwargs = {"add_special_tokens": add_bos_token}
    else:
        kwargs = {}
    if add_special_tokens is None and text.startswith(tokenizer.decode(prefix)):
        kwargs["add_special_tokens"] = False
    return list(tokenizer.encode(text, **kwargs))


def _encode_strings(tokenizer, context: str, continuation: str, prefix: int,
                    add_bos_token: bool | None) -> tuple[list[int], list[int]]:
    """HFLM's ``loglikelihood`` + ``_encode_pair`` for a causal model."""
    if context == "":
        continuation_ids = _encode(tokenizer, continuation, prefix, add_bos_token, add_special_tokens=False)
        if continuation_ids and continuation_ids[0] == prefix:
            return continuation_ids[:1], continuation_ids[1:]
        return [prefix], continuation_ids
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = _encode(tokenizer, context + continuation, prefix, add_bos_token)
    context_ids = _encode(tokenizer, context, prefix, add_bos_token)
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def loglikelihood(model, tokenizer, requests: Sequence[tuple], batch_size: int = 8, padding_side: str = "right",
                  max_length: int | None = None, add_bos_token: bool | None = None) -> list[tuple[float, bool]]:
    """Score ``(context, continuation)`` pairs; results in request order.

    String pairs are tokenised as lm-evaluation-harness's HFLM does (module docstring);
    ``add_bos_token`` is HFLM's model argument of that name (None: the tokenizer decides).
    An empty context is replaced by the prefix token: the tokenizer's BOS, else its EOS
    (the model config's without a tokenizer). Inputs longer than ``max_length`` (default
    ``max_position_embeddings``) keep their last ``max_length`` tokens (the continuation
    must fit). Padding uses the model's ``pad_token_id`` (0 if unset) with an attention mask.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_length = max_length or model.config.max_position_embeddings
    prepared = []  # (input ids, number of continuation tokens)
    for index, request in enumerate(requests):
        if len(request) != 2:
            raise ValueError(f"request {index} must be a (context, continuation) pair, got {request!r}")
        context, continuation = request
        strings = [isinstance(part, str) for part in request]
        if all(strings):
            if tokenizer is None:
                raise ValueError("string requests need a tokenizer; pass token-id lists or a tokenizer")
            context, continuation = _encode_strings(tokenizer, context, continuation,
                                                    _prefix_token(model, tokenizer), add_bos_token)
        elif any(strings):
            raise ValueError(f"request {index} mixes a string and token ids; give two strings (tokenised together, "
                             "as lm-evaluation-harness does) or two token-id lists")
        else:
            context, continuation = _as_ids(context), _as_ids(continuation)
        if not continuation:
            raise ValueError(f"request {index} has an empty continuation: nothing to score")
        if not context:
            context = [_prefix_token(model, tokenizer)]
        vocab = model.config.vocab_size
        bad = [t for t in context + continuation if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"request {index} contains token id {bad[0]}, outside the vocabulary [0, {vocab}) of this "
                             "model; check that the tokenizer matches the model")
        if len(continuation) > max_length:
            raise ValueError(f"request {index}: continuation of {len(continuation)} tokens is longer than "
                             f"max_length={max_length}")
        full = (context + continuation)[-(max_length + 1):]
        prepared.append((full[:-1], continuation))

    device = next(model.parameters()).device
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    # Longest first (as the harness does) so a batch holds similar lengths; results go back in order.
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
    results: list[tuple[float, bool] | None] = [None] * len(prepared)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(prepared[i][0]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            tokens = prepared[i][0]
            cols = slice(0, len(tokens)) if padding_side == "right" else slice(width - len(tokens), width)
            ids[row, cols] = torch.tensor(tokens)
            mask[row, cols] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        logprobs = F.log_softmax(logits.float(), dim=-1)
        for row, i in enumerate(chunk):
            tokens, continuation = prepared[i]
            n = len(continuation)
            end = len(tokens) if padding_side == "right" else width
            scores = logprobs[row, end - n:end]  # the positions that predict the continuation
            target = torch.tensor(continuation, device=scores.device)
            total = float(scores.gather(-1, target[:, None]).sum())
            greedy = bool((scores.argmax(-1) == target).all())
            results[i] = (total, greedy)
    return results


__all__ = ["loglikelihood"]
