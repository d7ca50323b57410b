"""Convert checkpoints between the MiniMax-Text-01 format and TNL.

    python -m tnl_model.convert from-minimax SRC DST
    python -m tnl_model.convert to-minimax SRC DST
    python -m tnl_model.convert to-gguf MODEL_DIR OUT.gguf [--outtype f32|f16|bf16|q8_0] [--tokenizer DIR]

SRC and DST are directories; to-gguf writes one file, for llama.cpp's minimax-01 architecture
(see tnl_model.gguf_export). Only safetensors are read or written (besides that GGUF). Tokenizer and
generation-config files are copied along. The model is never instantiated, so conversion of a
full-size checkpoint needs memory for one layer's experts only.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

from .checkpoint_io import CheckpointError, SafetensorsDirectory, write_sharded
from .configuration_tnl import TNLConfig
from .minimax_format import config_from_minimax, config_to_minimax, tensors_from_minimax, tensors_to_minimax

# Files copied unchanged from SRC to DST when present.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "generation_config.json", "vocab.json", "merges.txt")


def _read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.exists():
        raise CheckpointError(f"{directory} has no config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err


def _copy_side_files(src: Path, dst: Path) -> None:
    for name in SIDE_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def _write_config(dst: Path, config_dict: dict) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")


def from_minimax(src: str | Path, dst: str | Path) -> TNLConfig:
    """MiniMax-Text-01 (original or transformers-saved) directory -> TNL directory."""
    src, dst = Path(src), Path(dst)
    raw = _read_config(src)
    if raw.get("model_type") not in (None, "minimax", "minimax_text_01", "MiniMaxText01"):
        raise CheckpointError(f"{src}/config.json has model_type {raw.get('model_type')!r}, not a MiniMax config")
    config = config_from_minimax(raw)
    config.architectures = ["TNLForCausalLM"]
    source = SafetensorsDirectory(src)
    write_sharded(tensors_from_minimax(source, config), dst)
    config.save_pretrained(dst)
    _copy_side_files(src, dst)
    return config


def to_minimax(src: str | Path, dst: str | Path) -> dict:
    """TNL directory -> MiniMax-format directory loadable by transformers' MiniMaxForCausalLM."""
    src, dst = Path(src), Path(dst)
    config = TNLConfig.from_pretrained(src)
    minimax_config = config_to_minimax(config)
    source = SafetensorsDirectory(src)
    write_sharded(tensors_to_minimax(source, config), dst)
    _write_config(dst, minimax_config)
    _copy_side_files(src, dst)
    return minimax_config


def export_notes(minimax_config: dict) -> list[str]:
    """What an exported checkpoint carries that transformers' MiniMaxForCausalLM does not read."""
    notes = []
    if minimax_config["rotary_dim"] != minimax_config["head_dim"]:
        notes.append("rotary_dim < head_dim; transformers' MiniMaxForCausalLM ignores rotary_dim and rotates every dim, "
                     "so only engines that read rotary_dim (the original code, vLLM) reproduce this model")
    if minimax_config["shared_intermediate_size"] > 0:
        notes.append("shared expert (shared_intermediate_size="
                     f"{minimax_config['shared_intermediate_size']}) written as model.layers.*.shared_mlp.* and "
                     "model.layers.*.coefficient.weight; transformers' MiniMaxForCausalLM has no shared expert and "
                     "ignores those weights, so only engines that read them (the original code, vLLM) reproduce this model")
    return notes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tnl_model.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("direction", choices=["from-minimax", "to-minimax", "to-gguf"])
    parser.add_argument("src", help="source checkpoint directory")
    parser.add_argument("dst", help="destination directory (created); for to-gguf, the .gguf file")
    parser.add_argument("--outtype", choices=["f32", "f16", "bf16", "q8_0"], default=None,
                        help="to-gguf: weight type (default f16; norms and the router stay f32)")
    parser.add_argument("--tokenizer", default=None,
                        help="to-gguf: directory with the tokenizer.json (default: the model directory)")
    args = parser.parse_args(argv)
    if args.direction != "to-gguf" and (args.outtype is not None or args.tokenizer is not None):
        parser.error("--outtype and --tokenizer only apply to to-gguf")
    try:
        if args.direction == "from-minimax":
            config = from_minimax(args.src, args.dst)
            print(f"wrote TNL checkpoint to {args.dst} ({config.num_hidden_layers} layers, "
                  f"{config.layer_types.count('full_attention')} softmax)")
        elif args.direction == "to-minimax":
            minimax_config = to_minimax(args.src, args.dst)
            for note in export_notes(minimax_config):
                print(f"note: {note}")
            print(f"wrote MiniMax checkpoint to {args.dst}")
        else:
            from .gguf_export import export_gguf

            outtype = args.outtype or "f16"
            for note in export_gguf(args.src, args.dst, outtype=outtype, tokenizer_dir=args.tokenizer):
                print(f"note: {note}")
            print(f"wrote GGUF ({outtype}, llama.cpp architecture minimax-01) to {args.dst}")
    except (CheckpointError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0

if __name__ == "__main__":
    sys.exit(main())
