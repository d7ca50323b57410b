"""Exact rollback of the hybrid cache (DESIGN.md section 5), so draft-and-verify decoding is lossless.

Oracles: ``crop`` against a fresh prefill of the kept tokens; transformers' own assisted decoding
and prompt lookup against plain greedy decoding, token for token, with a draft that disagrees often
(the rollbacks are counted, so a test where nothing is ever rolled back cannot pass).
"""

import copy

import pytest
import torch
from transformers import DynamicCache

from tnl_model.lightning_cache import LightningStateLayer
from tnl_model.testing import build_model, random_ids, tiny_config

LAYOUTS = {
    "layer0_linear": ["linear_attention", "full_attention", "linear_attention", "linear_attention"],
    "layer0_softmax": ["full_attention", "linear_attention", "linear_attention", "full_attention"],
    "all_linear": ["linear_attention"] * 4,
}
GREEDY = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
STATE_TOL = dict(atol=1e-6, rtol=1e-6)  # fp32 states, summed in a different chunking


@pytest.fixture
def rollbacks(monkeypatch):
    """Counts the crops that really removed tokens from a lightning layer."""
    removed = []
    original = LightningStateLayer.crop

    def counting_crop(layer, tokens_to_remove):
        if tokens_to_remove < 0:
            removed.append(-tokens_to_remove)
        return original(layer, tokens_to_remove)

    monkeypatch.setattr(LightningStateLayer, "crop", counting_crop)
    return removed


def _assert_same_cache(ours, reference, layer_types):
    for idx, kind in enumerate(layer_types):
        assert ours.get_seq_length(idx) == reference.get_seq_length(idx), idx
        if kind == "linear_attention":
            torch.testing.assert_close(ours.layers[idx].state, reference.layers[idx].state, **STATE_TOL)
        else:
            # Keys of a softmax layer after a lightning layer carry the same rounding as its state.
            torch.testing.assert_close(ours.layers[idx].keys, reference.layers[idx].keys, **STATE_TOL)
            torch.testing.assert_close(ours.layers[idx].values, reference.layers[idx].values, **STATE_TOL)


@pytest.mark.parametrize("layout", LAYOUTS)
@torch.no_grad()
def test_crop_equals_a_fresh_prefill_for_every_length_in_the_window(layout):
    model = build_model(tiny_config(layer_types=LAYOUTS[layout]))
    ids = random_ids(2, 30)
    prompt, window = 11, 19
    cache = model(ids[:, :prompt], use_cache=True).cache
    cache.activate_past_recording()
    model(ids[:, prompt:prompt + 4], cache=cache)  # two forwards before one crop, as a draft model does
    model(ids[:, prompt + 4:], cache=cache)
    assert cache.is_croppable
    for keep in range(window + 1):
        cropped = copy.deepcopy(cache)
        cropped.crop(-(window - keep))
        fresh = model(ids[:, :prompt + keep], use_cache=True).cache
        _assert_same_cache(cropped, fresh, LAYOUTS[layout])


