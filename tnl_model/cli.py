"""The ``tnl`` command line.

    tnl generate MODEL_DIR --prompt "Once upon a time" [--max-new-tokens 64] [--temperature 0.8]
                 [--top-p 0.95] [--stream | --no-stream] [--seed 0] [--dtype bfloat16]
    tnl generate MODEL_DIR --token-ids 1,42,7          # raw ids: no tokenizer needed
    tnl generate MODEL_DIR --context-file DOC.txt --save-context DOC.tnlctx   # process a document once
    tnl generate MODEL_DIR --load-context DOC.tnlctx --prompt "Q: ..."         # ask about it, any number of times
    tnl info MODEL_DIR_OR_CONFIG_JSON [--context-length N]   # layer pattern, parameters, cache/snapshot sizes
    tnl eval MODEL_DIR --tasks TASK [--include-path DIR] [lm-eval flags]   # lm-evaluation-harness
    tnl convert {from-minimax,to-minimax,to-gguf} SRC DST   # = python -m tnl_model.convert
    tnl train ...                                      # = python -m tnl_training.pretrain
    tnl export ...                                     # = python -m tnl_training.export

``generate`` loads with :func:`tnl_model.load_checks.load_model` (safetensors only,
strict shapes) and streams text as it is produced (transformers' ``TextStreamer``).
Errors print one ``error: ...`` line on stderr and exit with status 2; so does ``info`` (after its
report) when a model directory's weights do not match its config or cannot be loaded.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import runpy
import sys
import time
from pathlib import Path

from .cpu_allocator import configure_from_env

FORWARDED = {
    "convert": ("tnl_model.convert", "convert checkpoints between MiniMax-Text-01 and TNL, or to GGUF for llama.cpp"),
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
    config_file = target / "config.json" if target.is_dir() else target
    if not config_file.is_file():  # a FIFO would block the read forever
        raise CLIError(f"{config_file} is not a regular file")
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


def info_lines(config, model_dir: Path | None = None, context_length: int | None = None) -> list[str]:
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
    if context_length is not None:
        from .snapshots import snapshot_bytes

        growth = "constant in length: lightning states only" if not softmax else "lightning states + softmax KV per token"
        lines.append(f"context snapshot of {context_length:,} tokens: {format_bytes(snapshot_bytes(config, context_length))} "
                     f"with bf16 KV ({growth}; + 8 bytes per token id)")
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
    if args.context_length is not None and args.context_length < 1:
        raise CLIError(f"--context-length must be >= 1, got {args.context_length}")
    lines = info_lines(config, path if has_weights else None, args.context_length)
    weights_bad = any(line.startswith(("weights: DO NOT MATCH", "weights: NOT LOADABLE")) for line in lines)
    if args.json:
        from .parameters import active_parameters, kv_cache_bytes_per_token, recurrent_state_bytes, total_parameters
        from .snapshots import snapshot_bytes

        print(json.dumps({
            "layer_types": config.layer_types, "mlp_layer_types": config.mlp_layer_types,
            "pattern": layer_pattern(config),
            "total_parameters": total_parameters(config),
            "active_parameters": active_parameters(config),
            "active_parameters_without_embeddings": active_parameters(config, include_embeddings=False),
            "recurrent_state_bytes_per_sequence": recurrent_state_bytes(config),
            "kv_cache_bytes_per_token_bf16": kv_cache_bytes_per_token(config),
            **({"context_length": args.context_length,
                "snapshot_bytes_bf16_kv": snapshot_bytes(config, args.context_length)} if args.context_length else {}),
        }, indent=2))
    else:
        print("\n".join(lines))
    if weights_bad:  # the report is printed; the exit status says it is not a usable model
        print(f"error: the weights in {path} cannot be used with its config (see the weights: line)", file=sys.stderr)
        return 2
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
    from safetensors import SafetensorError
    from transformers import TextStreamer

    from .checkpoint_io import CheckpointError
    from .load_checks import load_model

    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise CLIError(f"{args.model} is not a model directory")
    saving_only = args.save_context is not None and args.prompt is None and args.token_ids is None
    if args.prompt is None and args.token_ids is None and not saving_only:
        raise CLIError("give --prompt TEXT (needs a tokenizer in MODEL_DIR) or --token-ids IDS")
    if args.load_context is not None and (args.context_file is not None or args.save_context is not None):
        raise CLIError("--load-context gives the context already: use it without --context-file/--save-context")
    if args.save_context is not None and args.context_file is None:
        raise CLIError("--save-context needs --context-file DOC.txt: the text whose cache is saved")
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):  # nan compares false to everything
        raise CLIError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        raise CLIError(f"--top-p must be in (0, 1], got {args.top_p}")

    needs_tokenizer = args.prompt is not None or args.context_file is not None
    tokenizer = _load_tokenizer(model_dir) if needs_tokenizer else None
    _load_config(args.model)
    try:
        model = load_model(model_dir, dtype=getattr(torch, args.dtype), allow_pickle=args.allow_pickle).eval()
    except (CheckpointError, OSError) as err:
        raise CLIError(str(err)) from err
    except SafetensorError as err:  # a file the header checks passed but the safetensors library refuses
        raise CLIError(f"the weights in {model_dir} cannot be read ({err}); re-download or save them again") from err

    context_ids, cache = _context(args, model, tokenizer)
    if saving_only:
        return 0
    if args.token_ids is not None:
        ids = _parse_ids(args.token_ids)
    else:  # after a context the prompt continues it: no second BOS
        ids = tokenizer(args.prompt, add_special_tokens=not context_ids)["input_ids"]
        if not ids:
            raise CLIError("the prompt is empty after tokenisation: give some text")

    if args.seed is not None:
        torch.manual_seed(args.seed)
    input_ids = torch.tensor([context_ids + ids])
    sampling = args.temperature > 0
    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=sampling,
                      attention_mask=torch.ones_like(input_ids))
    if cache is not None:
        gen_kwargs["cache"] = cache
    if sampling:
        gen_kwargs.update(temperature=args.temperature, top_p=args.top_p)
    if model.generation_config.pad_token_id is None and model.config.eos_token_id is None:
        gen_kwargs["pad_token_id"] = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    if args.stream:
        gen_kwargs["streamer"] = (_IdStreamer() if args.token_ids is not None
                                  else TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
    with torch.no_grad():
        output = model.generate(input_ids, **gen_kwargs)
    new_tokens = output[0, input_ids.shape[1]:].tolist()
    if not args.stream:  # ids in, ids out; text in, text out
        if args.token_ids is None:
            print(tokenizer.decode(new_tokens, skip_special_tokens=True))
        else:
            print(" ".join(str(t) for t in new_tokens))
    return 0


def _context(args, model, tokenizer):
    """``(context token ids, cache)`` for ``--context-file`` / ``--load-context``; saves ``--save-context``.

    The context is tokenised on its own (with the tokenizer's BOS) and the prompt after it without one,
    so ``--load-context`` of a saved file gives exactly what ``--context-file`` with the same text gives.
    """
    import torch

    from .parameters import format_bytes
    from .snapshots import SnapshotError, load_cache, save_cache, snapshot_bytes

    if args.load_context is not None:
        try:
            cache, ids = load_cache(args.load_context, config=model.config, dtype=next(model.parameters()).dtype)
        except SnapshotError as err:
            raise CLIError(str(err)) from err
        if ids.shape[0] != 1:
            raise CLIError(f"{args.load_context} holds a batch of {ids.shape[0]} contexts; tnl generate takes one")
        return ids[0].tolist(), cache
    if args.context_file is None:
        return [], None
    try:
        text = Path(args.context_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CLIError(f"--context-file {args.context_file} cannot be read as UTF-8 text: {err}") from err
    ids = tokenizer(text)["input_ids"]
    if not ids:
        raise CLIError(f"--context-file {args.context_file} is empty after tokenisation")
    if args.save_context is None:
        return ids, None  # prefilled together with the prompt by generate()
    start = time.perf_counter()
    with torch.no_grad():
        cache = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1).cache
    path = save_cache(cache, args.save_context, config=model.config, input_ids=torch.tensor([ids]))
    print(f"saved the cache of {len(ids)} context tokens to {path} ({format_bytes(path.stat().st_size)}; "
          f"{format_bytes(snapshot_bytes(model.config, len(ids), kv_dtype=next(model.parameters()).dtype))} of "
          f"tensors) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return ids, cache


# --------------------------------------------------------------------------------------------
# tnl eval


EVAL_USAGE = "tnl eval MODEL_DIR --tasks TASK [...] [--include-path DIR] [--model-args K=V,...] [lm-eval flags]"
#: lm-eval flags that `tnl eval` sets itself
EVAL_OWN_FLAGS = ("--model", "-M", "--model_args", "-a", "--tasks", "-t", "--include_path")


def _eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tnl eval", usage=EVAL_USAGE, allow_abbrev=False,  # unknown flags belong to lm-eval
        description="Run lm-evaluation-harness (`lm_eval run --model hf`) on a TNL model directory, with TNL "
                    "registered in transformers first. Flags not listed here (--batch_size, --device, --limit, "
                    "--num_fewshot, --output_path, --log_samples, ...) are passed on to lm-eval unchanged.")
    parser.add_argument("model", metavar="MODEL_DIR", help="a saved TNL model directory with its tokenizer")
    parser.add_argument("--tasks", nargs="+", required=True, help="lm-eval task names (space or comma separated)")
    parser.add_argument("--include-path", "--include_path", dest="include_path", metavar="DIR",
                        help="a folder of extra lm-eval task yaml files")
    parser.add_argument("--model-args", "--model_args", dest="model_args", metavar="K=V,...",
                        help="more HFLM arguments after pretrained=MODEL_DIR, e.g. dtype=bfloat16,max_length=4096")
    return parser


def eval_argv(args: argparse.Namespace, passthrough: list[str]) -> list[str]:
    """The ``lm_eval run`` command line for a parsed ``tnl eval`` command."""
    own = [a for a in passthrough if a.split("=", 1)[0] in EVAL_OWN_FLAGS]
    if own:
        raise CLIError(f"`tnl eval` sets {own[0].split('=', 1)[0]} itself (the model is always `--model hf "
                       "--model_args pretrained=MODEL_DIR`); use --model-args for more model arguments")
    model_args = f"pretrained={args.model}" + (f",{args.model_args}" if args.model_args else "")
    argv = ["run", "--model", "hf", "--model_args", model_args, "--tasks", *args.tasks]
    if args.include_path:
        argv += ["--include_path", args.include_path]
    return argv + passthrough


def cmd_eval(args) -> int:
    parsed, passthrough = _eval_parser().parse_known_args(args.eval_args)
    model_dir = Path(parsed.model)
    _load_config(parsed.model)  # a TNL model directory, or a clear error
    if not any((model_dir / name).exists() for name in TOKENIZER_FILES):
        raise CLIError(f"{model_dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); lm-eval tokenises "
                       "text with the tokenizer saved next to config.json")
    if parsed.include_path is not None and not Path(parsed.include_path).is_dir():
        raise CLIError(f"--include-path {parsed.include_path} is not a directory")
    argv = eval_argv(parsed, passthrough)
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as err:
        raise CLIError(f"`tnl eval` needs lm-evaluation-harness, which cannot be imported ({err}); "
                       "install it: pip install 'lm-eval>=0.4.13'") from err
    import tnl_model  # noqa: F401  (registers "tnl" with AutoConfig/AutoModelForCausalLM before lm-eval loads it)

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as done:  # lm-eval's argparse (bad flag, --help)
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 2)
    finally:
        sys.argv = saved
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
    gen.add_argument("--context-file", metavar="DOC.txt", help="text the prompt follows (e.g. a long document)")
    gen.add_argument("--save-context", metavar="DOC.tnlctx",
                     help="save the cache of --context-file as a snapshot (safetensors); no prompt needed")
    gen.add_argument("--load-context", metavar="DOC.tnlctx",
                     help="start from a saved context snapshot instead of processing the document again")
    gen.set_defaults(func=cmd_generate)

    info = sub.add_parser("info", help="print the architecture, parameter counts and cache sizes")
    info.add_argument("model", metavar="MODEL_DIR_OR_CONFIG", help="model directory or config.json")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument("--context-length", type=int, metavar="N",
                      help="also print the size of a context snapshot of N tokens (tnl generate --save-context)")
    info.set_defaults(func=cmd_info)

    evaluate = sub.add_parser("eval", help="run lm-evaluation-harness on a model directory (needs lm-eval)",
                              usage=EVAL_USAGE, description=_eval_parser().description)
    evaluate.add_argument("eval_args", nargs=argparse.REMAINDER, metavar="MODEL_DIR --tasks TASK ...",
                          help="see `tnl eval MODEL_DIR --help`; unknown flags go to lm-eval")
    evaluate.set_defaults(func=cmd_eval)

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
