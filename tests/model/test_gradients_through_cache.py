"""Training forwards that touch the cache: chunked prefill and continuations from a cached state.

* ``prefill_chunk_size`` (an inference memory bound) leaves a training forward's loss and
  gradients exactly those of the single pass.
* A continuation run with autograd on from a cache filled under ``no_grad`` backpropagates,
  and its gradient matches central finite differences of the same continuation loss (the
  prefix's cache always rebuilt at the unperturbed weights), an oracle that shares no code
  with autograd.
"""

import torch
from torch.nn import functional as F
from transformers import DynamicCache

from tnl_model.testing import build_model, random_ids, tiny_config


def _gradients(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_prefill_chunk_size_leaves_training_loss_and_gradients_unchanged():
    ids = random_ids(2, 12)
    results = []
    for chunk in (None, 4):
        model = build_model(tiny_config(prefill_chunk_size=chunk)).train()
        out = model(ids, labels=ids)
        out.loss.backward()
        results.append((out.loss.detach(), _gradients(model)))
    (loss, grads), (chunked_loss, chunked_grads) = results
    torch.testing.assert_close(chunked_loss, loss, atol=0, rtol=0)
    assert chunked_grads.keys() == grads.keys() and len(grads) == len(list(model.parameters()))
    for name, grad in grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


class _Continuation:
    """A prefix prefilled under no_grad, then a continuation whose loss depends on the weights
    through the continuation only (the cached prefix is data)."""

    def __init__(self):
        # Dense FFNs: top-k routing would make the loss piecewise and spoil the finite differences.
        self.model = build_model(tiny_config(mlp_layer_types=["dense"] * 4)).train()
        ids = random_ids(2, 14)
        self.prefix, self.cont = ids[:, :8], ids[:, 8:]

    def prefix_cache(self):
        cache = DynamicCache(config=self.model.config)
        with torch.no_grad():
            self.model(self.prefix, cache=cache, use_cache=True)
        return cache

    def loss(self, cache):
        logits = self.model(self.cont, cache=cache, use_cache=True).logits
        return F.cross_entropy(logits[:, :-1].double().flatten(0, 1), self.cont[:, 1:].flatten())

    @torch.no_grad()
    def loss_at(self, direction, eps: float) -> float:
        """The continuation loss at weights + eps * direction, the prefix cached at the unperturbed weights."""
        params = list(self.model.parameters())
        saved = [p.clone() for p in params]
        cache = self.prefix_cache()
        for p, d in zip(params, direction):
            p.add_(d, alpha=eps)
        loss = float(self.loss(cache))
        for p, s in zip(params, saved):
            p.copy_(s)
        return loss


def test_grad_enabled_continuation_from_a_cache_matches_finite_differences():
    run = _Continuation()
    cache = run.prefix_cache()
    run.loss(cache).backward()
    params = list(run.model.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    generator = torch.Generator().manual_seed(3)
    for _ in range(2):
        direction = [torch.randn(p.shape, generator=generator) * 0.02 for p in params]
        analytic = sum(float((p.grad.double() * d).sum()) for p, d in zip(params, direction))
        eps = 1e-2  # central differences: O(eps^2) error, ~1e-4 relative here
        numeric = (run.loss_at(direction, eps) - run.loss_at(direction, -eps)) / (2 * eps)
        assert abs(analytic - numeric) <= 2e-3 * abs(numeric), (analytic, numeric)


def test_grad_enabled_continuation_leaves_the_cache_usable():
    """The continuation's state is stored detached: decoding on from it needs no graph and gives the
    logits of the whole sequence in one pass."""
    run = _Continuation()
    cache = run.prefix_cache()
    run.loss(cache).backward()
    nxt = random_ids(2, 1, seed=7)
    with torch.no_grad():
        step = run.model(nxt, cache=cache, use_cache=True).logits
        full = run.model(torch.cat([run.prefix, run.cont, nxt], dim=1), use_cache=False).logits
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=2e-5, rtol=0)
