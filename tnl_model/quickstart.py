"""End-to-end example: build a TNL model from a config, save it, reload it through
``AutoModelForCausalLM`` and generate, checking the cached generation against the
uncached one.

    python -m tnl_model.quickstart [--config configs/model/small.json] [--out runs/quickstart]
"""

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import tnl_model  # noqa: F401 - registers the Auto classes
from tnl_model.cpu_allocator import configure_from_env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/model/small.json", help="model config.json")
    parser.add_argument("--out", default="runs/quickstart", help="where to save the model")
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    configure_from_env()

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(args.config)
    model = AutoModelForCausalLM.from_config(config).eval()
    total = model.num_parameters()
    print(f"built {type(model).__name__} from {args.config}: {total / 1e6:.1f}M parameters, "
          f"layers {''.join('L' if t == 'linear_attention' else 'S' for t in config.layer_types)} (L=lightning, S=softmax)")

    out = Path(args.out)
    model.save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    print(f"saved to {out} ({', '.join(sorted(p.name for p in out.iterdir()))}) and reloaded via AutoModelForCausalLM")

    prompt = torch.randint(3, config.vocab_size, (1, args.prompt_length))
    with torch.no_grad():
        start = time.perf_counter()
        cached = reloaded.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=False)
        cached_s = time.perf_counter() - start
        start = time.perf_counter()
        uncached = reloaded.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=False, use_cache=False)
        uncached_s = time.perf_counter() - start
    new_tokens = cached[0, args.prompt_length:].tolist()
    print(f"generated {len(new_tokens)} tokens (random weights, so ids not text): {new_tokens[:16]} ...")
    print(f"with cache {cached_s:.2f}s, without cache {uncached_s:.2f}s; identical: {torch.equal(cached, uncached)}")
    return 0 if torch.equal(cached, uncached) else 1


if __name__ == "__main__":
    raise SystemExit(main())
