"""The cache tells generate() the truth for every layer layout (DESIGN.md section 5, cache contract).

generate() reads ``cache.get_seq_length()`` (layer 0) to know how much of a returned cache to skip.
A lightning layer at index 0 used to report 0, so continuing from a returned cache fed the whole
sequence again on top of it. Oracle: continuing from a returned cache equals one generate() from
scratch, token for token, scores within 1e-5 (fp32).
"""

import warnings

import pytest
import torch
from transformers import DynamicCache

from tnl_model.testing import build_model, random_ids, tiny_config

LAYOUTS = {
    "layer0_linear": ["linear_attention", "full_attention", "linear_attention", "linear_attention"],
    "layer0_softmax": ["full_attention", "linear_attention", "linear_attention", "full_attention"],
    "all_linear": ["linear_attention"] * 4,
}
SCORE_ATOL = 1e-5
# No end-of-sequence token: every row runs to max_new_tokens, so the sequences are comparable.
GREEDY = dict(do_sample=False, return_dict_in_generate=True, output_scores=True, pad_token_id=0, eos_token_id=None)


def _model(layout):
    return build_model(tiny_config(layer_types=LAYOUTS[layout]))


def _assert_same_generation(continued, reference, new_tokens):
    assert torch.equal(continued.sequences, reference.sequences)
    # The continuation's scores are the reference's last `new_tokens` steps.
    torch.testing.assert_close(torch.stack(continued.scores), torch.stack(reference.scores[-new_tokens:]),
                               atol=SCORE_ATOL, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@torch.no_grad()
def test_every_layer_reports_the_tokens_it_has_seen(layout):
    model = _model(layout)
    out = model(random_ids(2, 9), use_cache=True)
    assert out.cache.get_seq_length() == 9
    assert [out.cache.get_seq_length(i) for i in range(4)] == [9] * 4
    out = model(random_ids(2, 1, seed=3), cache=out.cache)
    assert [out.cache.get_seq_length(i) for i in range(4)] == [10] * 4


@pytest.mark.parametrize("with_mask", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("layout", LAYOUTS)
@torch.no_grad()
def test_generate_continues_from_a_returned_cache(layout, with_mask):
    model = _model(layout)
    prompt = random_ids(2, 7)
    first = model.generate(prompt, max_new_tokens=5, **GREEDY)
    reference = model.generate(prompt, max_new_tokens=12, **GREEDY)
    extra = {"attention_mask": torch.ones_like(first.sequences)} if with_mask else {}
    continued = model.generate(first.sequences, cache=first.cache, max_new_tokens=7, **extra, **GREEDY)
    _assert_same_generation(continued, reference, 7)


@pytest.mark.parametrize("layout", LAYOUTS)
@torch.no_grad()
def test_generate_continues_from_inputs_embeds_and_a_returned_cache(layout):
    model = _model(layout)
    prompt = random_ids(1, 6)
    embeds = model.get_input_embeddings()(prompt)
    first = model.generate(inputs_embeds=embeds, max_new_tokens=4, **GREEDY)  # returns the new tokens only
    reference = model.generate(prompt, max_new_tokens=9, **GREEDY)
    sequence = torch.cat([prompt, first.sequences], dim=1)
    continued = model.generate(sequence, cache=first.cache, max_new_tokens=5, **GREEDY)
    _assert_same_generation(continued, reference, 5)


@pytest.mark.parametrize("layout", LAYOUTS)
@torch.no_grad()
def test_left_padded_batch_continues_from_a_returned_cache(layout):
    model = _model(layout)
    prompts = [random_ids(1, 9, seed=2)[0], random_ids(1, 4, seed=3)[0]]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, 9 - len(prompt):], mask[row, 9 - len(prompt):] = prompt, 1
    first = model.generate(ids, attention_mask=mask, max_new_tokens=4, **GREEDY)
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=10, **GREEDY)
    grown = torch.cat([mask, torch.ones(2, 4, dtype=torch.long)], dim=1)
    continued = model.generate(first.sequences, attention_mask=grown, cache=first.cache, max_new_tokens=6, **GREEDY)
    _assert_same_generation(continued, reference, 6)


@pytest.mark.parametrize("layout", LAYOUTS)
@torch.no_grad()
def test_three_chat_turns_reusing_the_cache_equal_each_turn_from_scratch(layout):
    model = _model(layout)
    sequence, cache = random_ids(1, 5, seed=4), None
    for turn in range(3):
        if turn:
            sequence = torch.cat([sequence, random_ids(1, 3 + turn, seed=10 + turn)], dim=1)  # the user's next message
        scratch = model.generate(sequence, max_new_tokens=6, **GREEDY)
        reused = model.generate(sequence, max_new_tokens=6, **({"cache": cache} if cache is not None else {}), **GREEDY)
        assert torch.equal(reused.sequences, scratch.sequences), f"turn {turn}"
        torch.testing.assert_close(torch.stack(reused.scores), torch.stack(scratch.scores), atol=SCORE_ATOL, rtol=0)
        sequence, cache = reused.sequences, reused.cache
        assert cache.get_seq_length() == sequence.shape[1] - 1  # the last token is not fed yet


@torch.no_grad()
def test_past_key_values_is_deprecated_and_conflicts_with_cache():
    model = _model("layer0_linear")
    ids = random_ids(1, 4)
    cache = DynamicCache(config=model.config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(ids, past_key_values=cache, use_cache=True)
    assert out.cache is cache and cache.get_seq_length() == 4
    assert any("past_key_values" in str(w.message) and "cache" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="past_key_values"):
        model(ids, cache=DynamicCache(config=model.config), past_key_values=DynamicCache(config=model.config))
    with pytest.raises(ValueError, match="past_key_values"):
        model.model(ids, cache=DynamicCache(config=model.config), past_key_values=DynamicCache(config=model.config))
