"""Train a sentencepiece tokenizer and save it as a Hugging Face fast tokenizer.

    python -m tnl_training.tokenizer --out data/tokenizer --vocab-size 4096 \\
        [--model-config configs/model/small.json] FILE [FILE ...]

The sentencepiece model is trained with identity normalisation and byte fallback (no
unknown characters, exact round trips; the rarest characters beyond ``character_coverage``
get no piece of their own and are spelled in bytes), then converted without protobuf into a
``tokenizers`` Unigram/BPE pipeline (Metaspace pre-tokenizer, byte-fallback decoder)
and saved with ``tokenizer_config.json``, so ``AutoTokenizer.from_pretrained(out)``
returns a fast tokenizer. Special ids are fixed at pad=0, bos=1, eos=2, unk=3 by
default, or read from a model config (``--model-config``) so BOS/EOS/PAD always match
the model. The original ``tokenizer.model`` is kept next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

SPECIAL_DEFAULTS = {"pad": 0, "bos": 1, "eos": 2, "unk": 3}
SPECIAL_TEXT = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}
#: with byte fallback, characters outside this share of the text need no piece (they become bytes)
DEFAULT_CHARACTER_COVERAGE = 0.9995
MIN_CHARACTER_COVERAGE = 0.98


class TokenizerError(ValueError):
    pass


def special_ids_from_model_config(model_config: str | os.PathLike) -> dict[str, int]:
    """pad/bos/eos/unk ids taken from a model config.json (pad defaults to 0, unk to the first free id)."""
    with open(model_config, encoding="utf-8") as f:
        cfg = json.load(f)
    ids = {}
    for name in ("pad", "bos", "eos"):
        value = cfg.get(f"{name}_token_id", SPECIAL_DEFAULTS[name])
        if isinstance(value, list):
            value = value[0]
        ids[name] = SPECIAL_DEFAULTS[name] if value is None else int(value)
    if len(set(ids.values())) != 3:
        raise TokenizerError(f"{model_config}: pad/bos/eos token ids must differ, got {ids}")
    ids["unk"] = next(i for i in range(4) if i not in ids.values())
    return ids


#: longest sentence handed to sentencepiece, in characters (at most 4 bytes each, so within its
#: ``max_sentence_length`` of 16384 bytes; it skips longer ones): longer lines are cut at spaces
MAX_SENTENCE_CHARS = 4096


def _iter_lines(files: list[str], errors: str = "strict"):
    """The non-blank lines of ``files``, streamed (no file is held in memory): a line longer than
    :data:`MAX_SENTENCE_CHARS` (a file without newlines) comes in pieces instead of being skipped."""
    from tnl_training.data import iter_lines

    for path in files:
        yield from iter_lines(path, errors, MAX_SENTENCE_CHARS, error_class=TokenizerError)


def train_sentencepiece(files: list[str], model_prefix: str, vocab_size: int, special_ids: dict[str, int],
                        model_type: str = "unigram", input_sentence_size: int = 2_000_000, seed: int = 0,
                        character_coverage: float = DEFAULT_CHARACTER_COVERAGE, errors: str = "strict") -> str:
    """Train a sentencepiece model on ``files``; returns the path of the ``.model`` file. ``errors``:
    undecodable bytes stop training with the file and byte offset ("strict") or become U+FFFD ("replace")."""
    import sentencepiece as spm

    if not MIN_CHARACTER_COVERAGE <= character_coverage <= 1:
        raise TokenizerError(f"character_coverage must be in [{MIN_CHARACTER_COVERAGE}, 1] (sentencepiece's range), "
                             f"got {character_coverage}")
    if not files:
        raise TokenizerError("no text files to train the tokenizer on")
    total = sum(os.path.getsize(f) for f in files)
    if total == 0:
        raise TokenizerError(f"the tokenizer training files are empty: {files}")
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_iter_lines(files, errors),
            model_prefix=model_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            split_digits=True,
            max_sentence_length=1 << 14,
            input_sentence_size=input_sentence_size,
            hard_vocab_limit=False,  # a small corpus gives a smaller vocabulary instead of an error
            shuffle_input_sentence=True,
            pad_id=special_ids["pad"], bos_id=special_ids["bos"], eos_id=special_ids["eos"],
            unk_id=special_ids["unk"],
            pad_piece=SPECIAL_TEXT["pad"], bos_piece=SPECIAL_TEXT["bos"], eos_piece=SPECIAL_TEXT["eos"],
            unk_piece=SPECIAL_TEXT["unk"],
            num_threads=max(1, min(8, os.cpu_count() or 1)),
            minloglevel=2,
        )
    except RuntimeError as err:
        # sentencepiece's own message says what is wrong (e.g. more required characters than the vocab holds)
        raise TokenizerError(f"sentencepiece could not train a {model_type} tokenizer with vocab_size={vocab_size} and "
                             f"character_coverage={character_coverage} on {total:,} bytes of text: {err}") from None
    return model_prefix + ".model"


def _bpe_merges(vocab: dict[str, int], pieces: list[str]) -> list[tuple[str, str]]:
    """Merges for a sentencepiece BPE vocab: every split of a piece into two pieces in the vocab,
    ordered by the id of the result (sentencepiece's merge priority), then by the parts' ids."""
    merges = []
    for piece in pieces:
        pid = vocab[piece]
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                merges.append((pid, vocab[left], vocab[right], left, right))
    merges.sort()
    return [(m[3], m[4]) for m in merges]


def to_fast_tokenizer(model_file: str, special_ids: dict[str, int]):
    """Convert a trained sentencepiece model into a ``PreTrainedTokenizerFast`` (no protobuf needed)."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_file=model_file)
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    scores = [sp.get_score(i) for i in range(n)]
    unk_id = special_ids["unk"]
    if sp.unk_id() != unk_id:
        raise TokenizerError(f"{model_file}: unk id {sp.unk_id()} != expected {unk_id}")
    if _model_type(model_file) == "bpe":
        vocab = {p: i for i, p in enumerate(pieces)}
        model = models.BPE(vocab=vocab, merges=_bpe_merges(vocab, pieces), unk_token=SPECIAL_TEXT["unk"],
                           fuse_unk=True, byte_fallback=True)
    else:
        model = models.Unigram([(p, s) for p, s in zip(pieces, scores)], unk_id=unk_id, byte_fallback=True)
    tok = Tokenizer(model)
    # sentencepiece: spaces become "▁", one "▁" is always prepended (add_dummy_prefix), and pieces
    # never cross a "▁" boundary except at their start (split_by_whitespace).
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ])
    bos = SPECIAL_TEXT["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, special_ids["bos"])])
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(SPECIAL_TEXT[k], special=True, normalized=False)
                            for k in ("pad", "bos", "eos", "unk")])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TEXT["bos"], eos_token=SPECIAL_TEXT["eos"], pad_token=SPECIAL_TEXT["pad"],
        unk_token=SPECIAL_TEXT["unk"], model_max_length=1 << 30, padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    for name, want in special_ids.items():
        got = getattr(fast, f"{name}_token_id")
        if got != want:
            raise TokenizerError(f"converted tokenizer has {name}_token_id={got}, expected {want}")
    return fast


