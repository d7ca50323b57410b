"""Context snapshots (tnl_model.snapshots): a saved cache answers a question exactly as the full prompt does.

Oracle: generate() over document + question from scratch, token for token and scores to 1e-5 (fp32).
"""

import copy

import pytest
import torch

from tnl_model.snapshots import SnapshotError, fork_cache, load_cache, save_cache, snapshot_bytes
from tnl_model.testing import build_model, random_ids, tiny_config

LAYOUTS = {
    "layer0_linear": ["linear_attention", "full_attention", "linear_attention", "linear_attention"],
    "layer0_softmax": ["full_attention", "linear_attention", "linear_attention", "full_attention"],
    "all_linear": ["linear_attention"] * 4,
}
GREEDY = dict(do_sample=False, max_new_tokens=8, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True,
              output_scores=True)


def _snapshot(model, doc, path):
    with torch.no_grad():
        cache = model(doc, use_cache=True).cache
    return save_cache(cache, path, config=model.config, input_ids=doc)


def _assert_same(ours, reference):
    assert torch.equal(ours.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(ours.scores), torch.stack(reference.scores), atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
@torch.no_grad()
def test_a_loaded_snapshot_answers_like_the_full_prompt(layout, tmp_path):
    model = build_model(tiny_config(layer_types=LAYOUTS[layout]))
    doc = random_ids(1, 37)  # any token boundary: 37 is no multiple of a block
    path = _snapshot(model, doc, tmp_path / "doc.tnlctx")
    for seed in (5, 6):  # two questions from one file
        question = random_ids(1, 4, seed=seed)
        cache, saved_ids = load_cache(path, config=model.config)
        assert torch.equal(saved_ids, doc) and cache.get_seq_length() == 37
        prompt = torch.cat([saved_ids, question], dim=1)
        _assert_same(model.generate(prompt, cache=cache, **GREEDY), model.generate(prompt, **GREEDY))


@torch.no_grad()
def test_forks_keep_questions_apart_and_a_reused_cache_does_not(tmp_path):
    model = build_model(tiny_config())
    doc = random_ids(1, 20)
    cache = model(doc, use_cache=True).cache
    first, second = (torch.cat([doc, random_ids(1, 3, seed=s)], 1) for s in (7, 8))
    for prompt in (first, second):
        _assert_same(model.generate(prompt, cache=fork_cache(cache), **GREEDY), model.generate(prompt, **GREEDY))
    assert cache.get_seq_length() == 20  # the forks left the original alone
    model.generate(first, cache=cache, **GREEDY)
    assert cache.get_seq_length() > 20  # generate() updates the cache it is given: fork for each question


@torch.no_grad()
def test_kv_dtype_on_load_and_fp32_states(tmp_path):
    model = build_model(tiny_config())
    path = _snapshot(model, random_ids(1, 9), tmp_path / "doc.tnlctx")
    cache, _ = load_cache(path, config=model.config, dtype=torch.bfloat16, device="cpu")
    assert cache.layers[1].keys.dtype == torch.bfloat16 and cache.layers[0].state.dtype == torch.float32
    with pytest.raises(SnapshotError, match="floating torch dtype"):
        load_cache(path, config=model.config, dtype=torch.int64)


def test_snapshot_size_matches_the_formula(tmp_path):
    for layout in ("all_linear", "layer0_linear"):
        model = build_model(tiny_config(layer_types=LAYOUTS[layout]))
        sizes = []
        for tokens in (10, 40):
            path = _snapshot(model, random_ids(1, tokens), tmp_path / f"{layout}{tokens}.tnlctx")
            header = path.stat().st_size - _data_bytes(path)
            sizes.append(path.stat().st_size - header)
            assert sizes[-1] == snapshot_bytes(model.config, tokens, kv_dtype=torch.float32)
        if layout == "all_linear":
            assert sizes[1] - sizes[0] == 8 * 30  # only the token ids grow


def _data_bytes(path):
    import json
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    return max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")


@torch.no_grad()
def test_bad_snapshots_are_refused_by_name(tmp_path):
    model = build_model(tiny_config())
    path = _snapshot(model, random_ids(1, 9), tmp_path / "doc.tnlctx")
    other = tiny_config(layer_types=LAYOUTS["layer0_softmax"])
    with pytest.raises(SnapshotError, match="another architecture.*layer pattern"):
        load_cache(path, config=other)
    with pytest.raises(SnapshotError, match="another architecture"):
        load_cache(path, config=tiny_config(rms_norm_eps=1e-5))
    truncated = tmp_path / "cut.tnlctx"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(SnapshotError, match="truncated or corrupt"):
        load_cache(truncated, config=model.config)
    garbage = tmp_path / "garbage.tnlctx"
    garbage.write_bytes(b"\x80\x04" + bytes(64))  # a pickle opcode: never unpickled
    with pytest.raises(SnapshotError, match="truncated or corrupt"):
        load_cache(garbage, config=model.config)
    with pytest.raises(SnapshotError, match="no such snapshot"):
        load_cache(tmp_path / "missing.tnlctx", config=model.config)
    with pytest.raises(SnapshotError, match="not a regular file"):
        load_cache(tmp_path, config=model.config)


@torch.no_grad()
def test_save_refuses_ids_that_do_not_match_the_cache(tmp_path):
    model = build_model(tiny_config())
    cache = model(random_ids(1, 9), use_cache=True).cache
    with pytest.raises(ValueError, match="holds 9 tokens"):
        save_cache(copy.deepcopy(cache), tmp_path / "x.tnlctx", config=model.config, input_ids=random_ids(1, 8))
