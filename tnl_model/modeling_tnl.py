"""TNL model classes for transformers: ``TNLModel`` and ``TNLForCausalLM`` (DESIGN.md 3.5, 5).

A decoder whose layers are lightning-attention (``"linear_attention"``) or softmax
(``"full_attention"``) token mixers followed by a routed-MoE or dense FFN, in
MiniMax post-norm form or TransNormerLLM pre-norm form. Generation uses
transformers' hybrid ``DynamicCache(config=...)``.

The forward has transformers' Llama shape (cache, masks, rotary, layer loop, norm): one mask per
layer type from ``transformers.masking_utils`` (``tnl_model.masks``), softmax attention through
transformers' ``AttentionInterface`` (``tnl_model.attention_functions``), hidden states, attentions
and router logits recorded by transformers' output recorders (``_can_record_outputs``). Checks that
read values run at the boundaries of a call (``tnl_model.inputs``); chunked prefill wraps the
forward (``tnl_model.chunked_prefill``).
"""

import copy
from dataclasses import dataclass
from typing import Unpack

import torch
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import OutputRecorder, capture_outputs, maybe_install_capturing_hooks

from .cache_glue import prepare_cache
from .chunked_prefill import prefill_in_chunks
from .configuration_tnl import FULL, LINEAR, TNLConfig
from .inputs import (check_token_ids, checked_token_ids, default_position_ids, packed_documents, padding_mask,
                     token_ids_checked)
