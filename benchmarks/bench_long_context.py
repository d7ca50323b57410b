"""Long-context prefill and decode: time per token and peak memory versus context length.

Two configs share every size but the layer pattern: all-linear (lightning only) and
the MiniMax hybrid (softmax every 8th layer). Prompts are prefilled through the
model's chunked prefill (``prefill_chunk_size``), then decode is timed per token.

    python benchmarks/bench_long_context.py                 # CPU: 1K -> 256K, both configs
    python benchmarks/bench_long_context.py --quick         # 1K -> 16K
    python benchmarks/bench_long_context.py --device cuda --max-context 1048576

Targets: all-linear decode ms/token at the longest context within 1.2x of 1K, and
peak memory independent of the context beyond the chunk; the hybrid grows only by its
softmax layers' KV cache (1/8 of a dense transformer's).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import RESULTS, decode_steps, fast_cpu_allocator, peak_memory, print_table, save_results, synchronize  # noqa: E402

import tnl_model  # noqa: E402,F401
from tnl_model import TNLConfig, TNLForCausalLM  # noqa: E402

LAYERS = 8


def make_config(pattern: str, chunk: int, max_context: int) -> TNLConfig:
    layer_types = ["linear_attention"] * LAYERS
    if pattern == "hybrid":
        layer_types[LAYERS - 1] = "full_attention"  # softmax at layer 7 of 8, as in MiniMax-Text-01
    return TNLConfig(vocab_size=4096, hidden_size=256, intermediate_size=256, num_hidden_layers=LAYERS,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64, rotary_dim=32,
                     num_local_experts=4, num_experts_per_tok=2, layer_types=layer_types,
                     max_position_embeddings=max_context + 64, prefill_chunk_size=chunk)


def kv_bytes_per_token(config: TNLConfig, dtype_bytes: int) -> int:
    softmax_layers = config.layer_types.count("full_attention")
    return softmax_layers * 2 * config.num_key_value_heads * config.head_dim * dtype_bytes


def measure(model, context: int, device, timed_steps: int = 48, memory_steps: int = 4) -> dict:
    """Prefill time and decode ms/token (timed runs), and their peak memory (separate runs under the
    strict allocator, see bench_common)."""
    ids = torch.randint(3, model.config.vocab_size, (1, context + memory_steps + timed_steps), device=device)
    with torch.no_grad():
        with peak_memory(device) as prefill_mem:
            model(ids[:, :context], use_cache=True, logits_to_keep=1)
        synchronize(device)
        start = time.perf_counter()
        cache = model(ids[:, :context], use_cache=True, logits_to_keep=1).cache
        synchronize(device)
        prefill_s = time.perf_counter() - start
    decode = decode_steps(model, ids, context, cache, device, memory_steps, timed_steps, skip=4)
    return {"context": context, "prefill_s": prefill_s, "prefill_us_per_token": 1e6 * prefill_s / context,
            "decode_ms_per_token": decode["ms_per_token"], "prefill_peak_mb": prefill_mem["peak_mb"],
            "decode_peak_mb": decode["peak_mb"]}


def plot(payload, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for pattern, rows in payload["runs"].items():
        contexts = [r["context"] for r in rows]
        axes[0].plot(contexts, [r["prefill_us_per_token"] for r in rows], marker="o", label=pattern)
        axes[1].plot(contexts, [r["decode_ms_per_token"] for r in rows], marker="o", label=pattern)
        axes[2].plot(contexts, [r["prefill_peak_mb"] for r in rows], marker="o", label=f"{pattern} prefill peak")
        if any(r["prefill_peak_beyond_kv_mb"] != r["prefill_peak_mb"] for r in rows):
            axes[2].plot(contexts, [r["prefill_peak_beyond_kv_mb"] for r in rows], marker="x", linestyle="--",
                         label=f"{pattern} prefill peak minus KV cache")
    titles = ("prefill time per token (us)", "decode time per token (ms)", "peak memory growth (MiB)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_title(title)
        ax.legend()
    axes[1].set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-context", type=int, default=None, help="longest all-linear context")
    parser.add_argument("--max-hybrid-context", type=int, default=None, help="longest hybrid context")
    parser.add_argument("--chunk", type=int, default=4096, help="prefill_chunk_size")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.device == "cpu":
        fast_cpu_allocator()
    dtype = getattr(torch, args.dtype)
    max_linear = args.max_context or (16384 if args.quick else 262144)
    max_hybrid = args.max_hybrid_context or max_linear

    payload = {"chunk": args.chunk, "device": args.device, "dtype": args.dtype, "runs": {},
               "cpu_allocator": "timings: retain, memory: strict (tnl_model.cpu_allocator)"}
    for pattern, longest in (("all_linear", max_linear), ("hybrid", max_hybrid)):
        torch.manual_seed(0)
        config = make_config(pattern, args.chunk, max_linear)
        model = TNLForCausalLM(config).to(device=args.device, dtype=dtype).eval()
        contexts, context = [], 1024
        while context <= longest:
            contexts.append(context)
            context *= 4 if context >= 16384 else 2
        rows, kv_bytes = [], kv_bytes_per_token(config, torch.finfo(dtype).bits // 8)
        measure(model, contexts[0], args.device)  # warm-up: first-call allocations and timings are not a context's
        for context in contexts:
            rows.append(measure(model, context, args.device))
            # What the prefill holds beyond the KV cache it hands over: flat when only the KV cache grows.
            rows[-1]["prefill_peak_beyond_kv_mb"] = rows[-1]["prefill_peak_mb"] - context * kv_bytes / 2**20
            print(f"{pattern:10s} context {context:>8d}: prefill {rows[-1]['prefill_s']:.2f}s, "
                  f"decode {rows[-1]['decode_ms_per_token']:.2f} ms/token, prefill peak {rows[-1]['prefill_peak_mb']:.0f} MiB",
                  flush=True)
        payload["runs"][pattern] = rows
        payload[f"{pattern}_kv_bytes_per_token"] = kv_bytes
        del model

    dense_kv = LAYERS * 2 * 2 * 64 * (torch.finfo(dtype).bits // 8)  # the same model with every layer softmax
    payload["dense_kv_bytes_per_token"] = dense_kv
    linear = payload["runs"]["all_linear"]
    payload["all_linear_decode_ratio_longest_vs_1k"] = linear[-1]["decode_ms_per_token"] / linear[0]["decode_ms_per_token"]
    for pattern, rows in payload["runs"].items():
        print_table(f"{pattern} (chunk {args.chunk})", ["context", "prefill s", "prefill us/tok", "decode ms/tok",
                                                        "prefill peak MiB", "beyond KV MiB", "decode peak MiB"],
                    [[r["context"], r["prefill_s"], r["prefill_us_per_token"], r["decode_ms_per_token"],
                      r["prefill_peak_mb"], r["prefill_peak_beyond_kv_mb"], r["decode_peak_mb"]] for r in rows])
    print(f"\nall-linear decode at {linear[-1]['context']} vs 1K: {payload['all_linear_decode_ratio_longest_vs_1k']:.2f}x")
    print(f"KV bytes per token: hybrid {payload['hybrid_kv_bytes_per_token']}, dense equivalent {dense_kv} "
          f"({payload['hybrid_kv_bytes_per_token'] / dense_kv:.3f} of dense)")
    tag = f"{args.device}_{args.dtype}{'_quick' if args.quick else ''}"
    save_results(f"bench_long_context_{tag}", payload, args.out, plot)


if __name__ == "__main__":
    main()
