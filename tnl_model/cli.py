"""The ``tnl`` command line.

    tnl generate MODEL_DIR --prompt "Once upon a time" [--max-new-tokens 64] [--temperature 0.8]
                 [--top-p 0.95] [--stream | --no-stream] [--seed 0] [--dtype bfloat16]
    tnl generate MODEL_DIR --token-ids 1,42,7          # raw ids: no tokenizer needed
    tnl info MODEL_DIR_OR_CONFIG_JSON                  # layer pattern, parameters, cache sizes
    tnl convert {from-minimax,to-minimax} SRC DST      # = python -m tnl_model.convert
    tnl train ...                                      # = python -m tnl_training.pretrain
    tnl export ...                                     # = python -m tnl_training.export

``generate`` loads with :func:`tnl_model.load_checks.load_model` (safetensors only,
strict shapes) and streams text as it is produced (transformers' ``TextStreamer``).
Errors print one ``error: ...`` line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import runpy
import sys
from pathlib import Path

from .cpu_allocator import configure_from_env

FORWARDED = {
    "convert": ("tnl_model.convert", "convert checkpoints between MiniMax-Text-01 and TNL"),
    "train": ("tnl_training.pretrain", "DeepSpeed pretraining (run under the deepspeed launcher for >1 process)"),
    "export": ("tnl_training.export", "export a training checkpoint to a Hugging Face model directory"),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DTYPES = ("float32", "bfloat16", "float16")


class CLIError(Exception):
    """A user-facing error: printed without a traceback."""


def _forward(name: str, argv: list[str]) -> int:
    module_name = FORWARDED[name][0]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise CLIError(f"`tnl {name}` needs {module_name}, which cannot be imported ({err}); "
                       "install the training extras: pip install 'tnl-model[train]'") from err
    entry = getattr(module, "main", None)
    if callable(entry):
        code = entry(argv)
    else:  # a module without main(argv): run it as a script
        saved = sys.argv
        sys.argv = [f"tnl {name}", *argv]
        try:
            runpy.run_module(module_name, run_name="__main__", alter_sys=True)
            code = 0
        finally:
            sys.argv = saved
    return int(code or 0)


# --------------------------------------------------------------------------------------------
# tnl info


def _load_config(path: str):
    from transformers import AutoConfig

    import tnl_model  # noqa: F401

    target = Path(path)
    if not target.exists():
        raise CLIError(f"{path} does not exist")
    if target.is_dir() and not (target / "config.json").exists():
        raise CLIError(f"{path} has no config.json: not a model directory")
    try:
        config = AutoConfig.from_pretrained(str(target))
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot read the config in {path}: {err}") from err
    if getattr(config, "model_type", None) != "tnl":
        raise CLIError(f"{path} holds a {config.model_type!r} config, not a TNL one "
                       "(MiniMax checkpoints: `tnl convert from-minimax SRC DST` first)")
    return config


def layer_pattern(config) -> str:
    """``LLLLLLLS x10`` style summary: L = lightning, S = softmax; lower case = dense FFN."""
    letters = "".join(
        ("L" if kind == "linear_attention" else "S") if mlp == "sparse" else ("l" if kind == "linear_attention" else "s")
        for kind, mlp in zip(config.layer_types, config.mlp_layer_types)
    )
    for period in range(1, len(letters) + 1):
        if len(letters) % period == 0 and letters[:period] * (len(letters) // period) == letters:
            return letters if period == len(letters) else f"{letters[:period]} x{len(letters) // period}"
    return letters


def info_lines(config, model_dir: Path | None = None) -> list[str]:
    from .parameters import (active_parameters, format_bytes, format_count, kv_cache_bytes_per_token,
                             parameter_breakdown, recurrent_state_bytes)

    counts = parameter_breakdown(config)
    linear = config.layer_types.count("linear_attention")
    softmax = len(config.layer_types) - linear
    sparse = config.mlp_layer_types.count("sparse")
    kv_token = kv_cache_bytes_per_token(config)
    state = recurrent_state_bytes(config)
    lines = [
        f"architecture: TNL hybrid lightning-attention {'MoE ' if sparse else ''}decoder "
        f"({'post-norm, MiniMax form' if config.postnorm else 'pre-norm, TransNormerLLM form'})",
        f"layers: {config.num_hidden_layers} = {linear} lightning + {softmax} softmax; "
        f"pattern {layer_pattern(config)}  (L lightning, S softmax; lower case = dense FFN)",
        f"hidden {config.hidden_size}, heads {config.num_attention_heads} (kv {config.num_key_value_heads}) x "
        f"head_dim {config.head_dim}, rotary_dim {config.rotary_dim}, vocab {config.vocab_size}, "
        f"max positions {config.max_position_embeddings}",
        f"FFN: {sparse} MoE layers ({config.num_local_experts} experts, top-{config.num_experts_per_tok}, "
        f"expert size {config.intermediate_size}"
        + (f", shared expert {config.shared_intermediate_size}" if config.shared_intermediate_size else "")
        + f"), {len(config.mlp_layer_types) - sparse} dense",
        f"parameters total: {counts.total:,} ({format_count(counts.total)}; embeddings + lm_head "
        f"{format_count(counts.embedding + counts.lm_head)})",
        f"parameters active per token: {active_parameters(config):,} ({format_count(active_parameters(config))}) "
        f"with embeddings, {counts.active(False):,} ({format_count(counts.active(False))}) without",
        f"state per sequence: lightning {format_bytes(state)} fp32 (fixed, any length) + softmax KV "
        f"{format_bytes(kv_token)}/token bf16 ("
        + ", ".join(f"{format_bytes(state + kv_token * n)} at {n} tokens" for n in sorted(
            {min(4096, config.max_position_embeddings), config.max_position_embeddings})) + ")",
    ]
    if model_dir is not None:
        from .checkpoint_io import CheckpointError
        from .load_checks import verify_checkpoint

        try:
            report = verify_checkpoint(model_dir, config)
        except CheckpointError as err:
            lines.append(f"weights: NOT LOADABLE: {err}")
        else:
            if report.ok:
                lines.append(f"weights: {report.num_tensors} tensors, shapes match the config")
            else:
                problems = ([f"{n}: checkpoint {list(a)} vs config {list(b)}" for n, a, b in report.mismatched]
                            + [f"{n}: missing" for n in report.missing])
                lines.append(f"weights: DO NOT MATCH the config ({len(problems)} problems): " + "; ".join(problems[:5]))
        tokenizer = [name for name in TOKENIZER_FILES if (model_dir / name).exists()]
        lines.append(f"tokenizer: {', '.join(tokenizer) if tokenizer else 'none (tnl generate needs --token-ids)'}")
    return lines


def cmd_info(args) -> int:
    path = Path(args.model)
    config = _load_config(args.model)
    has_weights = path.is_dir() and any((path / f).exists() for f in ("model.safetensors", "model.safetensors.index.json",
                                                                       "pytorch_model.bin"))
    lines = info_lines(config, path if has_weights else None)
    if args.json:
        from .parameters import active_parameters, kv_cache_bytes_per_token, recurrent_state_bytes, total_parameters

        print(json.dumps({
            "layer_types": config.layer_types, "mlp_layer_types": config.mlp_layer_types,
            "pattern": layer_pattern(config),
            "total_parameters": total_parameters(config),
            "active_parameters": active_parameters(config),
            "active_parameters_without_embeddings": active_parameters(config, include_embeddings=False),
            "recurrent_state_bytes_per_sequence": recurrent_state_bytes(config),
            "kv_cache_bytes_per_token_bf16": kv_cache_bytes_per_token(config),
        }, indent=2))
    else:
        print("\n".join(lines))
    return 0


# --------------------------------------------------------------------------------------------
# tnl generate


def _load_tokenizer(model_dir: Path):
    if not any((model_dir / name).exists() for name in TOKENIZER_FILES):
        raise CLIError(
            f"{model_dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}). Add one with "
            f"`AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained('{model_dir}')` (for a tokenizer trained by "
            "tnl_training, save that directory's files next to config.json), or pass raw ids with --token-ids 1,42,7"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise CLIError(f"the tokenizer in {model_dir} cannot be loaded: {err}") from err


class _IdStreamer:
    """Streams raw token ids (``--token-ids`` mode): prints each id as it is produced."""

    def __init__(self, skip_prompt: bool = True):
        self.skip_prompt, self.started = skip_prompt, False

    def put(self, value):
        if self.skip_prompt and not self.started:
            self.started = True
            return
        print(" ".join(str(int(t)) for t in value.reshape(-1).tolist()), end=" ", flush=True)

    def end(self):
        print(flush=True)


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(piece) for piece in text.replace(",", " ").split()]
    except ValueError as err:
        raise CLIError(f"--token-ids must be integers separated by commas or spaces, got {text!r}") from err
    if not ids:
        raise CLIError("--token-ids is empty: give at least one token id")
    return ids


def cmd_generate(args) -> int:
    import torch
    from transformers import TextStreamer

    from .checkpoint_io import CheckpointError
    from .load_checks import load_model

    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise CLIError(f"{args.model} is not a model directory")
    if args.prompt is None and args.token_ids is None:
        raise CLIError("give --prompt TEXT (needs a tokenizer in MODEL_DIR) or --token-ids IDS")
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise CLIError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise CLIError(f"--top-p must be in (0, 1], got {args.top_p}")

    tokenizer = None
    if args.token_ids is not None:
        ids = _parse_ids(args.token_ids)
    else:
        tokenizer = _load_tokenizer(model_dir)
        ids = tokenizer(args.prompt)["input_ids"]
        if not ids:
            raise CLIError("the prompt is empty after tokenisation: give some text")
    _load_config(args.model)
    try:
        model = load_model(model_dir, dtype=getattr(torch, args.dtype), allow_pickle=args.allow_pickle).eval()
    except (CheckpointError, OSError) as err:
        raise CLIError(str(err)) from err

    if args.seed is not None:
        torch.manual_seed(args.seed)
    input_ids = torch.tensor([ids])
    sampling = args.temperature > 0
    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=sampling,
                      attention_mask=torch.ones_like(input_ids))
    if sampling:
        gen_kwargs.update(temperature=args.temperature, top_p=args.top_p)
    if model.generation_config.pad_token_id is None and model.config.eos_token_id is None:
        gen_kwargs["pad_token_id"] = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    if args.stream:
        gen_kwargs["streamer"] = (TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
                                  if tokenizer is not None else _IdStreamer())
    with torch.no_grad():
        output = model.generate(input_ids, **gen_kwargs)
    new_tokens = output[0, input_ids.shape[1]:].tolist()
    if not args.stream:
        if tokenizer is not None:
            print(tokenizer.decode(new_tokens, skip_special_tokens=True))
        else:
            print(" ".join(str(t) for t in new_tokens))
    return 0


# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tnl", description="TNL hybrid lightning-attention MoE models")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate text from a model directory, streaming tokens")
    gen.add_argument("model", metavar="MODEL_DIR")
    gen.add_argument("--prompt", help="text prompt (needs a tokenizer saved in MODEL_DIR)")
    gen.add_argument("--token-ids", help="raw prompt token ids, e.g. 1,42,7 (no tokenizer needed)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    gen.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                     help="print tokens as they are produced (default) or all at the end")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", choices=DTYPES, default="float32")
    gen.add_argument("--allow-pickle", action="store_true",
                     help="accept a pickle-only checkpoint (pytorch_model.bin, loaded with weights_only=True)")
    gen.set_defaults(func=cmd_generate)

    info = sub.add_parser("info", help="print the architecture, parameter counts and cache sizes")
    info.add_argument("model", metavar="MODEL_DIR_OR_CONFIG", help="model directory or config.json")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_info)

    for name, (module, help_text) in FORWARDED.items():
        sub.add_parser(name, help=f"{help_text} (= python -m {module}; arguments are passed on)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in FORWARDED:
            return _forward(argv[0], argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        configure_from_env()  # reuse freed CPU memory instead of page-faulting fresh tensors
        return args.func(args)
    except CLIError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:  # config validation, bad token ids, unreadable files
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
