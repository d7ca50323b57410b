"""The cache layer of one lightning-attention layer: its fp32 state, its token count, and an exact rollback.

transformers' ``LinearAttentionLayer`` is built for conv + recurrent states (Mamba-style): its
token count only moves with conv-state updates, and its ``crop`` restores per-token copies of the
recurrent state. A lightning layer has no conv state, and its update ``S <- lambda S + k^T v``
lets a state be rebuilt from an earlier state plus the tokens' k and v, so this layer keeps:

- ``state``: the fp32 recurrent state ``[B, H, D, E]`` (also ``recurrent_states[0]``, where the
  mixin's beam reorder, offloading and reset find it);
- the number of tokens it has seen, so ``Cache.get_seq_length()`` is right whatever layer 0 is
  (``generate()`` reads it to know how much of a returned cache to skip);
- while past recording is on (``activate_past_recording``, which transformers' assisted decoding
  and prompt lookup call), a :class:`RollbackRecord`: the state from before the recorded tokens and
  their k and v. ``crop(-n)`` rebuilds the state after all but the last ``n`` recorded tokens with
  the lightning operator seeded from that state, exactly as a plain forward over the kept tokens
  would. Memory is the window's ``T * H * (D + E)`` values, not ``T`` states. Without recording
  nothing is kept, so ordinary decoding stays constant in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import LinearAttentionCacheLayerMixin

from tnl_kernels import lightning_attn, lightning_attn_decode


@dataclass
class RollbackRecord:
    """What ``crop`` needs: the state before the recorded tokens, and their k, v and the layer's decay rates.

    k and v are kept in the compute dtype, as the forward fed them to the operator: a rebuild from
    them repeats the forward's own arithmetic, and fp32 copies would only double the memory.
    """

    initial_state: torch.Tensor | None  # fp32 [B, H, D, E]; None = the layer had seen nothing yet
    slopes: torch.Tensor
    keys: list[torch.Tensor] = field(default_factory=list)  # each [B, t, H, D], pad positions zeroed
    values: list[torch.Tensor] = field(default_factory=list)  # each [B, t, H, E]

    @property
    def length(self) -> int:
        return sum(k.shape[1] for k in self.keys)


class LightningStateLayer(LinearAttentionCacheLayerMixin):
    """One lightning layer's entry in transformers' ``DynamicCache`` (see the module docstring)."""

    is_croppable = True  # crop is exact: rebuilt from the recorded tokens, never approximated

    def __init__(self):
        super().__init__(number_of_states=1)
        self.seen_tokens = 0
        self.record: RollbackRecord | None = None

    @classmethod
    def adopt(cls, layer: LinearAttentionCacheLayerMixin) -> "LightningStateLayer":
        """Replace transformers' generic layer (as ``DynamicCache(config=...)`` builds it) before any use,
        keeping a past-recording request made on it (assisted decoding asks before the first forward)."""
        if layer.is_recurrent_states_initialized[0]:
            raise ValueError("this cache already holds a recurrent state written by another model class; start from "
                             "a new DynamicCache(config=model.config)")
        adopted = cls()
        if getattr(layer, "record_past", False):
            adopted.activate_past_recording(getattr(layer, "recurrent_states_to_keep", None))
        return adopted

    # --- what the lightning layer reads and writes ---------------------------------------------------

    @property
    def state(self) -> torch.Tensor | None:
        """The fp32 state ``[B, H, D, E]``, or None before the first token."""
        return self.recurrent_states[0] if self.has_previous_state[0] else None

    def begin_update(self, keys: torch.Tensor, values: torch.Tensor, slopes: torch.Tensor) -> None:
        """Called before the layer advances its state over ``keys``/``values`` ``[B, T, H, *]``.

        While recording, keeps the state from before the first recorded token and every token's k, v.
        """
        self.seen_tokens += keys.shape[1]
        if not self.record_past:
            self.record = None
            return
        if self.record is None:
            before = self.state
            self.record = RollbackRecord(None if before is None else before.clone(), slopes)
        self.record.keys.append(keys.detach())
        self.record.values.append(values.detach())

    def store(self, state: torch.Tensor, *, same_batch: bool = True) -> None:
        """Keep ``state`` (fp32, detached) as the layer's state; an in-place decode on :attr:`state` needs no call."""
        state = state.detach().float()
        current = self.recurrent_states[0]
        if same_batch and current is not None and self.has_previous_state[0] and current.shape != state.shape:
            raise ValueError(
                f"the cached lightning state has shape {tuple(current.shape)} but this forward produced "
                f"{tuple(state.shape)}: a cache holds one batch's context; pass a new cache for a new batch"
            )
        self.recurrent_states[0] = state
        self.is_recurrent_states_initialized[0] = True
        self.has_previous_state[0] = True
        self.device, self.dtype = state.device, state.dtype
        self.batch_size = state.shape[0]  # read by Cache.batch_size once the layer holds a state

    # --- transformers' cache-layer interface ---------------------------------------------------------

    def lazy_initialization(self, conv_states=None, recurrent_states=None, state_idx: int = 0) -> None:
        if recurrent_states is not None:
            self.store(torch.zeros_like(recurrent_states))

    def update_conv_state(self, conv_states, state_idx: int = 0, **kwargs):
        raise NotImplementedError("lightning layers keep no convolution state")

    def update_recurrent_state(self, recurrent_states, state_idx: int = 0, **kwargs):
        self.store(recurrent_states)
        return self.recurrent_states[0]

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def increase_count(self, state_idx: int) -> None:
        if state_idx == 0:
            self.seen_tokens += 1

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0
        self.record = None

    def activate_past_recording(self, recurrent_states_to_keep: int | None = None) -> None:
        self.record_past = True
        self.recurrent_states_to_keep = recurrent_states_to_keep

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` tokens (transformers' convention: a number <= 0).

        ``crop(0)`` keeps every token and ends the current record (the next forward starts a new one).
        """
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes the number of tokens to remove as a negative number (or 0), got "
                             f"{tokens_to_remove}")
        remove = -tokens_to_remove
        record, self.record = self.record, None
        if remove == 0:
            return
        if record is None or remove > record.length:
            recorded = 0 if record is None else record.length
            raise ValueError(
                f"cannot remove {remove} tokens from a lightning layer that recorded {recorded} since its last crop: "
                "call cache.activate_past_recording() before the forward whose tokens you may want to remove"
            )
        keep = record.length - remove
        self.seen_tokens -= remove
        if keep == 0 and record.initial_state is None:
            self.recurrent_states[0].zero_()
            self.has_previous_state[0] = False
            return
        self.store(_rebuild_state(record, keep))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_recurrent_states_initialized[0]:
            self.store(self.recurrent_states[0].repeat_interleave(repeats, dim=0), same_batch=False)
        self.record = None

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_recurrent_states_initialized[0]:
            self.store(self.recurrent_states[0][indices], same_batch=False)
        self.record = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.record = None  # beams are not rolled back; a stale record must not be replayed on reordered rows


#: up to this many kept tokens the state is rebuilt by decode steps (what plain decoding of them computes,
#: and cheaper than the chunked operator's set-up for a handful of tokens); beyond, by the operator
DECODE_STEPS_UP_TO = 4


def _rebuild_state(record: RollbackRecord, keep: int) -> torch.Tensor:
    """The state after the first ``keep`` recorded tokens, from the state before them."""
    keys = torch.cat(record.keys, dim=1)[:, :keep]
    values = torch.cat(record.values, dim=1)[:, :keep]
    if keep == 0:
        return record.initial_state.clone()
    if record.initial_state is not None and keep <= DECODE_STEPS_UP_TO:
        state = record.initial_state.clone()
        for t in range(keep):  # the output is not needed; the key stands in for the query
            lightning_attn_decode(keys[:, t], keys[:, t], values[:, t], record.slopes, state)
        return state
    # The operator's output is not needed; the keys stand in for the queries.
    _, state = lightning_attn(keys, keys, values, record.slopes, initial_state=record.initial_state,
                              output_final_state=True)
    return state


__all__ = ["LightningStateLayer", "RollbackRecord"]
