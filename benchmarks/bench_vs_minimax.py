"""TNL vs transformers' MiniMaxForCausalLM on the same weights (issue: performance and long context).

Builds a MiniMax-shaped model in transformers (layer 0 linear, softmax every 8th layer,
power-of-two heads, full rotary, so both compute the same function), converts it with
``from-minimax``, checks that the logits agree, then times both in the same process,
interleaved, taking medians:

* prefill (no grad, cache on, last logits only) at several T
* continuation: a 2K-token second chunk after a 2K prompt, through the cache
* decode: ms per token at several context lengths
* training step (forward + backward with labels): tokens/s
* the lightning operator alone: ``lightning_attn(backend="torch")`` vs a block loop of the
  same math with block 256 and autograd (the algorithm transformers and the original code use)
* where the time goes per layer type (forward hooks), for both models
* MoE dispatch alone: the grouped GEMM vs the loop over non-empty experts (same stacked
  weights, same routing), inference and forward+backward, from one token (decode) up, with
  the largest difference between the two outputs and what ``"auto"`` picks

    python benchmarks/bench_vs_minimax.py            # full CPU run, ~10 minutes on 2 cores
    python benchmarks/bench_vs_minimax.py --quick    # small sizes, a smoke run
    python benchmarks/bench_vs_minimax.py --device cuda --dtype bfloat16   # GPU, Triton kernels

Prints tables and writes ``results/bench_vs_minimax[_quick].json`` and ``.png``.
"""

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, MiniMaxConfig, MiniMaxForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (RESULTS, decode_steps, fast_cpu_allocator, median_time, peak_memory, print_table, save_results,  # noqa: E402
                          synchronize)

import tnl_model  # noqa: E402,F401
from tnl_kernels import build_slopes, lightning_attn  # noqa: E402
from tnl_kernels.moe_dispatch import choose_implementation, grouped_mm_supported, moe_dispatch  # noqa: E402
from tnl_kernels.reference import lightning_attn_chunked  # noqa: E402
from tnl_model.convert import from_minimax  # noqa: E402

FULL = {"prefill": [512, 2048, 8192, 32768], "decode": [1024, 8192, 32768], "continuation": (2048, 2048),
        "train": 2048, "operator": [8192, 32768], "moe_tokens": [1, 16, 256, 2048, 8192]}
# On a GPU the training target is at T = 8K (on CPU a step at 8K takes minutes).
GPU = {**FULL, "train": 8192}
QUICK = {"prefill": [256, 1024], "decode": [256, 1024], "continuation": (256, 256), "train": 256,
         "operator": [1024, 4096], "moe_tokens": [1, 64, 512]}


def build_models(device, dtype, workdir: Path):
    layers = 8
    config = MiniMaxConfig(
        vocab_size=4096, hidden_size=512, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, num_local_experts=8, num_experts_per_tok=2,
        layer_types=["full_attention" if (i + 1) % 8 == 0 else "linear_attention" for i in range(layers)],
        max_position_embeddings=131072, full_attn_alpha_factor=2.0, linear_attn_alpha_factor=2.0, mlp_alpha_factor=2.0,
    )
    torch.manual_seed(0)
    theirs = MiniMaxForCausalLM(config)
    theirs.save_pretrained(workdir / "minimax")
    from_minimax(workdir / "minimax", workdir / "tnl")
    ours = AutoModelForCausalLM.from_pretrained(workdir / "tnl")
    theirs = theirs.to(device=device, dtype=dtype).eval()
    ours = ours.to(device=device, dtype=dtype).eval()
    return ours, theirs, config


def parity(ours, theirs, device) -> float:
    ids = torch.randint(0, ours.config.vocab_size, (1, 600), device=device)
    with torch.no_grad():
        a, b = ours(ids, use_cache=False).logits.float(), theirs(ids, use_cache=False).logits.float()
    return float((a - b).norm() / b.norm())


