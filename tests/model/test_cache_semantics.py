"""How a forward picks its cache and shapes its outputs, as transformers' own models do.

* a cache the caller passes is always used and updated, whatever ``use_cache`` resolves to;
* a plain ``DynamicCache()`` gets the layers ``DynamicCache(config=...)`` would have;
* a batch-1 left-padded row with generate()-style positions is one sequence, not a packed batch;
* chunked prefill returns router logits in the single pass's batch-major order;
* ``return_dict=False`` and ``config.output_hidden_states`` are honoured by the base model.
"""

import pytest
import torch
from transformers import DynamicCache

from tnl_model.testing import build_model, random_ids, tiny_config

ATOL = 2e-5


@torch.no_grad()
@pytest.mark.parametrize("how", ["config_use_cache_false", "use_cache_false"])
def test_a_passed_cache_is_used_when_use_cache_resolves_to_false(how):
    model = build_model(tiny_config())
    ids = random_ids(2, 9)
    full = model(ids, use_cache=False).logits
    cache = DynamicCache(config=model.config)
    model(ids[:, :5], cache=cache, use_cache=True)
    if how == "config_use_cache_false":
        model.config.use_cache = False
        out = model(ids[:, 5:], past_key_values=cache)
    else:
        out = model(ids[:, 5:], past_key_values=cache, use_cache=False)
    torch.testing.assert_close(out.logits, full[:, 5:], atol=ATOL, rtol=0)
    assert out.cache is cache
    step = model(ids[:, -1:], cache=cache).logits  # the continuation was written into the cache
    torch.testing.assert_close(step, model(torch.cat([ids, ids[:, -1:]], 1), use_cache=False).logits[:, -1:],
                               atol=ATOL, rtol=0)


@torch.no_grad()
def test_no_cache_is_built_when_use_cache_resolves_to_false():
    model = build_model(tiny_config(use_cache=False))
    assert model(random_ids(1, 4)).cache is None
    assert model(random_ids(1, 4), use_cache=True).cache is not None


@torch.no_grad()
def test_packed_sequences_with_a_passed_cache_are_an_error():
    model = build_model(tiny_config())
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(random_ids(1, 6), cu_seqlens=torch.tensor([0, 2, 6], dtype=torch.int32),
              cache=DynamicCache(config=model.config))


def test_a_passed_cache_under_gradient_checkpointing_in_training_is_an_error():
    model = build_model(tiny_config()).train()
    model.activation_checkpointing_enable()
    ids = random_ids(1, 6)
    assert model(ids, labels=ids, use_cache=True).cache is None  # recomputation would write it twice
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(ids, labels=ids, cache=DynamicCache(config=model.config))
    with torch.no_grad():  # no backward, no recomputation: generation from a training-mode model
        assert model(ids, cache=DynamicCache(config=model.config)).cache is not None


@torch.no_grad()
def test_plain_dynamic_cache_in_forward_equals_the_config_built_cache():
    model = build_model(tiny_config())
    ids = random_ids(2, 9)
    plain, built = DynamicCache(), DynamicCache(config=model.config)
    first = model(ids[:, :5], past_key_values=plain, use_cache=True)
    reference = model(ids[:, :5], past_key_values=built, use_cache=True)
    assert first.cache is plain and len(plain.layers) == model.config.num_hidden_layers
    assert [type(a) for a in plain.layers] == [type(b) for b in built.layers]
    torch.testing.assert_close(first.logits, reference.logits, atol=0, rtol=0)
    cont = model(ids[:, 5:], past_key_values=plain).logits
    torch.testing.assert_close(cont, model(ids[:, 5:], past_key_values=built).logits, atol=0, rtol=0)


@torch.no_grad()
def test_plain_dynamic_cache_in_generate_equals_the_config_built_cache():
    model = build_model(tiny_config())
    ids = random_ids(1, 5)
    plain = DynamicCache()
    kwargs = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_scores=True)
    with_plain = model.generate(ids, cache=plain, **kwargs)
    with_built = model.generate(ids, cache=DynamicCache(config=model.config), **kwargs)
    assert torch.equal(with_plain.sequences, with_built.sequences)
    torch.testing.assert_close(torch.stack(with_plain.scores), torch.stack(with_built.scores), atol=0, rtol=0)
    assert len(plain.layers) == model.config.num_hidden_layers  # the caller's object was filled


@torch.no_grad()
def test_a_cache_built_for_another_layout_is_a_named_type_error():
    model = build_model(tiny_config())
    other = tiny_config(layer_types=["full_attention"] * 4)
    with pytest.raises(TypeError, match="DynamicCache\\(config=model.config\\)"):
        model(random_ids(1, 4), cache=DynamicCache(config=other))


@torch.no_grad()
@pytest.mark.parametrize("use_cache", [None, True])
def test_batch_of_one_left_padded_with_generate_positions_is_not_packed(use_cache):
    """generate() gives pads position 1, so positions 'restart' after the pads: with an attention
    mask holding zeros this is one padded sequence, and its cache is built and continued."""
    model = build_model(tiny_config())
    ids = random_ids(1, 6)
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids[:, :5]], dim=1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    out = model(padded, attention_mask=mask, position_ids=positions, use_cache=use_cache)
    alone = model(ids, use_cache=False).logits
    torch.testing.assert_close(out.logits[:, 2:], alone[:, :5], atol=ATOL, rtol=0)
    assert out.cache is not None
    mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
    step = model(ids[:, 5:], attention_mask=mask, position_ids=torch.tensor([[5]]), cache=out.cache).logits
    torch.testing.assert_close(step, alone[:, 5:], atol=ATOL, rtol=0)


@torch.no_grad()
def test_chunked_prefill_router_logits_equal_the_single_pass():
    model = build_model(tiny_config())
    ids = random_ids(2, 10)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in row 1: the aux losses mask by row
    single = model(ids, attention_mask=mask, output_router_logits=True)
    chunked = model(ids, attention_mask=mask, output_router_logits=True, prefill_chunk_size=4)
    assert len(chunked.router_logits) == len(single.router_logits) == 3  # the sparse layers
    real = mask.flatten().bool()  # batch-major [B*T] like the logits; pad positions carry no meaning
    for ours, reference in zip(chunked.router_logits, single.router_logits):
        torch.testing.assert_close(ours[real], reference[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked.aux_loss, single.aux_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(chunked.z_loss, single.z_loss, atol=1e-6, rtol=0)


@torch.no_grad()
def test_base_model_return_dict_false_gives_a_tuple():
    model = build_model(tiny_config())
    ids = random_ids(1, 5)
    as_tuple = model.model(ids, return_dict=False)
    as_output = model.model(ids)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_output.last_hidden_state, atol=0, rtol=0)
    assert isinstance(model(ids, return_dict=False), tuple)


@torch.no_grad()
def test_config_output_hidden_states_is_honoured():
    model = build_model(tiny_config(output_hidden_states=True))
    out = model(random_ids(1, 5))
    assert out.hidden_states is not None and len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert model(random_ids(1, 5), output_hidden_states=False).hidden_states is None
