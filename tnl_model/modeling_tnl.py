"""TNL model classes for transformers: ``TNLModel`` and ``TNLForCausalLM`` (DESIGN.md 3.5, 5).

A decoder whose layers are lightning-attention (``"linear_attention"``) or softmax
(``"full_attention"``) token mixers followed by a routed-MoE or dense FFN, in
MiniMax post-norm form or TransNormerLLM pre-norm form. Generation uses
transformers' hybrid ``DynamicCache(config=...)``.
"""

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.utils import logging
from transformers.utils.deprecation import deprecate_kwarg

from .cache_glue import prepare_cache, reserve_kv_capacity
from .configuration_tnl import FULL, LINEAR, TNLConfig
from .lightning_layer import TNLLightningAttention
from .load_checks import StrictLoadingMixin
from .moe import TNLDenseMLP, TNLExperts, TNLRouter, TNLSparseMoeBlock, load_balancing_loss, router_z_loss
from .norms import RMSNorm
from .rotary import TNLRotaryEmbedding
from .sequence_parallel import SequenceShard, group_sum, sequence_shard
from .softmax_attention import TNLSoftmaxAttention, document_ids


logger = logging.get_logger(__name__)


@dataclass
class TNLCausalLMOutput(MoeCausalLMOutputWithPast):
    """``loss = lm_loss + router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss``."""

    lm_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None


class TNLDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: TNLConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        if self.layer_type == LINEAR:
            self.self_attn = TNLLightningAttention(config, layer_idx)
            self.attn_alpha, self.attn_beta = config.linear_attn_alpha_factor, config.linear_attn_beta_factor
        else:
            self.self_attn = TNLSoftmaxAttention(config, layer_idx)
            self.attn_alpha, self.attn_beta = config.full_attn_alpha_factor, config.full_attn_beta_factor
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if config.mlp_layer_types[layer_idx] == "sparse":
            self.mlp = TNLSparseMoeBlock(config)
        else:
            self.mlp = TNLDenseMLP(config.hidden_size, config.dense_intermediate_size)
        self.mlp_alpha, self.mlp_beta = config.mlp_alpha_factor, config.mlp_beta_factor
        self.postnorm = config.postnorm

    def forward(self, hidden, token_mask=None, key_mask=None, cache=None, cu_seqlens=None, rotary=None,
                output_attentions=False, shard: SequenceShard | None = None):
        normed = self.input_layernorm(hidden)
        mixed, attn_weights = self.self_attn(normed, token_mask=token_mask, key_mask=key_mask, cache=cache,
                                             cu_seqlens=cu_seqlens, rotary=rotary, output_attentions=output_attentions,
                                             shard=shard)
        # Post-norm (MiniMax): the residual branch carries the normalised input, scaled by alpha.
        residual = normed if self.postnorm else hidden
        hidden = _scaled_sum(residual, self.attn_alpha, mixed, self.attn_beta)
        normed = self.post_attention_layernorm(hidden)
        ffn_out, router_logits = self.mlp(normed)
        residual = normed if self.postnorm else hidden
        hidden = _scaled_sum(residual, self.mlp_alpha, ffn_out, self.mlp_beta)
        return hidden, router_logits, attn_weights


def _scaled_sum(residual, alpha: float, branch, beta: float):
    """``residual * alpha + branch * beta`` in one pass when beta is 1 (the usual case)."""
    return torch.add(branch if beta == 1 else branch * beta, residual, alpha=alpha)


class TNLPreTrainedModel(StrictLoadingMixin, PreTrainedModel):
    config: TNLConfig
    config_class = TNLConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TNLDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _can_compile_fullgraph = False
    _keys_to_ignore_on_load_unexpected = [r"\.slope_rate$", r"\.query_decay$", r"\.key_decay$", r"\.diagonal_decay$"]

    def active_parameters(self, include_embeddings: bool = True) -> int:
        """Parameters one token uses (its top-k routed experts, everything else whole).

        ``include_embeddings=False`` leaves out the embedding and lm_head matrices, the convention of
        MiniMax-Text-01's published 45.9B activated parameters.
        """
        from .parameters import active_parameters

        return active_parameters(self, include_embeddings=include_embeddings)

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, TNLExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, TNLRouter):
            init.normal_(module.weight, mean=0.0, std=std)