def continuation_parity(models, device, prompt_len=256, cont_len=256) -> dict:
    """Each model's logits for a continuation through its cache vs its own single forward.

    transformers' MiniMax gets this wrong when layer 0 is linear (its softmax layers get no mask,
    and SDPA's implicit causal mask is aligned to the first cached key), so its continuation
    timing is of a computation that differs from its own forward."""
    ids = torch.randint(0, 4096, (1, prompt_len + cont_len), device=device)
    errors = {}
    with torch.no_grad():
        for name, model in models.items():
            full = model(ids, use_cache=False).logits[:, prompt_len:].float()
            cache = model(ids[:, :prompt_len], use_cache=True).cache
            continued = model(ids[:, prompt_len:], cache=cache, use_cache=True).logits.float()
            errors[name] = float((continued - full).norm() / full.norm())
    return errors


def timed(fn, device, repeats, warmup):
    """(median seconds over ``repeats`` runs after ``warmup``, peak MB of one separate run).

    The memory run comes last (after the warm-up, so first-call allocations are not counted) and
    is never timed: it runs under the strict allocator."""
    seconds = median_time(fn, repeats=repeats, warmup=warmup, device=device)
    with peak_memory(device) as mem:
        fn()
    return seconds, mem["peak_mb"]


def repeats_for(tokens):
    """(timed runs, warm-up runs): fewer at long lengths, but always one warm-up."""
    return (3, 1) if tokens <= 2048 else (2, 1)


def bench_prefill(models, device, lengths):
    rows = []
    for length in lengths:
        ids = torch.randint(0, 4096, (1, length), device=device)
        repeats, warmup = repeats_for(length)
        result = {"T": length}
        order = list(models.items()) if len(rows) % 2 == 0 else list(models.items())[::-1]
        for name, model in order:  # interleaved per length, alternating which model goes first
            with torch.no_grad():
                seconds, peak = timed(lambda: model(ids, use_cache=True, logits_to_keep=1), device, repeats, warmup)
            result[name] = {"s": seconds, "tok_per_s": length / seconds, "peak_mb": peak}
        rows.append(result)
    return rows


def bench_continuation(models, device, prompt_len, cont_len):
    ids = torch.randint(0, 4096, (1, prompt_len + cont_len), device=device)
    result = {"prompt": prompt_len, "continuation": cont_len}
    for name, model in models.items():
        def continue_prompt(measure_memory=False):
            with torch.no_grad():
                cache = model(ids[:, :prompt_len], use_cache=True, logits_to_keep=1).cache
                synchronize(device)
                with peak_memory(device) if measure_memory else nullcontext({}) as mem:
                    start = time.perf_counter()
                    model(ids[:, prompt_len:], cache=cache, use_cache=True, logits_to_keep=1)
                    synchronize(device)
                    return time.perf_counter() - start, mem

        _, mem = continue_prompt(measure_memory=True)
        times = [continue_prompt()[0] for _ in range(3)]  # the first one warms up
        result[name] = {"s": statistics.median(times[1:]), "peak_mb": mem["peak_mb"]}
    return result


def bench_decode(models, device, contexts, steps=40, memory_steps=4):
    """ms per token after a prompt of each context length (median of ``steps`` timed steps), and the
    memory growth of ``memory_steps`` earlier steps measured separately."""
    rows = []
    for context in contexts:
        ids = torch.randint(0, 4096, (1, context + memory_steps + steps), device=device)
        result = {"context": context}
        for name, model in models.items():
            with torch.no_grad():
                cache = model(ids[:, :context], use_cache=True, logits_to_keep=1).cache
            result[name] = decode_steps(model, ids, context, cache, device, memory_steps, steps, skip=2)
        rows.append(result)
    return rows


def bench_train(models, device, length):
    ids = torch.randint(0, 4096, (1, length), device=device)
    result = {"T": length}
    for name, model in models.items():
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            model(ids, labels=ids, use_cache=False).loss.backward()

        seconds, peak = timed(step, device, repeats=3, warmup=1)
        model.eval()
        result[name] = {"s": seconds, "tok_per_s": length / seconds, "peak_mb": peak}
    return result


