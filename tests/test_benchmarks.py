"""The benchmark scripts run end to end at small sizes (the README shows them): each prints its
table and writes JSON and a PNG. Timings are not checked here; targets live in the scripts'
results (benchmarks/results/), measured on a quiet machine."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(script, *args, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *map(str, args)], cwd=str(REPO),
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _outputs(out_dir, stem):
    data = json.loads((out_dir / f"{stem}.json").read_text())
    assert (out_dir / f"{stem}.png").stat().st_size > 5000
    return data


def test_bench_vs_minimax_quick(tmp_path):
    out = _run("bench_vs_minimax.py", "--quick", "--out", tmp_path)
    assert "logit parity on the same weights" in out
    data = _outputs(tmp_path, "bench_vs_minimax_cpu_float32_quick")
    assert data["parity_relative_error"] < 1e-4
    assert data["continuation_relative_error_vs_own_forward"]["ours"] < 1e-5


def test_bench_long_context_small(tmp_path):
    out = _run("bench_long_context.py", "--max-context", 4096, "--max-hybrid-context", 2048, "--chunk", 1024,
               "--out", tmp_path)
    assert "all-linear decode at 4096 vs 1K" in out
    data = _outputs(tmp_path, "bench_long_context_cpu_float32")
    assert [r["context"] for r in data["runs"]["all_linear"]] == [1024, 2048, 4096]
    assert [r["context"] for r in data["runs"]["hybrid"]] == [1024, 2048]


def test_bench_lightning_attn_cpu_smoke(tmp_path):
    out = _run("bench_lightning_attn.py", "--cpu-smoke", "--out", tmp_path)
    assert list(tmp_path.glob("*.json")) and list(tmp_path.glob("*.png")), out[-2000:]


def test_bench_tokenize_quick(tmp_path):
    out = _run("bench_tokenize.py", "--quick", "--out", tmp_path)
    assert "tokenizer's own encode_batch" in out
    data = _outputs(tmp_path, "bench_tokenize_quick")
    assert [round(r["megabytes"]) for r in data["runs"]] == [1, 3]
    assert data["workers_2"]["same_shards"] and data["max_peak_rss_mib"] < 1024


def test_bench_speculative_quick(tmp_path):
    out = _run("bench_speculative.py", "--quick", "--out", tmp_path)
    assert "transformers MiniMaxForCausalLM" in out
    data = _outputs(tmp_path, "bench_speculative_cpu_float32_quick")
    assert {"model", "draft", "cases", "ttft", "round_costs", "minimax", "summary", "targets"} <= set(data)
    assert set(data["cases"]) == {"copy", "self_repeat", "loop", "natural", "adversarial"}
    for case in data["cases"].values():
        assert {"greedy", "lookup K=10", "assisted"} <= set(case["methods"])
        for name, row in case["methods"].items():
            assert row["identical_to_greedy"], name
            assert {"tokens_per_s", "speedup", "acceptance_rate"} <= set(row)
            if name != "greedy":
                assert {"drafted", "accepted", "rollbacks", "tokens_rolled_back"} <= set(row)
    assert data["targets"]["all_outputs_identical_to_greedy"]
    assert sum(r["rollbacks"] for c in data["cases"].values() for m, r in c["methods"].items() if m != "greedy") > 0
    ttft = data["ttft"]["target"]
    assert ttft["doc_tokens"] == 2048 and ttft["same_first_token"] and ttft["snapshot_bytes"] > 0
    assert data["minimax"]["attempts"]  # what transformers' MiniMax did with prompt lookup / an assistant
