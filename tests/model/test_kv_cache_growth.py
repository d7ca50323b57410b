"""The softmax layers' key/value cache appends into spare capacity (GrowingKeyValueLayer) and
behaves exactly like transformers' concatenating DynamicLayer under every cache operation
generate() uses: appends, crop, beam reorder, batch selection and repetition."""

import copy

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tnl_model.cache_glue import GrowingKeyValueLayer, use_growing_kv_layers
from tnl_model.testing import build_model, random_ids, tiny_config


def chunks(seed, sizes, batch=3, heads=2, dim=8):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, heads, n, dim, generator=gen), torch.randn(batch, heads, n, dim, generator=gen))
            for n in sizes]


def assert_same(grown: GrowingKeyValueLayer, plain: DynamicLayer):
    assert grown.get_seq_length() == plain.get_seq_length()
    assert torch.equal(grown.keys, plain.keys) and torch.equal(grown.values, plain.values)


def test_appends_equal_concatenation_with_few_reallocations():
    grown, plain = GrowingKeyValueLayer(), DynamicLayer()
    buffers = set()
    for k, v in chunks(0, [100] + [1] * 700 + [37]):
        out_grown, out_plain = grown.update(k, v), plain.update(k, v)
        assert torch.equal(out_grown[0], out_plain[0]) and torch.equal(out_grown[1], out_plain[1])
        buffers.add(grown._key_buffer.data_ptr())
    assert_same(grown, plain)
    # 838 tokens in 702 updates: capacity grows by >= 256 tokens or 1/8, so only a few buffers are ever made
    assert len(buffers) <= 4, len(buffers)


def test_reserve_makes_a_chunked_prefill_allocate_once():
    grown = GrowingKeyValueLayer()
    grown.reserve(4096)
    buffers = {grown.update(k, v)[0].data_ptr() for k, v in chunks(6, [1024] * 4 + [1] * 100)}
    assert len(buffers) == 1 and grown.get_seq_length() == 4196


def test_crop_reorder_select_and_repeat_behave_like_dynamic_layer():
    grown, plain = GrowingKeyValueLayer(), DynamicLayer()
    pieces = iter(chunks(1, [20, 1, 1, 5, 1, 1, 3, 1]))

    def step():
        k, v = next(pieces)
        grown.update(k, v)
        plain.update(k, v)
        assert_same(grown, plain)

    step()
    step()
    for layer in (grown, plain):
        layer.crop(-4)  # assisted decoding rejects draft tokens
    assert_same(grown, plain)
    step()  # overwrites the cropped tail inside the buffer
    beams = torch.tensor([2, 0, 0])
    for layer in (grown, plain):
        layer.reorder_cache(beams)
    step()
    step()
    keep = torch.tensor([0, 2])
    for layer in (grown, plain):
        layer.batch_select_indices(keep)
    pieces = iter([(k[:2], v[:2]) for k, v in chunks(2, [1, 2])])
    step()
    for layer in (grown, plain):
        layer.batch_repeat_interleave(2)
    pieces = iter([(k.repeat_interleave(2, 0)[:4], v.repeat_interleave(2, 0)[:4]) for k, v in chunks(3, [3])])
    step()


def test_autograd_falls_back_to_concatenation():
    grown = GrowingKeyValueLayer()
    (k, v), = chunks(4, [6])
    k.requires_grad_()
    keys, _ = grown.update(k, v)
    keys.sum().backward()
    assert torch.equal(k.grad, torch.ones_like(k)) and grown._key_buffer is None


class ConcatenatingLayer(DynamicLayer):
    """transformers' own behaviour, under a class use_growing_kv_layers leaves alone."""


def test_model_caches_use_growing_layers_and_generate_identically():
    config = tiny_config()
    model = build_model(config)
    cache = DynamicCache(config=config)
    use_growing_kv_layers(cache, config.layer_types)
    assert [type(layer).__name__ for layer in cache.layers] == [
        "LinearAttentionLayer", "GrowingKeyValueLayer", "LinearAttentionLayer", "LinearAttentionLayer"]
    prompt = random_ids(2, 33, seed=5)
    with torch.no_grad():
        grown = model.generate(prompt, max_new_tokens=40, do_sample=False)
        plain_cache = DynamicCache(config=config)
        plain_cache.layers[1] = ConcatenatingLayer()
        steps, out = [], model(prompt, cache=plain_cache, use_cache=True)
        for _ in range(40):
            steps.append(out.logits[:, -1:].argmax(-1))
            out = model(steps[-1], cache=plain_cache, use_cache=True)
    assert type(plain_cache.layers[1]) is ConcatenatingLayer
    assert torch.equal(grown[:, 33:], torch.cat(steps, dim=1))


def test_deepcopied_caches_continue_independently():
    """transformers' prompt-reuse recipe: deepcopy a prefilled cache, continue each copy differently."""
    original = GrowingKeyValueLayer()
    (k, v), (a, b), (c, d) = chunks(7, [9, 1, 1])
    original.update(k, v)
    copied = copy.deepcopy(original)
    assert copied._key_buffer.data_ptr() != original._key_buffer.data_ptr()
    original.update(a, b)
    copied.update(c, d)
    assert torch.equal(original.keys, torch.cat([k, a], dim=2)) and torch.equal(copied.keys, torch.cat([k, c], dim=2))
    assert torch.equal(original.values, torch.cat([v, b], dim=2)) and torch.equal(copied.values, torch.cat([v, d], dim=2))