def bench_operator(device, dtype, lengths, heads=8, dim=64):
    rows = []
    slopes = build_slopes(heads, 1, 8, device=device)
    for length in lengths:
        q, k, v = (torch.randn(1, length, heads, dim, device=device, dtype=dtype) * 0.5 for _ in range(3))
        ours = lambda q, k, v: lightning_attn(q, k, v, slopes, backend="auto" if device != "cpu" else "torch")[0]  # noqa: E731
        loop = lambda q, k, v: lightning_attn_chunked(q, k, v, slopes, block_size=256)[0]  # noqa: E731
        result = {"T": length}
        for name, fn in (("ours", ours), ("block_loop", loop)):
            repeats, warmup = (3, 1) if length <= 8192 else (2, 1)
            with torch.no_grad():
                fwd, fwd_peak = timed(lambda: fn(q, k, v), device, repeats, warmup)
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            grad = torch.randn(1, length, heads, dim, device=device, dtype=dtype)
            if name == "block_loop" and length > 8192:
                repeats = 1  # autograd through the loop is the slow case being measured
            both, both_peak = timed(lambda: fn(*leaves).backward(grad), device, repeats, warmup)
            result[name] = {"fwd_s": fwd, "fwd_bwd_s": both, "fwd_peak_mb": fwd_peak, "fwd_bwd_peak_mb": both_peak}
        rows.append(result)
    return rows


def bench_moe_dispatch(device, dtype, token_counts, experts=8, top_k=2, dim=512, inner=512):
    """ms per call of ``moe_dispatch`` with each implementation, at the benchmark model's expert
    shapes (8 experts top-2, D = I = 512): inference, and forward+backward into the inputs and
    the stacked weights (training)."""
    generator = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)

    gate_up, down = rand(experts, 2 * inner, dim, scale=dim ** -0.5), rand(experts, dim, inner, scale=inner ** -0.5)
    rows = []
    for tokens in token_counts:
        hidden, grad = rand(tokens, dim), rand(tokens, dim)
        topk_weight, topk_index = rand(tokens, experts).float().softmax(-1).topk(top_k, dim=-1)
        row = {"tokens": tokens, "auto_inference": choose_implementation(hidden, gate_up, down)}
        repeats, warmup = (5, 2) if tokens <= 256 else (3, 1)
        outputs = {}
        for impl in ("loop", "grouped_mm"):
            if impl == "grouped_mm" and not grouped_mm_supported(hidden, gate_up, down):
                row[impl] = None
                continue
            with torch.no_grad():
                outputs[impl] = moe_dispatch(hidden, gate_up, down, topk_index, topk_weight, impl=impl).float()
                fwd = median_time(lambda: moe_dispatch(hidden, gate_up, down, topk_index, topk_weight, impl=impl),
                                  repeats, warmup, device)
            leaves = [t.clone().requires_grad_() for t in (hidden, gate_up, down)]
            both = median_time(lambda: moe_dispatch(*leaves, topk_index, topk_weight, impl=impl).backward(grad),
                               repeats, warmup, device)
            row[impl] = {"fwd_ms": 1e3 * fwd, "fwd_bwd_ms": 1e3 * both}
        if len(outputs) == 2:
            row["max_abs_difference"] = float((outputs["loop"] - outputs["grouped_mm"]).abs().max())
        rows.append(row)
    return rows


LAYER_CLASSES = {
    "ours": {"TNLLightningAttention": "lightning", "TNLSoftmaxAttention": "softmax", "TNLSparseMoeBlock": "moe"},
    "theirs": {"MiniMaxLightningAttention": "lightning", "MiniMaxAttention": "softmax", "MiniMaxSparseMoeBlock": "moe"},
}


def time_split(model, device, run, classes: dict) -> dict:
    """Seconds spent per layer type during ``run()`` (forward hooks on the mixer and FFN modules)."""
    spent, started, handles = defaultdict(float), {}, []
    for module in model.modules():
        kind = classes.get(type(module).__name__)
        if kind is None:
            continue

        def pre(mod, args, kind=kind):
            synchronize(device)
            started[id(mod)] = time.perf_counter()

        def post(mod, args, output, kind=kind):
            synchronize(device)
            spent[kind] += time.perf_counter() - started.pop(id(mod))

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    with torch.no_grad():
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        total = time.perf_counter() - start
    for handle in handles:
        handle.remove()
    split = {kind: round(seconds, 4) for kind, seconds in spent.items()}
    split["other"] = round(total - sum(spent.values()), 4)
    split["total"] = round(total, 4)
    return split


