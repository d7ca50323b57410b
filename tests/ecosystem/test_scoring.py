"""Log-likelihood scoring (lm-evaluation-harness's loglikelihood call): batched == one by one,
and each number equals an independent computation from the full-sequence logits."""

import pytest
import torch
from torch.nn import functional as F

from tnl_model.scoring import loglikelihood
from tnl_model.testing import build_model, random_ids, tiny_config

TOL = 1e-4  # absolute, on a sum of fp32 log-probabilities; batching only changes matmul rounding


def _requests():
    requests = []
    for i, (ctx_len, cont_len) in enumerate([(5, 1), (17, 4), (1, 3), (0, 2), (30, 7), (9, 9), (3, 1)]):
        ids = random_ids(1, ctx_len + cont_len, seed=10 + i)[0].tolist()
        requests.append((ids[:ctx_len], ids[ctx_len:]))
    return requests


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config())


@torch.no_grad()
def _reference(model, context, continuation):
    context = context or [model.config.bos_token_id]
    ids = torch.tensor([context + continuation])
    logprobs = F.log_softmax(model(ids, use_cache=False).logits[0].double(), dim=-1)
    positions = range(len(context) - 1, len(context) + len(continuation) - 1)
    total = sum(float(logprobs[p, t]) for p, t in zip(positions, continuation))
    greedy = all(int(logprobs[p].argmax()) == t for p, t in zip(positions, continuation))
    return total, greedy


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batched_equals_one_by_one(model, padding_side):
    requests = _requests()
    one_by_one = [loglikelihood(model, None, [r], batch_size=1)[0] for r in requests]
    batched = loglikelihood(model, None, requests, batch_size=4, padding_side=padding_side)
    assert len(batched) == len(requests)
    for (a, greedy_a), (b, greedy_b), request in zip(one_by_one, batched, requests):
        assert abs(a - b) < TOL, (request, a, b)
        assert greedy_a == greedy_b
    for (total, greedy), request in zip(one_by_one, requests):
        ref_total, ref_greedy = _reference(model, *request)
        assert abs(total - ref_total) < TOL and greedy == ref_greedy


def test_greedy_flag_is_true_for_the_models_own_greedy_continuation(model):
    context = random_ids(1, 8, seed=3)
    generated = model.generate(context, max_new_tokens=4, do_sample=False)[0, 8:].tolist()
    wrong = [(generated[0] + 1 - 3) % 94 + 3] + generated[1:]
    (score, greedy), (wrong_score, wrong_greedy) = loglikelihood(
        model, None, [(context[0].tolist(), generated), (context[0].tolist(), wrong)])
    assert greedy and not wrong_greedy and score > wrong_score and score < 0


def test_string_requests_are_encoded_like_lm_eval(model, tiny_tokenizer):
    """lm-eval's HFLM (causal): trailing context whitespace moves to the continuation, context and
    continuation are encoded together with the tokenizer's BOS and split after the context's ids; an
    empty context is the prefix token (BOS), or the continuation's own leading BOS.
    tests/ecosystem/test_lm_eval.py checks the same against lm-eval itself."""
    words = tiny_tokenizer.convert_tokens_to_ids
    bos = tiny_tokenizer.bos_token_id
    pairs = [("the cat sat on the", " mat"), ("one two ", "three"), ("", "the sun"), ("", "<s> the sun")]
    expected = [([bos] + words("the cat sat on the".split()), words(["mat"])),
                ([bos] + words(["one", "two"]), words(["three"])),
                ([bos], words(["the", "sun"])),
                ([bos], words(["the", "sun"]))]
    scores = loglikelihood(model, tiny_tokenizer, pairs, batch_size=3)
    for (score, greedy), (want, want_greedy) in zip(scores, loglikelihood(model, None, expected, batch_size=1)):
        assert abs(score - want) < TOL and greedy == want_greedy
    (no_bos, _), = loglikelihood(model, tiny_tokenizer, [("one two", " three")], add_bos_token=False)
    (want, _), = loglikelihood(model, None, [(words(["one", "two"]), words(["three"]))])
    assert abs(no_bos - want) < TOL


def test_bad_requests(model):
    with pytest.raises(ValueError, match="empty continuation"):
        loglikelihood(model, None, [([5, 6], [])])
    with pytest.raises(ValueError, match="need a tokenizer"):
        loglikelihood(model, None, [("text", " more")])
    with pytest.raises(ValueError, match="mixes a string and token ids"):
        loglikelihood(model, None, [("text", [5])])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        loglikelihood(model, None, [([5, 6], [500])])
    with pytest.raises(ValueError, match="padding_side"):
        loglikelihood(model, None, [([5, 6], [7])], padding_side="middle")