def _check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise ValueError("input_ids is empty: give at least one token (e.g. the BOS token) to run the model")
    # One boolean crosses to the host, in eager mode only: a traced graph (torch.compile,
    # torch.export) cannot hold a data-dependent branch, and the eager boundary checked it.
    if torch.compiler.is_compiling():
        return
    if bool(((input_ids < 0) | (input_ids >= vocab_size)).any()):
        low, high = int(input_ids.min()), int(input_ids.max())
        bad = low if low < 0 else high
        raise ValueError(f"input_ids contains token id {bad}, outside the vocabulary [0, {vocab_size}) of this model; "
                         "check that the tokenizer matches the model")


def _positions_from_mask(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
    """Left padding: the first real token of each row gets position 0 (as generate() does)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -length:]


def _positions_in_documents(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    docs = document_ids(cu_seqlens, length)
    return (torch.arange(length, device=cu_seqlens.device) - cu_seqlens[docs]).unsqueeze(0)


def _may_be_packed(position_ids, attention_mask, cache, use_cache, batch: int, length: int) -> bool:
    """Whether restarting ``position_ids`` can mean sequences flattened into one row.

    ``DataCollatorWithFlattening`` sends one row, no attention mask and no cache. A padded row
    (generate() gives left pads position 1, so positions restart there) or an explicit
    ``use_cache=True`` is an ordinary sequence, never a packed batch.
    """
    if position_ids is None or position_ids.dim() != 2 or batch != 1 or length < 2:
        return False
    if cache is not None or use_cache:
        return False
    has_padding = isinstance(attention_mask, torch.Tensor) and not bool(attention_mask.all())
    return not has_padding


def _packed_bounds_from_positions(position_ids: torch.Tensor, length: int) -> torch.Tensor | None:
    """``cu_seqlens`` of sequences flattened into one row whose positions restart (transformers'
    ``DataCollatorWithFlattening``), or None when they never do."""
    positions = position_ids[0]
    restarts = torch.nonzero(positions[1:] <= positions[:-1]).squeeze(1) + 1
    if restarts.numel() == 0:
        return None
    zero, end = positions.new_zeros(1), positions.new_full((1,), length)
    return torch.cat([zero, restarts, end]).to(torch.int32)


def _merge_chunk_router_logits(chunks, batch: int) -> torch.Tensor:
    """One layer's router logits of consecutive chunks, each ``[B*Tc, E]``, as the single pass's ``[B*T, E]``:
    batch-major (each row's tokens together), not chunk-major."""
    return torch.cat([part.reshape(batch, -1, part.shape[-1]) for part in chunks], dim=1).flatten(0, 1)


class TNLModel(TNLPreTrainedModel):
    def __init__(self, config: TNLConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(TNLDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = TNLRotaryEmbedding(config)
        self.has_softmax_layers = FULL in config.layer_types
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache", raise_if_both_names=True)
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, cu_seqlens=None,
                prefill_chunk_size=None, keep_last=0, return_dict=None, sequence_parallel_group=None, **kwargs):
        """``keep_last > 0`` lets a chunked prefill return only the last ``keep_last`` hidden states and no
        router logits, so its memory does not grow with the prompt (generate() needs the last position only).

        ``sequence_parallel_group``: a torch.distributed group whose ranks each hold one contiguous, equal
        shard of the same sequences, in rank order (``tnl_model.sequence_parallel``); positions default to
        the shard's global positions. Training only: no cache, no padding mask, no packed documents."""
        if sequence_parallel_group is not None:
            kwargs["shard"] = self._sequence_shard(sequence_parallel_group, input_ids, inputs_embeds, attention_mask,
                                                   cache, use_cache, cu_seqlens if cu_seqlens is not None
                                                   else kwargs.get("cu_seq_lens_q"))
            use_cache = False
        outputs = self._forward(input_ids, attention_mask, position_ids, cache,
                                inputs_embeds, use_cache, output_attentions, output_hidden_states, cu_seqlens,
                                prefill_chunk_size, keep_last, **kwargs)
        return outputs if return_dict is not False else outputs.to_tuple()

    @staticmethod
    def _sequence_shard(group, input_ids, inputs_embeds, attention_mask, cache, use_cache, cu_seqlens) -> SequenceShard:
        if cache is not None or use_cache:
            raise ValueError("sequence parallelism is for training forwards: pass use_cache=False and no cache "
                             "(generation runs unsharded)")
        if cu_seqlens is not None:
            raise ValueError("packed documents (cu_seqlens) cannot be split across sequence-parallel ranks: train "
                             "with document_masking=false, or with sequence_parallel_size=1")
        if isinstance(attention_mask, torch.Tensor) and not bool(attention_mask.all()):
            raise ValueError("a padding attention_mask is not supported with sequence parallelism: shards are cut "
                             "from full, unpadded rows")
        length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        return sequence_shard(group, length)

    def _forward(self, input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, output_attentions,
                 output_hidden_states, cu_seqlens, prefill_chunk_size, keep_last, shard=None, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            _check_token_ids(input_ids, self.config.vocab_size)
        batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if length == 0:
            raise ValueError("the input is empty (sequence length 0): give at least one token")
        output_attentions = bool(output_attentions if output_attentions is not None else self.config.output_attentions)
        output_hidden_states = bool(output_hidden_states if output_hidden_states is not None
                                    else self.config.output_hidden_states)
        if cu_seqlens is None:
            cu_seqlens = kwargs.get("cu_seq_lens_q")  # DataCollatorWithFlattening(return_flash_attn_kwargs=True)
        if cu_seqlens is None and _may_be_packed(position_ids, attention_mask, cache, use_cache, batch, length):
            # Positions that restart mark sequences flattened into one row: keep them apart, as
            # flash-attention models in transformers do, instead of letting state flow across.
            cu_seqlens = _packed_bounds_from_positions(position_ids, length)
        cache = self._resolve_cache(cache, use_cache, packed=cu_seqlens is not None)
        if cu_seqlens is not None and (batch != 1 or cache is not None):
            raise ValueError("cu_seqlens (packed documents) needs a batch of 1 and no cache (use_cache=False)")
        past = cache.get_seq_length() if cache is not None else 0
        attention_mask = self._check_attention_mask(attention_mask, batch, past, length)

        chunk = prefill_chunk_size or self.config.prefill_chunk_size
        # Chunking bounds inference memory only: under autograd every chunk's activations are kept
        # for backward anyway, and the state carried between chunks would cut the gradient.
        if cache is not None and chunk and length > chunk and not torch.is_grad_enabled():
            # Chunk the token ids, not their embeddings: nothing of size [T, hidden] is ever built.
            tokens = input_ids if input_ids is not None else inputs_embeds
            return self._chunked_prefill(tokens, attention_mask, position_ids, cache, chunk, keep_last,
                                         output_attentions, output_hidden_states)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            if shard is not None:
                position_ids = torch.arange(shard.offset, shard.offset + length, device=inputs_embeds.device).unsqueeze(0)
            elif cu_seqlens is not None:
                position_ids = _positions_in_documents(cu_seqlens, length)
            elif attention_mask is not None and self.has_softmax_layers:
                position_ids = _positions_from_mask(attention_mask, length)
            else:
                position_ids = torch.arange(past, past + length, device=inputs_embeds.device).unsqueeze(0)
        rotary = None
        if self.has_softmax_layers:
            self._warn_beyond_trained_positions(past + length + (shard.offset if shard is not None else 0))
            rotary = self.rotary_emb(inputs_embeds, position_ids.expand(batch, -1))

        token_mask = attention_mask[:, -length:] if attention_mask is not None else None
        hidden = inputs_embeds
        all_hidden, all_attn, router_logits = [], [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden)
            hidden, layer_router_logits, attn_weights = layer(
                hidden, token_mask=token_mask, key_mask=attention_mask, cache=cache, cu_seqlens=cu_seqlens,
                rotary=rotary, output_attentions=output_attentions, shard=shard)
            if layer_router_logits is not None:
                router_logits.append(layer_router_logits)
            if output_attentions:  # one entry per layer: softmax weights, or a lightning layer's state
                all_attn.append(attn_weights)
        hidden = self.norm(hidden)
        if output_hidden_states:
            all_hidden.append(hidden)
        return MoeModelOutputWithPast(
            last_hidden_state=hidden,
            cache=cache,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
            router_logits=tuple(router_logits),
        )

    def _resolve_cache(self, cache, use_cache, packed: bool):
        """The cache this forward reads and updates, as in transformers' Llama: a cache the caller passes is
        always used; a new one is built only when ``use_cache`` (default ``config.use_cache``) asks for it."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            if cache is not None:
                raise ValueError("a cache cannot be used under gradient checkpointing in training (the recomputation "
                                 "in backward would update it twice): call model.eval() or run under torch.no_grad()")
            return None
        if use_cache is None:
            # Each packed sequence ends with its own state: nothing to continue.
            use_cache = False if packed else self.config.use_cache
        if cache is None and use_cache:
            cache = DynamicCache(config=self.config)
        prepare_cache(cache, self.config)
        return cache

    def _check_attention_mask(self, attention_mask, batch, past, length):
        """2-D ``[B, past+T]`` masks only; an all-ones mask is dropped so the fast unpadded paths run.

        Without softmax layers only the new tokens' columns matter (lightning layers zero k, v at
        pads), so decode does no work that grows with the context.
        """
        if attention_mask is None:
            return None
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
        if not self.has_softmax_layers:
            attention_mask = attention_mask[:, -length:]
        if bool(attention_mask.all()):
            return None
        return attention_mask

    def _warn_beyond_trained_positions(self, end: int) -> None:
        """Positions past ``max_position_embeddings`` run, as in every RoPE model of transformers (the lightning
        layers have no position limit at all); without RoPE scaling the softmax layers extrapolate, so say so once.
        ``end`` is the cache length plus the new tokens, known on the host: no device sync per step."""
        limit = self.config.max_position_embeddings
        if end > limit and self.rotary_emb.rope_type == "default":
            logger.warning_once(
                f"positions go beyond max_position_embeddings={limit}: the softmax layers' RoPE "
                "extrapolates there; set rope_parameters (e.g. rope_type 'yarn' or 'dynamic') to extend the context"
            )

    def _chunked_prefill(self, tokens, attention_mask, position_ids, cache, chunk, keep_last,
                         output_attentions, output_hidden_states):
        """Feed a long prompt through the cache ``chunk`` tokens at a time: same result as one pass,
        activation memory bounded by the chunk (plus what the caller asks to keep)."""
        if output_attentions or output_hidden_states:
            raise ValueError("output_attentions/output_hidden_states are not available with chunked prefill")
        length = tokens.shape[1]
        start_past = cache.get_seq_length()
        reserve_kv_capacity(cache, start_past + length)  # the softmax caches grow once, not per chunk
        pieces, router_logits = [], []
        is_ids = not tokens.is_floating_point()
        for start in range(0, length, chunk):
            stop = min(length, start + chunk)
            out = self.forward(
                input_ids=tokens[:, start:stop] if is_ids else None,
                inputs_embeds=None if is_ids else tokens[:, start:stop],
                attention_mask=None if attention_mask is None else attention_mask[:, : start_past + stop],
                position_ids=None if position_ids is None else position_ids[:, start:stop],
                cache=cache, use_cache=True, prefill_chunk_size=length + 1,
            )
            if not keep_last:
                pieces.append(out.last_hidden_state)
                router_logits.append(out.router_logits)
            elif stop > length - keep_last:
                pieces.append(out.last_hidden_state)
        hidden = torch.cat(pieces, dim=1)
        if keep_last:
            return MoeModelOutputWithPast(last_hidden_state=hidden[:, -keep_last:], cache=cache, router_logits=())
        merged_router = tuple(_merge_chunk_router_logits(per_layer, tokens.shape[0]) for per_layer in zip(*router_logits))
        return MoeModelOutputWithPast(last_hidden_state=hidden, cache=cache, router_logits=merged_router)


class TNLForCausalLM(TNLPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TNLConfig):
        super().__init__(config)
        self.model = TNLModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def _prefill(self, input_ids, generation_config, model_kwargs, *args, **kwargs):
        """Run generate()'s ``prefill_chunk_size`` through the model's own chunked prefill.

        transformers' generic chunked prefill asks the cache for its length, which an all-linear
        cache cannot answer; the model's chunking gives the same result for every layer layout.
        """
        chunk = generation_config.prefill_chunk_size
        if chunk is not None:
            generation_config = copy.copy(generation_config)
            generation_config.prefill_chunk_size = None
            model_kwargs = {**model_kwargs, "prefill_chunk_size": chunk}
        return super()._prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def _get_candidate_generator(self, generation_config, *args, **kwargs):
        """transformers' candidate generator; prompt lookup's backs off after rejected rounds (speculative.py)."""
        generator = super()._get_candidate_generator(generation_config, *args, **kwargs)
        if generation_config.prompt_lookup_num_tokens is not None and generation_config.assistant_early_exit is None:
            from .speculative import BackoffCandidateGenerator

            generator = BackoffCandidateGenerator(generator)
        return generator

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache", raise_if_both_names=True)
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                output_router_logits=None, logits_to_keep=0, cu_seqlens=None, return_dict=None,
                sequence_parallel_group=None, **kwargs):
        """``labels`` are shifted inside (as in every transformers causal LM); ``shift_labels`` (transformers'
        name) are already aligned with the inputs, position t holding the token that follows t.

        With ``sequence_parallel_group`` (each rank one contiguous shard of the same rows; see
        ``tnl_model.sequence_parallel``) labels must be shifted before sharding, so pass ``shift_labels``, and
        every loss returned is this rank's share: the shares add up over the group to the unsharded loss."""
        output_router_logits = (output_router_logits if output_router_logits is not None
                                else self.config.output_router_logits)
        has_labels = labels is not None or kwargs.get("shift_labels") is not None
        if kwargs.get("shift_labels") is not None:
            kwargs["shift_labels"] = kwargs["shift_labels"].contiguous()  # transformers' loss views it flat
        if sequence_parallel_group is not None:
            self._check_sequence_parallel_labels(labels, kwargs, sequence_parallel_group)
        # When only the last logits are wanted (generate), a chunked prefill keeps only those positions.
        keep_last = logits_to_keep if isinstance(logits_to_keep, int) and not has_labels and not output_router_logits else 0
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, inputs_embeds=inputs_embeds,
                             use_cache=use_cache, output_attentions=output_attentions,
                             output_hidden_states=output_hidden_states,
                             cu_seqlens=cu_seqlens if cu_seqlens is not None else kwargs.get("cu_seq_lens_q"),
                             prefill_chunk_size=kwargs.pop("prefill_chunk_size", None), keep_last=keep_last,
                             sequence_parallel_group=sequence_parallel_group)
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and 0 < logits_to_keep < hidden.shape[1]:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)

        loss = lm_loss = aux_loss = z_loss = None
        if has_labels:
            lm_loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
            loss = lm_loss
        if outputs.router_logits and (has_labels or output_router_logits):
            # The aux loss only counts real tokens; the mask covers the current tokens only.
            length = outputs.last_hidden_state.shape[1]
            token_mask = None if attention_mask is None else attention_mask[:, -length:]
            aux_loss = load_balancing_loss(outputs.router_logits, self.config.num_experts_per_tok, token_mask,
                                           group=sequence_parallel_group)
            z_loss = router_z_loss(outputs.router_logits, token_mask, group=sequence_parallel_group)
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss
                if self.config.router_z_loss_coef > 0:
                    loss = loss + self.config.router_z_loss_coef * z_loss
        result = TNLCausalLMOutput(
            loss=loss, aux_loss=aux_loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions, router_logits=outputs.router_logits if output_router_logits else None,
            lm_loss=lm_loss, z_loss=z_loss,
        )
        return result if return_dict is not False else result.to_tuple()

    @staticmethod
    def _check_sequence_parallel_labels(labels, kwargs, group) -> None:
        """Labels shifted before sharding, and the cross-entropy normalised by the group's token count (the
        caller may pass ``num_items_in_batch``, the count over the whole unsharded rows, to spare a collective)."""
        if labels is not None:
            raise ValueError("with sequence_parallel_group, shift labels before sharding and pass shift_labels "
                             "(a shard's last token is predicted from the next shard's first token)")
        shift_labels = kwargs.get("shift_labels")
        if shift_labels is not None and kwargs.get("num_items_in_batch") is None:
            kwargs["num_items_in_batch"] = group_sum((shift_labels != -100).sum(), group)


__all__ = ["TNLPreTrainedModel", "TNLModel", "TNLForCausalLM", "TNLCausalLMOutput", "TNLDecoderLayer",
           "TNLLightningAttention"]