def prefill_split(models, device, length) -> dict:
    ids = torch.randint(0, 4096, (1, length), device=device)
    return {"T": length, **{name: time_split(model, device, lambda m=model: m(ids, use_cache=True, logits_to_keep=1),
                                             LAYER_CLASSES[name]) for name, model in models.items()}}


def continuation_split(models, device, prompt_len, cont_len) -> dict:
    """Where a continuation's time goes: transformers runs its lightning layers token by token once a
    cache exists, so their ratio is the operator's gain, diluted by the layers both compute alike."""
    ids = torch.randint(0, 4096, (1, prompt_len + cont_len), device=device)
    result = {"prompt": prompt_len, "continuation": cont_len}
    for name, model in models.items():
        with torch.no_grad():
            cache = model(ids[:, :prompt_len], use_cache=True, logits_to_keep=1).cache
        result[name] = time_split(model, device, lambda: model(ids[:, prompt_len:], cache=cache, use_cache=True,
                                                              logits_to_keep=1), LAYER_CLASSES[name])
    return result


def plot(payload, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    lengths = [r["T"] for r in payload["prefill"]]
    for name in ("ours", "theirs"):
        left.plot(lengths, [r[name]["s"] for r in payload["prefill"]], marker="o", label=f"{name} prefill")
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("prompt tokens")
    left.set_ylabel("seconds")
    left.set_title("prefill, same weights")
    left.legend()
    ratios = payload["speedups"]
    right.barh(list(ratios), list(ratios.values()), color="tab:green")
    right.axvline(1.0, color="k", lw=0.8)
    right.set_xscale("log")
    right.set_xlabel("speed-up of tnl over transformers MiniMax (x)")
    right.set_title("ratios (>1: tnl faster)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.device == "cpu":
        fast_cpu_allocator()
    sizes = QUICK if args.quick else (FULL if args.device == "cpu" else GPU)
    device, dtype = args.device, getattr(torch, args.dtype)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs, _ = build_models(device, dtype, Path(tmp))
    error = parity(ours, theirs, device)
    print(f"logit parity on the same weights: relative error {error:.2e}")
    models = {"ours": ours, "theirs": theirs}
    continuation_errors = continuation_parity(models, device)
    print("continuation through the cache vs the same model's single forward, relative error: "
          + ", ".join(f"{name} {err:.2e}" for name, err in continuation_errors.items()))

    payload = {"config": "8 layers (softmax at 7), hidden 512, 8 heads x 64, 8 experts top-2, vocab 4096",
               "device": device, "dtype": args.dtype, "parity_relative_error": error,
               "cpu_allocator": "timings: retain, memory: strict (tnl_model.cpu_allocator)",
               "continuation_relative_error_vs_own_forward": continuation_errors}
    payload["prefill"] = bench_prefill(models, device, sizes["prefill"])
    payload["continuation"] = bench_continuation(models, device, *sizes["continuation"])
    payload["decode"] = bench_decode(models, device, sizes["decode"])
    payload["train"] = bench_train(models, device, sizes["train"])
    payload["operator"] = bench_operator(device, dtype, sizes["operator"])
    payload["moe_dispatch"] = bench_moe_dispatch(device, dtype, sizes["moe_tokens"])
    payload["time_split"] = prefill_split(models, device, sizes["prefill"][-2])
    payload["continuation_split"] = continuation_split(models, device, *sizes["continuation"])
    speedups = {f"prefill T={r['T']}": r["theirs"]["s"] / r["ours"]["s"] for r in payload["prefill"]}
    cont = payload["continuation"]
    speedups[f"continuation {cont['continuation']} after {cont['prompt']}"] = cont["theirs"]["s"] / cont["ours"]["s"]
    cont_split = payload["continuation_split"]
    speedups["continuation, lightning layers"] = cont_split["theirs"]["lightning"] / cont_split["ours"]["lightning"]
    speedups.update({f"decode ctx={r['context']}": r["theirs"]["ms_per_token"] / r["ours"]["ms_per_token"] for r in payload["decode"]})
    speedups[f"train step T={payload['train']['T']}"] = payload["train"]["ours"]["tok_per_s"] / payload["train"]["theirs"]["tok_per_s"]
    for r in payload["operator"]:
        speedups[f"operator fwd T={r['T']}"] = r["block_loop"]["fwd_s"] / r["ours"]["fwd_s"]
        speedups[f"operator fwd+bwd T={r['T']}"] = r["block_loop"]["fwd_bwd_s"] / r["ours"]["fwd_bwd_s"]
    payload["speedups"] = speedups

    print_table("prefill (no grad)", ["T", "ours s", "theirs s", "speed-up", "ours MB", "theirs MB"],
                [[r["T"], r["ours"]["s"], r["theirs"]["s"], r["theirs"]["s"] / r["ours"]["s"], r["ours"]["peak_mb"],
                  r["theirs"]["peak_mb"]] for r in payload["prefill"]])
    print_table("continuation through the cache", ["prompt", "new", "ours s", "theirs s", "speed-up"],
                [[cont["prompt"], cont["continuation"], cont["ours"]["s"], cont["theirs"]["s"], cont["theirs"]["s"] / cont["ours"]["s"]]])
    print_table("decode", ["context", "ours ms/tok", "theirs ms/tok", "speed-up"],
                [[r["context"], r["ours"]["ms_per_token"], r["theirs"]["ms_per_token"],
                  r["theirs"]["ms_per_token"] / r["ours"]["ms_per_token"]] for r in payload["decode"]])
    train = payload["train"]
    print_table("training step (fwd+bwd)", ["T", "ours tok/s", "theirs tok/s", "ratio", "ours MB", "theirs MB"],
                [[train["T"], train["ours"]["tok_per_s"], train["theirs"]["tok_per_s"],
                  train["ours"]["tok_per_s"] / train["theirs"]["tok_per_s"], train["ours"]["peak_mb"], train["theirs"]["peak_mb"]]])
    print_table("lightning operator, H=8, D=E=64", ["T", "ours fwd s", "loop fwd s", "ours f+b s", "loop f+b s", "f+b speed-up",
                                                    "ours f+b MB", "loop f+b MB"],
                [[r["T"], r["ours"]["fwd_s"], r["block_loop"]["fwd_s"], r["ours"]["fwd_bwd_s"], r["block_loop"]["fwd_bwd_s"],
                  r["block_loop"]["fwd_bwd_s"] / r["ours"]["fwd_bwd_s"], r["ours"]["fwd_bwd_peak_mb"],
                  r["block_loop"]["fwd_bwd_peak_mb"]] for r in payload["operator"]])
    def ms(row, impl, key):
        return row[impl][key] if row[impl] else float("nan")

    print_table("MoE dispatch, 8 experts top-2, D = I = 512 (ms per call)",
                ["tokens", "loop fwd", "grouped fwd", "loop f+b", "grouped f+b", "auto (inference)", "max |diff|"],
                [[r["tokens"], ms(r, "loop", "fwd_ms"), ms(r, "grouped_mm", "fwd_ms"), ms(r, "loop", "fwd_bwd_ms"),
                  ms(r, "grouped_mm", "fwd_bwd_ms"), r["auto_inference"], r.get("max_abs_difference", float("nan"))]
                 for r in payload["moe_dispatch"]])
    split = payload["time_split"]
    kinds = ["lightning", "softmax", "moe", "other", "total"]
    print_table(f"time split of one prefill at T={split['T']} (s)", ["model", *kinds],
                [[name, *[split[name].get(k, 0.0) for k in kinds]] for name in ("ours", "theirs")])
    print_table(f"time split of the continuation ({cont_split['continuation']} after {cont_split['prompt']}, s)",
                ["model", *kinds], [[name, *[cont_split[name].get(k, 0.0) for k in kinds]] for name in ("ours", "theirs")])

    tag = f"{device}_{args.dtype}{'_quick' if args.quick else ''}"
    save_results(f"bench_vs_minimax_{tag}", payload, args.out, plot)


if __name__ == "__main__":
    main()