def _model_type(model_file: str) -> str:
    """The sentencepiece model type, read from the serialized proto without protobuf:
    ``TrainerSpec.model_type`` is varint field 3 of ``ModelProto.trainer_spec`` (field 2)."""
    data = Path(model_file).read_bytes()
    spec = _proto_field(data, 2)
    if spec is not None:
        mt = _proto_varint_field(spec, 3)
        if mt is not None:
            return {1: "unigram", 2: "bpe", 3: "word", 4: "char"}.get(mt, "unigram")
    return "unigram"


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes):
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            return
        yield num, wire, value


def _proto_field(buf: bytes, number: int):
    for num, wire, value in _proto_fields(buf):
        if num == number and wire == 2:
            return value
    return None


def _proto_varint_field(buf: bytes, number: int):
    for num, wire, value in _proto_fields(buf):
        if num == number and wire == 0:
            return value
    return None


def train_tokenizer(files: list[str], out_dir: str | os.PathLike, vocab_size: int,
                    special_ids: dict[str, int] | None = None, model_type: str = "unigram", seed: int = 0,
                    character_coverage: float = DEFAULT_CHARACTER_COVERAGE, errors: str = "strict"):
    """Train on ``files`` and save an AutoTokenizer-loadable directory atomically; returns the tokenizer.
    ``character_coverage``: the share of the text's characters that get a piece; the rest are spelled in bytes.
    ``errors``: see :func:`train_sentencepiece`."""
    special_ids = dict(special_ids or SPECIAL_DEFAULTS)
    if vocab_size < 256 + len(special_ids) + 8:
        raise TokenizerError(f"vocab_size {vocab_size} is too small: byte fallback needs 256 byte pieces "
                             f"plus the {len(special_ids)} special tokens")
    files = [str(f) for f in files]
    for f in files:
        if not os.path.isfile(f):
            raise TokenizerError(f"tokenizer training file {f!r} does not exist")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model_file = train_sentencepiece(files, str(tmp / "tokenizer"), vocab_size, special_ids, model_type, seed=seed,
                                         character_coverage=character_coverage, errors=errors)
        fast = to_fast_tokenizer(model_file, special_ids)
        fast.save_pretrained(str(tmp))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return fast


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    if not (Path(path) / "tokenizer.json").is_file():
        raise TokenizerError(f"no tokenizer at {str(path)!r} (expected tokenizer.json); train one with "
                             "`python -m tnl_training.tokenizer --out DIR FILES...`")
    return AutoTokenizer.from_pretrained(str(path))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tnl_training.tokenizer", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="text files to train on")
    parser.add_argument("--out", required=True, help="output directory (AutoTokenizer-loadable)")
    parser.add_argument("--vocab-size", type=int, default=None, help="default: the model config's vocab_size")
    parser.add_argument("--model-config", default=None, help="model config.json giving vocab size and special ids")
    parser.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--character-coverage", type=float, default=DEFAULT_CHARACTER_COVERAGE,
                        help="share of the characters that get a piece; rarer ones are spelled in bytes")
    parser.add_argument("--errors", choices=("strict", "replace"), default="strict",
                        help="undecodable (non-UTF-8) bytes: strict = stop with the file name and byte offset "
                             "(default); replace = turn them into U+FFFD")
    args = parser.parse_args(argv)
    special = SPECIAL_DEFAULTS
    vocab_size = args.vocab_size
    if args.model_config:
        special = special_ids_from_model_config(args.model_config)
        if vocab_size is None:
            with open(args.model_config, encoding="utf-8") as f:
                vocab_size = int(json.load(f)["vocab_size"])
    if vocab_size is None:
        parser.error("give --vocab-size or --model-config")
    try:
        tok = train_tokenizer(args.files, args.out, vocab_size, special, args.model_type, args.seed,
                              args.character_coverage, errors=args.errors)
    except TokenizerError as err:
        raise SystemExit(f"error: {err}") from None
    sample = "To be, or not to be, that is the question."
    ids = tok(sample)["input_ids"]
    print(f"saved tokenizer ({len(tok)} tokens, bos={tok.bos_token_id} eos={tok.eos_token_id} "
          f"pad={tok.pad_token_id}) to {args.out}; {sample!r} -> {len(ids)} tokens")


if __name__ == "__main__":
    main()
