"""Intra-document attention for packed training rows (``document_masking: true``).

Training rows are cut from one stream of documents, each stored as ``BOS tokens EOS``
(:mod:`tnl_training.data`), so a row usually holds the end of one document and the start of
the next. By default a token sees everything before it in its row. With document masking a
micro-batch ``[B, L]`` becomes one packed row whose ``cu_seqlens`` cut it at every row start
and every BOS: lightning layers restart their state there, softmax layers attend within the
document, and rotary positions restart at 0 (the model's packed-documents path). The labels
keep every prediction the unpacked batch makes (``B * (L - 1)``) and no more: the first token
of each later row is not a target of the row before it.
"""

import torch

IGNORE_INDEX = -100  # transformers' causal-LM loss skips these labels


def pack_documents(rows: torch.Tensor, bos_token_id: int) -> dict:
    """Model inputs for rows ``[B, L]``: ``input_ids`` and ``labels`` ``[1, B*L]`` and int32 ``cu_seqlens``."""
    if rows.dim() != 2 or rows.numel() == 0:
        raise ValueError(f"expected a non-empty [batch, length] tensor of token ids, got shape {tuple(rows.shape)}")
    batch, length = rows.shape
    starts = rows == bos_token_id
    starts[:, 0] = True  # a row that begins inside a document starts a segment too
    boundaries = torch.nonzero(starts.reshape(-1)).squeeze(1)
    end = torch.tensor([batch * length], device=rows.device)
    cu_seqlens = torch.cat([boundaries, end]).to(torch.int32)
    input_ids = rows.reshape(1, batch * length)
    labels = input_ids.clone()
    labels[0, length::length] = IGNORE_INDEX  # predicted by no one: the previous row's last token is not its context
    return {"input_ids": input_ids, "labels": labels, "cu_seqlens": cu_seqlens}


def unpack_rows(packed: torch.Tensor, batch: int) -> torch.Tensor:
    """``[1, B*L, ...]`` model outputs back to ``[B, L, ...]``."""
    return packed.reshape(batch, packed.shape[1] // batch, *packed.shape[2:])


__all__ = ["pack_documents", "unpack_rows", "IGNORE_INDEX"]