@pytest.mark.parametrize("layout", LAYOUTS)
@torch.no_grad()
def test_a_verification_round_leaves_the_cache_plain_decoding_builds(layout):
    """Accept 2 of 5 drafted tokens: the cache equals token-by-token decoding of the accepted ones."""
    model = build_model(tiny_config(layer_types=LAYOUTS[layout]))
    ids = random_ids(1, 16)
    cache = model(ids[:, :10], use_cache=True).cache
    cache.activate_past_recording()
    model(ids[:, 10:16], cache=cache)  # the last real token + 5 drafted
    cache.crop(-3)
    plain = model(ids[:, :10], use_cache=True).cache
    for t in range(10, 13):
        model(ids[:, t:t + 1], cache=plain)
    _assert_same_cache(cache, plain, LAYOUTS[layout])
    step = random_ids(1, 1, seed=9)
    torch.testing.assert_close(model(step, cache=cache).logits, model(step, cache=plain).logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_without_recording_nothing_is_kept_and_crop_refuses_clearly():
    model = build_model(tiny_config())
    out = model.generate(random_ids(1, 8), max_new_tokens=20, return_dict_in_generate=True, **GREEDY)
    linear = [layer for layer in out.cache.layers if isinstance(layer, LightningStateLayer)]
    assert linear and all(layer.record is None for layer in linear)  # ordinary decoding: constant memory
    with pytest.raises(ValueError, match="activate_past_recording"):
        out.cache.crop(-2)


def _draft(layer_types, seed=7):
    """A smaller TNL with the same vocabulary and other weights: it disagrees with the target often."""
    return build_model(tiny_config(num_hidden_layers=len(layer_types), layer_types=layer_types,
                                   mlp_layer_types=["sparse"] * len(layer_types)), seed=seed)


@pytest.mark.parametrize("layout", LAYOUTS)
@torch.no_grad()
def test_assisted_decoding_equals_greedy_over_200_tokens(layout, rollbacks):
    target = build_model(tiny_config(layer_types=LAYOUTS[layout]))
    draft = _draft(["linear_attention", "full_attention"] if layout != "all_linear" else ["linear_attention"] * 2)
    ids = random_ids(1, 12)
    plain = target.generate(ids, max_new_tokens=200, **GREEDY)
    assisted = target.generate(ids, max_new_tokens=200, assistant_model=draft, **GREEDY)
    assert torch.equal(assisted, plain)
    assert len(rollbacks) >= 50, f"only {len(rollbacks)} rollbacks: the test would not catch a wrong crop"


@pytest.mark.parametrize("layout", LAYOUTS)
@torch.no_grad()
def test_prompt_lookup_equals_greedy_over_200_tokens(layout, rollbacks):
    target = build_model(tiny_config(layer_types=LAYOUTS[layout]))
    phrase = random_ids(1, 6, seed=3)
    ids = torch.cat([phrase, random_ids(1, 3, seed=4), phrase, phrase[:, :2]], dim=1)  # repeats to look up
    plain = target.generate(ids, max_new_tokens=200, **GREEDY)
    looked_up = target.generate(ids, max_new_tokens=200, prompt_lookup_num_tokens=4, **GREEDY)
    assert torch.equal(looked_up, plain)
    assert len(rollbacks) >= 3


@torch.no_grad()
def test_sampling_variants_run_and_return_valid_tokens():
    target = build_model(tiny_config())
    ids = random_ids(1, 10)
    for extra in ({"assistant_model": _draft(["linear_attention", "full_attention"])}, {"prompt_lookup_num_tokens": 3}):
        torch.manual_seed(0)
        out = target.generate(ids, max_new_tokens=30, do_sample=True, top_k=10, eos_token_id=None, pad_token_id=0,
                              **extra)
        assert out.shape == (1, 40) and int(out.max()) < target.config.vocab_size


@torch.no_grad()
def test_a_cache_returned_by_assisted_decoding_continues_exactly():
    target = build_model(tiny_config())
    ids = random_ids(1, 9)
    first = target.generate(ids, max_new_tokens=15, assistant_model=_draft(["linear_attention", "full_attention"]),
                            return_dict_in_generate=True, **GREEDY)
    continued = target.generate(first.sequences, cache=first.cache, max_new_tokens=10, **GREEDY)
    assert torch.equal(continued, target.generate(ids, max_new_tokens=25, **GREEDY))


@torch.no_grad()
def test_beam_search_with_a_recording_cache_is_unaffected():
    model = build_model(tiny_config())
    ids = random_ids(2, 7)
    beams = dict(num_beams=3, max_new_tokens=8, **GREEDY)
    reference = model.generate(ids, **beams)
    cache = DynamicCache(config=model.config)
    cache.activate_past_recording()
    assert torch.equal(model.generate(ids, cache=cache, **beams), reference)


def _left_padded(lengths, pad):
    prompts = [random_ids(1, n, seed=n)[0] for n in lengths]
    width = max(lengths)
    batch = torch.full((len(lengths), width), pad)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return batch, mask


@pytest.mark.parametrize("layout", ["layer0_linear", "layer0_softmax"])
@torch.no_grad()
def test_left_padded_batch_with_a_recording_cache_is_unaffected_and_crops_exactly(layout):
    model = build_model(tiny_config(layer_types=LAYOUTS[layout]))
    pad = model.config.pad_token_id
    batch, mask = _left_padded((5, 13, 9), pad)
    settings = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=pad, eos_token_id=None)
    reference = model.generate(batch, **settings)
    cache = DynamicCache(config=model.config)
    cache.activate_past_recording()
    assert torch.equal(model.generate(batch, cache=cache, **settings), reference)

    # a verification-like round on the padded batch: 4 tokens forward, the last 2 cropped, equals 2 tokens forward
    follow = random_ids(3, 4, seed=99)
    full_mask = torch.cat([mask, torch.ones(3, 4, dtype=torch.long)], 1)
    kept, cropped = DynamicCache(config=model.config), DynamicCache(config=model.config)
    for cache in (kept, cropped):
        model(batch, attention_mask=mask, cache=cache)
    model(follow[:, :2], attention_mask=full_mask[:, :-2], cache=kept)
    cropped.activate_past_recording()
    model(follow, attention_mask=full_mask, cache=cropped)
    cropped.crop(-2)
    _assert_same_cache(cropped, kept, LAYOUTS[layout])


