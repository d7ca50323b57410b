"""Gradients through a forward that continues after cached tokens equal those of one forward over all tokens.

The continuation's softmax attention over cached keys has a CPU fast path that merges two partial softmaxes
by their log-sum-exp; the CPU flash kernel gives that log-sum-exp no gradient, so under autograd the fast
path dropped the scores' share of the gradient (the gradient reaching the new tokens through q and k),
while outputs stayed exact. Under autograd the continuation must take a differentiable path.
"""

import torch

from tnl_model.testing import build_model, random_ids, tiny_config


def test_input_gradients_through_a_continuation_after_a_cache_equal_one_forward():
    model = build_model(tiny_config())
    with torch.no_grad():  # sharper attention than at initialisation, so the scores' gradient matters
        for proj in (model.model.layers[1].self_attn.q_proj, model.model.layers[1].self_attn.k_proj):
            proj.weight.mul_(20)
    ids = random_ids(2, 24, seed=4)
    embeds = model.get_input_embeddings()(ids).detach()
    prefix, new = embeds[:, :10], embeds[:, 10:].clone().requires_grad_(True)

    whole = model(inputs_embeds=torch.cat([prefix, new], 1), use_cache=False).logits[:, 10:]
    expected, = torch.autograd.grad(whole.float().pow(2).mean(), new)

    with torch.no_grad():
        cache = model(inputs_embeds=prefix, use_cache=True).cache
    continued = model(inputs_embeds=new, cache=cache, use_cache=True).logits
    torch.testing.assert_close(continued, whole, rtol=1e-5, atol=1e-5)
    got, = torch.autograd.grad(continued.float().pow(2).mean(), new)
    error = float((got - expected).norm() / expected.norm())
    assert error < 1e-5, f"gradient with respect to the new tokens: relative error {error:.2e}"
