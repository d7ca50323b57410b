"""benchmarks/bench_sequence_parallel.py: its byte formulas against hand-computed values, the on-paper
MiniMax-Text-01 numbers, its activation model against saved-tensor hooks, and (one tiny 2-rank gloo run)
the bytes its shims count in torch.distributed's collectives against the formulas."""

import sys
from pathlib import Path

import pytest
import torch

from tnl_model import TNLForCausalLM
from tnl_model.parameters import parameter_breakdown
from tnl_model.testing import random_ids, tiny_config
from tnl_training.sequence_parallel import bytes_per_layer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_sequence_parallel as bench  # noqa: E402


def _config():
    # every size distinct, so that a wrong term in the activation model cannot hide behind another
    return tiny_config(vocab_size=300, hidden_size=96, intermediate_size=160, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, rotary_dim=8, dense_intermediate_size=112,
                       max_position_embeddings=4096)


def test_bytes_per_layer_by_hand():
    # B=2, T=4096, P=4 (shards of 1024), H=8, Hkv=2, d=64, bf16
    kw = dict(batch=2, seq_len=4096, size=4, heads=8, kv_heads=2, head_dim=64, dtype_bytes=2)
    assert bytes_per_layer("lasp2_state", **kw) == 3 * 2 * 8 * 64 * 64 * 4 == 786_432  # (P-1) fp32 states
    assert bytes_per_layer("kv_allgather", **kw) == 3 * 2 * 2 * 1024 * 2 * 64 * 2 == 3_145_728  # (P-1) K+V shards
    # four all-to-alls (q: 8 heads, k, v: 2, output: 8), (P-1)/P of the local 2 x 1024 x 20 heads x 64 x 2 B
    assert bytes_per_layer("ulysses", **kw) == pytest.approx(0.75 * 2 * 1024 * 20 * 64 * 2) == 3_932_160
    assert bytes_per_layer("lasp2_state", **{**kw, "size": 1}) == 0
    config = _config()  # 4 heads, 2 KV heads: Ulysses replicates KV heads at P=4, cannot split 4 heads over 8
    assert bench.layer_bytes("ulysses", config, seq_len=64, size=8, dtype_bytes=4) is None
    assert bench.layer_bytes("ulysses", config, seq_len=64, size=4, dtype_bytes=4) == 3 / 4 * 16 * (4 + 4) * 2 * 16 * 4


def test_on_paper_minimax_by_hand():
    paper = bench.on_paper()
    assert paper["layers"] == {"lightning": 70, "softmax": 10, "moe": 80, "dense": 0}
    params = parameter_breakdown(bench.TNLConfig.from_json_file(str(bench.MINIMAX_CONFIG))).total
    assert 455e9 < params == paper["parameters_total"] < 457e9
    p8, p64 = paper["cases"]["8"], paper["cases"]["64"]
    assert p8["tokens_per_gpu"] == 131_072 and p64["tokens_per_gpu"] == 16_384
    comm = p8["communication_per_step"]
    assert comm["LASP-2 state all-gather, forward"] == 70 * 7 * 64 * 128 * 128 * 4
    assert comm["softmax K/V all-gather, forward"] == 10 * 7 * 2 * 131_072 * 8 * 128 * 2
    assert comm["ZeRO-3 per step"] == pytest.approx(3 * 7 / 8 * 2 * params)
    # at P=64 the 8 KV heads are replicated to 64 for Ulysses: (q 64 + k 64 + v 64 + out 64 heads)
    assert p64["communication_per_step"]["Ulysses all-to-all, forward"] == pytest.approx(
        10 * 63 / 64 * 16_384 * 256 * 128 * 2)
    for case in (p8, p64):  # every softmax layer's K/V of the whole 1M tokens, on every rank
        activations = case["activations_no_checkpointing"]
        assert activations["softmax gathered K/V (whole sequence)"] == 10 * 2 * 2**20 * 8 * 128 * 2
        assert case["zero3"]["model + optimizer states (16 B/param / world)"] == pytest.approx(16 * params / case["P"])
    states = p64["activations_no_checkpointing"]["LASP-2 gathered states kept (last rank)"]
    assert states == 70 * 63 * (64 * 128 * 128 + 64) * 4  # the last of 64 ranks keeps 63 states per layer
    assert not p8["fits_h200"] and p64["fits_h200_offloaded"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_model_matches_saved_tensors(dtype):
    config, length = _config(), 256
    torch.manual_seed(0)
    model = TNLForCausalLM(config).to(dtype).train()
    rows = random_ids(1, length + 1, vocab=config.vocab_size)
    measured = bench.measure_saved_bytes(model, bench.ModuleContext(model),
                                         {"input_ids": rows[:, :-1], "shift_labels": rows[:, 1:]}, length)
    modelled = bench.saved_bytes_model(config, torch.finfo(dtype).bits // 8)
    assert set(measured) <= set(modelled)
    for part, value in modelled.items():
        # per-call constants (the router's fp32 weight copy in bf16) are left out of the model
        assert measured.get(part, 0) / length == pytest.approx(value, rel=2e-3, abs=4), part


@pytest.mark.slow
def test_counted_bytes_match_formulas_on_two_ranks():
    config = _config()
    spec = bench.make_spec(config, threads=1, lengths=[64], repeats=1, cap_mb=1e6, granularity=64, max_length=64)
    ranks = bench.run_group(2, spec)
    assert ranks[0]["longest"] == 64 and ranks[0]["longest_limited_by_max_length"]
    checks = bench.bytes_check(config, ranks, dtype_bytes=4)
    compared = [c for c in checks if c["match"] is not None]
    assert len(compared) == 6 and all(c["match"] for c in compared), compared
    forward = {c["part"]: c for c in compared if c["phase"] == "forward"}
    assert forward["lightning state"]["measured_per_layer"] == bytes_per_layer(
        "lasp2_state", batch=1, seq_len=64, size=2, heads=4, kv_heads=2, head_dim=16) == 4 * 16 * 16 * 4
    assert forward["softmax K/V"]["measured_per_layer"] == 2 * 32 * 2 * 16 * 4
    for rank, result in ranks.items():  # the activation model, sharded: gathered K/V and LASP-2 terms
        saved = result["saved_bytes"]
        local = saved["length"] // 2
        modelled = bench.saved_bytes_model(config, 4, world=2, rank=rank, local_tokens=local)
        for part, value in modelled.items():
            if part != "head, loss, router stats":  # the sharded router statistics differ by a few bytes
                assert saved["by_part"].get(part, 0) / local == pytest.approx(value, rel=2e-3, abs=4), (rank, part)