from .lightning_layer import TNLLightningAttention
from .load_checks import StrictLoadingMixin
from .masks import layer_masks
from .moe import TNLDenseMLP, TNLExperts, TNLRouter, TNLSparseMoeBlock, load_balancing_loss, router_z_loss
from .norms import RMSNorm
from .rotary import TNLRotaryEmbedding
from .sequence_parallel import SequenceShard, group_sum, sequence_shard
from .softmax_attention import TNLSoftmaxAttention


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

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None,
                **kwargs: Unpack[TransformersKwargs]) -> torch.Tensor:
        """``attention_mask``: this layer type's mask (``tnl_model.masks``); ``kwargs`` reach the token mixer
        (``cu_seqlens``, ``shard``, ``output_attentions``, ``position_ids``, ...)."""
        normed = self.input_layernorm(hidden_states)
        mixed, _ = self.self_attn(normed, attention_mask=attention_mask, position_embeddings=position_embeddings,
                                  cache=cache, **kwargs)
        # Post-norm (MiniMax): the residual branch carries the normalised input, scaled by alpha.
        residual = normed if self.postnorm else hidden_states
        hidden_states = _scaled_sum(residual, self.attn_alpha, mixed, self.attn_beta)
        normed = self.post_attention_layernorm(hidden_states)
        ffn_out, _ = self.mlp(normed)  # the router logits are recorded from TNLRouter (_can_record_outputs)
        residual = normed if self.postnorm else hidden_states
        return _scaled_sum(residual, self.mlp_alpha, ffn_out, self.mlp_beta)


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
    # transformers' output recorders: one attentions entry per layer (a lightning layer's is its fp32 state, as in
    # transformers' MiniMax), the router logits [B*T, E] of each sparse layer.
    _can_record_outputs = {
        "hidden_states": TNLDecoderLayer,
        "attentions": [TNLSoftmaxAttention, TNLLightningAttention],
        "router_logits": OutputRecorder(TNLRouter, index=0),
    }

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
        # transformers installs the recorders' hooks at the first forward that asks for an output; under torch.compile
        # that forward would trace the installation and change the modules' hooks under compiled frames (one recompile
        # per module class). Installed now, they are in every graph from the start, and idle unless an output is asked.
        maybe_install_capturing_hooks(self)

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache", raise_if_both_names=True)
    @prefill_in_chunks
    @capture_outputs
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, cu_seqlens=None, sequence_parallel_group=None,
                **kwargs: Unpack[TransformersKwargs]) -> MoeModelOutputWithPast:
        """``attention_mask``: 2-D ``[B, past + T]``. ``cu_seqlens`` (int32 ``[N+1]``, batch 1, no cache): packed
        documents, each attended and recurred alone; restarting ``position_ids`` in one row without a mask
        or cache (transformers' ``DataCollatorWithFlattening``) are read as packed documents too.

        ``prefill_chunk_size`` (default ``config.prefill_chunk_size``) and ``keep_last``: chunked prefill
        (``tnl_model.chunked_prefill``). ``sequence_parallel_group``: a torch.distributed group whose ranks each
        hold one contiguous, equal shard of the same sequences, in rank order (``tnl_model.sequence_parallel``);
        positions default to the shard's global positions. Training only: no cache, no padding mask, no packed
        documents."""
        batch, length = self._check_inputs(input_ids, inputs_embeds)
        if cu_seqlens is None:
            cu_seqlens = kwargs.get("cu_seq_lens_q")  # DataCollatorWithFlattening(return_flash_attn_kwargs=True)
        shard = None
        if sequence_parallel_group is not None:
            shard = self._sequence_shard(sequence_parallel_group, length, attention_mask, cache, use_cache, cu_seqlens)
            use_cache = False
        if cu_seqlens is None:
            cu_seqlens = packed_documents(position_ids, attention_mask, cache, use_cache, batch, length)

        cache = self._resolve_cache(cache, use_cache, packed=cu_seqlens is not None)
        if cu_seqlens is not None and (batch != 1 or cache is not None):
            raise ValueError("cu_seqlens (packed documents) needs a batch of 1 and no cache (use_cache=False)")
        past = cache.get_seq_length() if cache is not None else 0
        decoding = past > 0 and length == 1  # reads no values back (tnl_model.inputs)
        if input_ids is not None and not decoding and not token_ids_checked(self.config.vocab_size):
            check_token_ids(input_ids, self.config.vocab_size)
        padding = padding_mask(attention_mask, batch, past, length, decoding)

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = default_position_ids(length, past, inputs_embeds.device, shard, cu_seqlens, padding,
                                                from_padding=self.has_softmax_layers)
        kwargs["output_attentions"] = bool(kwargs.get("output_attentions", self.config.output_attentions))
        masks = layer_masks(self.config, inputs_embeds, padding, cache, cu_seqlens, kwargs["output_attentions"])
        position_embeddings = None
        if self.has_softmax_layers:
            self._warn_beyond_trained_positions(past + length + (shard.offset if shard is not None else 0))
            position_embeddings = self.rotary_emb(inputs_embeds, position_ids.expand(batch, -1))

        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=masks[layer.layer_type],
                                  position_embeddings=position_embeddings, position_ids=position_ids, cache=cache,
                                  cu_seqlens=cu_seqlens, shard=shard, **kwargs)
        return MoeModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)

    def _check_inputs(self, input_ids, inputs_embeds) -> tuple[int, int]:
        """Exactly one of ids or embeddings, at least one token: ``(batch, length)``. Reads shapes only."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            check_token_ids(input_ids, self.config.vocab_size, values=False)
        batch, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if length == 0:
            raise ValueError("the input is empty (sequence length 0): give at least one token")
        return batch, length

    @staticmethod
    def _sequence_shard(group, length, attention_mask, cache, use_cache, cu_seqlens) -> SequenceShard:
        if cache is not None or use_cache:
            raise ValueError("sequence parallelism is for training forwards: pass use_cache=False and no cache "
                             "(generation runs unsharded)")
        if cu_seqlens is not None:
            raise ValueError("packed documents (cu_seqlens) cannot be split across sequence-parallel ranks: train "
                             "with document_masking=false, or with sequence_parallel_size=1")
        if isinstance(attention_mask, torch.Tensor) and not bool(attention_mask.all()):
            raise ValueError("a padding attention_mask is not supported with sequence parallelism: shards are cut "
                             "from full, unpadded rows")
        return sequence_shard(group, length)

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

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def generate(self, inputs=None, *args, **kwargs):
        """transformers' generate(); the prompt's token ids are checked once here, not by every forward of the loop."""
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor) and not ids.is_floating_point():
            check_token_ids(ids, self.config.vocab_size)
            with checked_token_ids(self.config.vocab_size):
                return super().generate(inputs, *args, **kwargs)
        return super().generate(inputs, *args, **kwargs)

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

    def _get_candidate_generator(self, generation_config, *args, **kwargs):
        """transformers' candidate generator; prompt lookup's backs off after rejected rounds (speculative.py)."""
        generator = super()._get_candidate_generator(generation_config, *args, **kwargs)
        if generation_config.prompt_lookup_num_tokens is not None and generation_config.assistant_early_exit is None:
            from .speculative import BackoffCandidateGenerator

            generator = BackoffCandidateGenerator(generator, cache=kwargs.get("model_kwargs", {}).get("cache"))
        return generator

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache", raise_if_both_names=True)
    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, output_router_logits=None, logits_to_keep=0, cu_seqlens=None,
                sequence_parallel_group=None, **kwargs: Unpack[TransformersKwargs]) -> TNLCausalLMOutput:
        """``labels`` are shifted inside (as in every transformers causal LM); ``shift_labels`` (transformers'
        name) are already aligned with the inputs, position t holding the token that follows t.

        With ``sequence_parallel_group`` (each rank one contiguous shard of the same rows; see
        ``tnl_model.sequence_parallel``) labels must be shifted before sharding, so pass ``shift_labels``, and
        every loss returned is this rank's share: the shares add up over the group to the unsharded loss."""
        output_router_logits = (output_router_logits if output_router_logits is not None
                                else self.config.output_router_logits)
        loss_kwargs = {name: kwargs.pop(name) for name in ("num_items_in_batch", "shift_labels", "ignore_index")
                       if name in kwargs}
        if loss_kwargs.get("shift_labels") is not None:
            loss_kwargs["shift_labels"] = loss_kwargs["shift_labels"].contiguous()  # transformers' loss views it flat
        has_labels = labels is not None or loss_kwargs.get("shift_labels") is not None
        if sequence_parallel_group is not None:
            self._check_sequence_parallel_labels(labels, loss_kwargs, sequence_parallel_group)
        # When only the last logits are wanted (generate), a chunked prefill keeps only those positions.
        keep_last = logits_to_keep if isinstance(logits_to_keep, int) and not has_labels and not output_router_logits else 0
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, cu_seqlens=cu_seqlens,
                             sequence_parallel_group=sequence_parallel_group, keep_last=keep_last, return_dict=True,
                             output_router_logits=bool(output_router_logits or has_labels), **kwargs)
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))

        loss = lm_loss = aux_loss = z_loss = None
        if has_labels:
            lm_loss = self.loss_function(logits, labels, self.vocab_size, **loss_kwargs)
            loss = lm_loss
        if outputs.router_logits:
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
        return TNLCausalLMOutput(
            loss=loss, aux_loss=aux_loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions, router_logits=outputs.router_logits if output_router_logits else None,
            lm_loss=lm_loss, z_loss=z_loss,
        )

    @staticmethod
    def _check_sequence_parallel_labels(labels, loss_kwargs, group) -> None:
        """Labels shifted before sharding, and the cross-entropy normalised by the group's token count (the
        caller may pass ``num_items_in_batch``, the count over the whole unsharded rows, to spare a collective)."""
        if labels is not None:
            raise ValueError("with sequence_parallel_group, shift labels before sharding and pass shift_labels "
                             "(a shard's last token is predicted from the next shard's first token)")
        shift_labels = loss_kwargs.get("shift_labels")
        if shift_labels is not None and loss_kwargs.get("num_items_in_batch") is None:
            loss_kwargs["num_items_in_batch"] = group_sum((shift_labels != -100).sum(), group)


__all__ = ["TNLPreTrainedModel", "TNLModel", "TNLForCausalLM", "TNLCausalLMOutput", "TNLDecoderLayer",
           "TNLLightningAttention"]