@torch.no_grad()
def test_prompt_lookup_backs_off_after_rejected_rounds_and_stays_exact(monkeypatch):
    """After rejected rounds drafting pauses (plain decode steps), and the output is plain greedy's."""
    from tnl_model import speculative

    rounds, paused = [], []
    update, candidates = (speculative.BackoffCandidateGenerator.update_candidate_strategy,
                          speculative.BackoffCandidateGenerator.get_candidates)

    def recording_update(self, input_ids, scores, num_matches):
        if self.drafted:
            rounds.append(num_matches)
        return update(self, input_ids, scores, num_matches)

    def recording_candidates(self, input_ids, **kwargs):
        paused.append(self.skip > 0)
        return candidates(self, input_ids, **kwargs)

    monkeypatch.setattr(speculative.BackoffCandidateGenerator, "update_candidate_strategy", recording_update)
    monkeypatch.setattr(speculative.BackoffCandidateGenerator, "get_candidates", recording_candidates)
    target = build_model(tiny_config())
    ids = random_ids(1, 60, seed=3)  # its bigrams recur with continuations the model does not produce at first
    plain = target.generate(ids, max_new_tokens=120, **GREEDY)
    looked_up = target.generate(ids, max_new_tokens=120, prompt_lookup_num_tokens=6, **GREEDY)
    assert torch.equal(looked_up, plain)
    assert rounds.count(0) >= 3, rounds
    assert sum(paused) >= 1 + 2 + 4, (rounds, paused)  # 1, 2, 4, ... steps without drafting after rejections


class _FakeLookup:
    """Always drafts two tokens; records nothing."""

    def get_candidates(self, input_ids, **kwargs):
        return torch.cat([input_ids, input_ids[:, -2:]], 1), None

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        pass


class _NoMatch:
    """Finds no n-gram to continue: proposes nothing."""

    def get_candidates(self, input_ids, **kwargs):
        return input_ids, None

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        pass


def _drafting_pattern(matches_per_round, cost, steps=40):
    """Which of ``steps`` rounds drafted, when each drafting round gets the next entry of ``matches_per_round``
    accepted tokens and a drafting round costs ``cost`` plain steps."""
    from tnl_model.speculative import BackoffCandidateGenerator

    generator = BackoffCandidateGenerator(_FakeLookup())
    generator.round_cost = lambda: cost
    ids, drafted, matches = torch.zeros(1, 4, dtype=torch.long), [], iter(matches_per_round)
    for _ in range(steps):
        generator.get_candidates(ids)
        drafted.append(generator.drafted)
        generator.update_candidate_strategy(ids, None, next(matches) if generator.drafted else 0)
    return drafted


def test_backoff_drafts_while_rounds_pay_and_pauses_when_they_do_not():
    always = [1] * 40
    # one accepted token per round pays at a CPU-like round cost of 1.7 steps (net +0.3): never pauses
    assert all(_drafting_pattern(always, cost=1.7))
    # ... but not at 2.5 steps (net -0.5): pauses grow, so most steps do not draft
    assert sum(_drafting_pattern(always, cost=2.5)) <= 6
    # rejected rounds cost nothing where verifying is as cheap as a step (GPU-like): keeps drafting
    assert all(_drafting_pattern([0] * 40, cost=1.0))
    # rejected rounds at a CPU-like cost: 1, 2, 4, ... steps without drafting
    pattern = _drafting_pattern([0] * 40, cost=1.7)
    assert pattern[:8] == [True, False, True, False, False, True, False, False], pattern
    assert sum(pattern) <= 6


def test_paused_rounds_do_not_record_and_drafting_rounds_do():
    """A round without drafts is never rolled back, so the lightning layers keep nothing for it."""
    from tnl_model.speculative import BackoffCandidateGenerator

    model = build_model(tiny_config())
    cache = DynamicCache(config=model.config)
    ids = random_ids(1, 9)
    with torch.no_grad():
        model(ids, cache=cache)  # the cache now holds the model's own layers
    cache.activate_past_recording()
    lightning = [layer for layer in cache.layers if isinstance(layer, LightningStateLayer)]
    assert lightning and all(layer.record_past for layer in lightning)
    generator = BackoffCandidateGenerator(_FakeLookup(), cache=cache)
    generator.skip = 1
    generator.get_candidates(ids)
    assert not generator.drafted and not any(layer.record_past for layer in lightning)
    with torch.no_grad():
        model(ids[:, -1:], cache=cache)
    assert all(layer.record is None for layer in lightning)
    generator.get_candidates(ids)
    assert generator.drafted and all(layer.record_past for layer in lightning)
    with torch.no_grad():
        model(ids[:, -3:], cache=cache)
    assert all(layer.record is not None and layer.record.length == 3 for layer in lightning)
    cache.crop(0)
    no_match = BackoffCandidateGenerator(_NoMatch(), cache=cache)  # the lookup finds nothing: a plain step
    no_match.get_candidates(ids)
    assert not no_match.drafted and not any(layer.record_past for layer in lightning)


def test_backoff_measures_the_cost_of_a_drafting_round():
    from tnl_model.speculative import ASSUMED_ROUND_COST, BackoffCandidateGenerator

    generator = BackoffCandidateGenerator(_FakeLookup())
    assert generator.round_cost() == ASSUMED_ROUND_COST
    generator.seconds = {True: 0.003, False: 0.002}
    assert generator.round_cost() == pytest.approx(1.5)
