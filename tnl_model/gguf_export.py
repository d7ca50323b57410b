"""Export a TNL checkpoint to GGUF for llama.cpp's ``minimax-01`` architecture (DESIGN.md 6).

    python -m tnl_model.convert to-gguf MODEL_DIR OUT.gguf [--outtype f32|f16|bf16|q8_0]

llama.cpp (``src/models/minimax-01.cpp``) computes exactly one member of the TNL family, and a
model outside it is refused with the field and what llama.cpp needs (:func:`llama_cpp_problems`):

- lightning layers in the MiniMax form: SiLU on q, k and v, one weighted RMSNorm over all heads,
  a sigmoid output gate; slopes ``2^{-8(h+1)/H}`` (so H a power of two) scaled by
  ``1 - l/(L-1) + 1e-5``; one ``rms_norm_eps`` for every norm, the lightning output norm included;
- softmax layers with GQA and NeoX (rotate-half) RoPE on the first ``rotary_dim`` dims of each head
  (``rope.dimension_count``), plain rope only;
- post-norm decoder layers ``alpha * RMSNorm(x) + f(RMSNorm(x))``: one alpha for every sub-block
  (``residual_scale``), every beta 1;
- routed MoE in every layer: softmax router, top-k, renormalised weights, no shared expert.

The layer pattern is written as ``minimax-01.attention.recurrent_layers``, one flag per layer, so
any mix of lightning and softmax layers (at least one of each: llama.cpp's hybrid cache needs both)
loads as it is. Experts are written stacked, as TNL keeps
them (``gate_up_proj [E, 2I, D]`` gate rows first, ``down_proj [E, D, I]``; see ``minimax_format``),
so no per-expert split is needed. Tensors are converted and written one at a time: memory holds
one stacked expert tensor, not the model.

Tokenizers (from ``tokenizer.json``, the Hugging Face tokenizer that is the reference):

- sentencepiece-style Unigram (``tnl_training.tokenizer``'s default) -> llama.cpp's UGM tokenizer
  (``tokenizer.ggml.model = "t5"``), the same Viterbi search over the same scores. llama.cpp's UGM
  has no byte fallback: a character without a piece of its own is spelled in byte tokens by the
  Hugging Face tokenizer and becomes ``<unk>`` in llama.cpp. For ASCII characters (newline, tab,
  digits, ...) this export makes the byte token itself the piece for the character (its text is the
  character, its score the unknown score), so they tokenize and detokenize the same; non-ASCII
  characters without a piece remain ``<unk>`` in llama.cpp (a note says so at export).
- sentencepiece-style BPE with byte fallback -> llama.cpp's SPM tokenizer (``"llama"``), which
  merges by score: scores are ``-id``, so merge order is the merged piece's id, as in
  ``tnl_training.tokenizer``'s merges; a BPE whose merges are not exactly that set is refused.
- anything else (byte-level GPT-2 BPE, WordPiece, other normalizers) is refused.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint_io import CheckpointError, SafetensorsDirectory, require_regular_file
from .configuration_tnl import FULL, LINEAR, TNLConfig

ARCH = "minimax-01"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
#: llama.cpp's limits (LLAMA_MAX_LAYERS, LLAMA_MAX_EXPERTS in src/llama-hparams.h)
LLAMA_MAX_LAYERS = 512
LLAMA_MAX_EXPERTS = 512
#: Hugging Face Unigram (and sentencepiece, and llama.cpp's UGM): an unknown character costs min score - 10
UNIGRAM_UNK_PENALTY = 10.0
SPACE = "\u2581"

# GGML tensor types and llama.cpp file types by --outtype (gguf.GGMLQuantizationType / gguf.LlamaFileType)
_QTYPE_NAMES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}
_FTYPE_NAMES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}

# llama.cpp token types (llama_token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6
_BYTE_PIECE = re.compile(r"^<0x([0-9A-F]{2})>$")


class GGUFExportError(ValueError):
    """A model or tokenizer that llama.cpp would not compute or tokenize the same way."""


def _gguf():
    try:
        import gguf
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise GGUFExportError("GGUF export needs the `gguf` package: pip install 'tnl-model[gguf]' "
                              "(or pip install 'gguf>=0.19')") from err
    return gguf


# ---------------------------------------------------------------- what llama.cpp computes

def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def llama_cpp_problems(config: TNLConfig) -> list[str]:
    """Every way llama.cpp's ``minimax-01`` graph would compute ``config``'s model differently (empty: none)."""
    problems = []
    linear_layers = [i for i, kind in enumerate(config.layer_types) if kind == LINEAR]
    full_layers = [i for i, kind in enumerate(config.layer_types) if kind == FULL]
    dense = [i for i, kind in enumerate(config.mlp_layer_types) if kind != "sparse"]
    if dense:
        problems.append(f"mlp_layer_types has dense FFN layers {dense}: llama.cpp's minimax-01 runs a routed MoE "
                        "block in every layer")
    if config.shared_intermediate_size:
        problems.append(f"shared_intermediate_size={config.shared_intermediate_size}: llama.cpp's minimax-01 has "
                        "no shared expert (it needs 0)")
    if linear_layers and not _is_power_of_two(config.num_attention_heads):
        problems.append(f"num_attention_heads={config.num_attention_heads} is not a power of two: llama.cpp computes "
                        "the lightning slopes as 2^(-8(h+1)/H) for every H, without the ALiBi fallback TNL uses")
    if not linear_layers or not full_layers:
        missing = "lightning ('linear_attention')" if not linear_layers else "softmax ('full_attention')"
        problems.append(f"layer_types has no {missing} layer: llama.cpp's minimax-01 keeps a hybrid cache that needs "
                        "at least one layer of each kind (it aborts on a model without)")
    if config.linear_attn_norm != "rmsnorm":
        problems.append(f"linear_attn_norm={config.linear_attn_norm!r}: llama.cpp normalises the lightning output "
                        "with a weighted RMSNorm ('rmsnorm')")
    if config.linear_attn_gate != "sigmoid":
        problems.append(f"linear_attn_gate={config.linear_attn_gate!r}: llama.cpp gates the lightning output with "
                        "sigmoid(x W_gate) ('sigmoid')")
    if config.linear_attn_activation_on != "qkv":
        problems.append(f"linear_attn_activation_on={config.linear_attn_activation_on!r}: llama.cpp applies SiLU to "
                        "q, k and v ('qkv')")
    if linear_layers and config.linear_attn_norm_eps != config.rms_norm_eps:
        problems.append(f"linear_attn_norm_eps={config.linear_attn_norm_eps} differs from rms_norm_eps="
                        f"{config.rms_norm_eps}: llama.cpp has one RMSNorm epsilon for every norm, the lightning "
                        "output norm included")
    if not config.postnorm:
        problems.append("postnorm=False: llama.cpp's minimax-01 decoder layer is post-norm "
                        "(alpha * RMSNorm(x) + f(RMSNorm(x)))")
    alphas = {}
    if linear_layers:
        alphas["linear_attn_alpha_factor"] = config.linear_attn_alpha_factor
    if full_layers:
        alphas["full_attn_alpha_factor"] = config.full_attn_alpha_factor
    alphas["mlp_alpha_factor"] = config.mlp_alpha_factor
    if len({float(v) for v in alphas.values()}) > 1:
        listed = ", ".join(f"{k}={v}" for k, v in alphas.items())
        problems.append(f"{listed}: llama.cpp has one residual scale (residual_scale) for every sub-block, so these "
                        "must be equal")
    betas = {}
    if linear_layers:
        betas["linear_attn_beta_factor"] = config.linear_attn_beta_factor
    if full_layers:
        betas["full_attn_beta_factor"] = config.full_attn_beta_factor
    betas["mlp_beta_factor"] = config.mlp_beta_factor
    for name, value in betas.items():
        if float(value) != 1.0:
            problems.append(f"{name}={value}: llama.cpp adds each sub-block's output unscaled (every beta must be 1)")
    rope_type = config.rope_parameters.get("rope_type", "default")
    if full_layers and rope_type != "default":
        problems.append(f"rope_parameters.rope_type={rope_type!r}: this export writes plain RoPE only ('default')")
    if full_layers and config.rotary_dim == 0:
        problems.append("rotary_dim=0: llama.cpp's minimax-01 applies RoPE to at least one pair of dims "
                        "(rope.dimension_count > 0)")
    if config.hidden_act != "silu":
        problems.append(f"hidden_act={config.hidden_act!r}: llama.cpp's experts use SiLU")
    if config.num_hidden_layers > LLAMA_MAX_LAYERS:
        problems.append(f"num_hidden_layers={config.num_hidden_layers}: llama.cpp allows at most {LLAMA_MAX_LAYERS}")
    if config.num_local_experts > LLAMA_MAX_EXPERTS:
        problems.append(f"num_local_experts={config.num_local_experts}: llama.cpp allows at most {LLAMA_MAX_EXPERTS}")
    return problems


def check_llama_cpp_compatible(config: TNLConfig) -> None:
    """Raise :class:`GGUFExportError` listing every field llama.cpp would compute differently."""
    problems = llama_cpp_problems(config)
    if problems:
        raise GGUFExportError("llama.cpp's minimax-01 architecture would compute a different model, so no GGUF is "
                              "written:\n  - " + "\n  - ".join(problems))


# ---------------------------------------------------------------- tensors

@dataclass
class _Planned:
    name: str                      # GGUF tensor name
    shape: tuple[int, ...]         # numpy order (outermost first), as TNL stores it
    qtype: str                     # "f32", "f16", "bf16", "q8_0"
    source: str                    # TNL tensor name
    rows: slice | None = None      # a slice of dim 1 of the source (gate / up halves of gate_up_proj)


def tensor_plan(config: TNLConfig, outtype: str) -> list[_Planned]:
    """Every GGUF tensor in write order: its name, shape (numpy order), type and TNL source tensor
    (``rows``: the slice of dim 1 of the source it holds, for the gate and up halves of ``gate_up_proj``)."""
    d, inner = config.hidden_size, config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    e, inter = config.num_local_experts, config.intermediate_size

    def weight_type(shape):
        if outtype == "q8_0" and shape[-1] % 32:
            return "f16"  # Q8_0 blocks are 32 values of a row; llama.cpp's converter falls back to F16 too
        return outtype

    def matrix(name, shape, source, rows=None):
        return _Planned(name, shape, weight_type(shape), source, rows)

    plan = [matrix("token_embd.weight", (config.vocab_size, d), "model.embed_tokens.weight")]
    for i, kind in enumerate(config.layer_types):
        src, dst = f"model.layers.{i}", f"blk.{i}"
        plan.append(_Planned(f"{dst}.attn_norm.weight", (d,), "f32", f"{src}.input_layernorm.weight"))
        if kind == LINEAR:
            plan += [
                matrix(f"{dst}.attn_qkv.weight", (3 * inner, d), f"{src}.self_attn.qkv_proj.weight"),
                matrix(f"{dst}.attn_gate.weight", (inner, d), f"{src}.self_attn.output_gate.weight"),
                _Planned(f"{dst}.attn_norm_2.weight", (inner,), "f32", f"{src}.self_attn.norm.weight"),
                matrix(f"{dst}.attn_output.weight", (d, inner), f"{src}.self_attn.out_proj.weight"),
            ]
        else:
            plan += [
                matrix(f"{dst}.attn_q.weight", (inner, d), f"{src}.self_attn.q_proj.weight"),
                matrix(f"{dst}.attn_k.weight", (kv, d), f"{src}.self_attn.k_proj.weight"),
                matrix(f"{dst}.attn_v.weight", (kv, d), f"{src}.self_attn.v_proj.weight"),
                matrix(f"{dst}.attn_output.weight", (d, inner), f"{src}.self_attn.o_proj.weight"),
            ]
        plan += [
            _Planned(f"{dst}.ffn_norm.weight", (d,), "f32", f"{src}.post_attention_layernorm.weight"),
            # the router stays fp32, as TNL computes it and as llama.cpp's own converter writes it
            _Planned(f"{dst}.ffn_gate_inp.weight", (e, d), "f32", f"{src}.mlp.gate.weight"),
            matrix(f"{dst}.ffn_gate_exps.weight", (e, inter, d), f"{src}.mlp.experts.gate_up_proj", slice(0, inter)),
            matrix(f"{dst}.ffn_up_exps.weight", (e, inter, d), f"{src}.mlp.experts.gate_up_proj",
                   slice(inter, 2 * inter)),
            matrix(f"{dst}.ffn_down_exps.weight", (e, d, inter), f"{src}.mlp.experts.down_proj"),
        ]
    plan.append(_Planned("output_norm.weight", (d,), "f32", "model.norm.weight"))
    if not config.tie_word_embeddings:
        plan.append(matrix("output.weight", (config.vocab_size, d), "lm_head.weight"))
    return plan


def _nbytes(shape: tuple[int, ...], qtype: str) -> int:
    n = math.prod(shape)
    return {"f32": 4 * n, "f16": 2 * n, "bf16": 2 * n, "q8_0": n // 32 * 34}[qtype]


def _encode(array: np.ndarray, qtype: str) -> np.ndarray:
    gguf = _gguf()
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32),
                                getattr(gguf.GGMLQuantizationType, _QTYPE_NAMES[qtype]))


def _tensor_data(source: SafetensorsDirectory, plan: list[_Planned]):
    """Yield each planned tensor's data, encoded, in plan order (reading each source tensor once)."""
    cached_name, cached = None, None
    for item in plan:
        if item.source != cached_name:
            cached_name, cached = item.source, source.get(item.source).to(torch.float32)
        data = cached if item.rows is None else cached[:, item.rows]
        if tuple(data.shape) != item.shape:
            raise CheckpointError(f"tensor {item.source} has shape {tuple(data.shape)}, expected {item.shape}")
        yield item, _encode(data.contiguous().numpy(), item.qtype)


# ---------------------------------------------------------------- tokenizer

@dataclass
class GGUFVocab:
    """What llama.cpp's tokenizer needs, taken from a Hugging Face ``tokenizer.json``."""

    model: str                     # "t5" (UGM) or "llama" (SPM)
    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos: int | None
    eos: int | None
    unk: int | None
    pad: int | None
    add_bos: bool
    add_eos: bool
    notes: list[str] = field(default_factory=list)


def _refuse_tokenizer(path: Path, why: str) -> GGUFExportError:
    return GGUFExportError(f"{path}: {why}; llama.cpp would tokenize text differently from this tokenizer, so no "
                           "GGUF is written (supported: the sentencepiece-style Unigram or BPE-with-byte-fallback "
                           "tokenizers that tnl_training.tokenizer writes)")


def _sentencepiece_style(tok: dict) -> bool:
    """The normalizer and pre-tokenizer of a sentencepiece model with add_dummy_prefix, no other normalisation,
    and split_by_whitespace: prepend "▁", spaces -> "▁", split before each "▁" (tnl_training.tokenizer's form)."""
    normalizer, pre = tok.get("normalizer"), tok.get("pre_tokenizer")
    if not normalizer or normalizer.get("type") != "Sequence" or len(normalizer.get("normalizers", [])) != 2:
        return False
    prepend, replace = normalizer["normalizers"]
    if prepend != {"type": "Prepend", "prepend": SPACE}:
        return False
    if replace.get("type") != "Replace" or replace.get("pattern") != {"String": " "} or replace.get("content") != SPACE:
        return False
    return (bool(pre) and pre.get("type") == "Metaspace" and pre.get("replacement") == SPACE
            and pre.get("prepend_scheme") == "never" and pre.get("split") is True)


def _special_flags(tok: dict, path: Path, ids: dict[str, int]) -> tuple[bool, bool]:
    """(add_bos, add_eos) from the post-processor: nothing, or a template [BOS] $A [EOS]."""
    post = tok.get("post_processor")
    if post is None:
        return False, False
    if post.get("type") != "TemplateProcessing":
        raise _refuse_tokenizer(path, f"post_processor {post.get('type')!r} (only TemplateProcessing is written)")
    single = post.get("single", [])
    kinds = ["A" if "Sequence" in part else part.get("SpecialToken", {}).get("id") for part in single]
    if kinds.count("A") != 1:
        raise _refuse_tokenizer(path, f"post_processor template {kinds}")
    at = kinds.index("A")
    before, after = kinds[:at], kinds[at + 1:]
    specials = post.get("special_tokens", {})

    def single_id(name):
        entry = specials.get(name, {})
        return entry.get("ids", [None])[0] if len(entry.get("ids", [])) == 1 else None

    if len(before) > 1 or len(after) > 1:
        raise _refuse_tokenizer(path, f"post_processor template {kinds} (llama.cpp adds at most BOS before, EOS after)")
    if before and single_id(before[0]) != ids.get("bos"):
        raise _refuse_tokenizer(path, f"post_processor adds {before[0]!r} before the text, which is not the BOS token")
    if after and single_id(after[0]) != ids.get("eos"):
        raise _refuse_tokenizer(path, f"post_processor adds {after[0]!r} after the text, which is not the EOS token")
    return bool(before), bool(after)


def _special_ids(path: Path, tok: dict, token_config: dict, piece_id: dict[str, int]) -> dict[str, int]:
    ids = {}
    for name in ("bos", "eos", "unk", "pad"):
        value = token_config.get(f"{name}_token")
        if isinstance(value, dict):
            value = value.get("content")
        if value is None:
            continue
        if value not in piece_id:
            raise _refuse_tokenizer(path, f"{name}_token {value!r} is not in the vocabulary")
        ids[name] = piece_id[value]
    return ids


def vocab_from_tokenizer(directory: str | Path, vocab_size: int) -> GGUFVocab:
    """The GGUF tokenizer of the Hugging Face tokenizer in ``directory``, padded to ``vocab_size`` entries."""
    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.exists():
        raise GGUFExportError(f"{directory} has no tokenizer.json: llama.cpp needs the tokenizer inside the GGUF "
                              "(pass --tokenizer DIR for a tokenizer kept elsewhere)")
    require_regular_file(path, "tokenizer.json")
    tok = json.loads(path.read_text(encoding="utf-8"))
    config_path = directory / "tokenizer_config.json"
    token_config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    model = tok.get("model", {})
    kind = model.get("type")
    if kind not in ("Unigram", "BPE"):
        raise _refuse_tokenizer(path, f"model type {kind!r}")
    if not _sentencepiece_style(tok):
        raise _refuse_tokenizer(path, "normalizer/pre_tokenizer are not the sentencepiece form (Prepend '▁', "
                                      "Replace ' ' -> '▁', Metaspace split with prepend_scheme 'never')")

    if kind == "Unigram":
        pieces = [p for p, _ in model["vocab"]]
        scores = [float(s) for _, s in model["vocab"]]
    else:
        vocab = model["vocab"]
        pieces = [None] * len(vocab)
        for piece, i in vocab.items():
            if not 0 <= i < len(vocab) or pieces[i] is not None:
                raise _refuse_tokenizer(path, "BPE vocabulary ids are not 0..n-1")
            pieces[i] = piece
        scores = [-float(i) for i in range(len(pieces))]  # llama.cpp's SPM merges the highest score first
    piece_id = {p: i for i, p in enumerate(pieces)}
    if len(piece_id) != len(pieces):
        raise _refuse_tokenizer(path, "the vocabulary has duplicate pieces")

    added = tok.get("added_tokens", [])
    for entry in added:
        if not entry.get("special", False):
            raise _refuse_tokenizer(path, f"added token {entry.get('content')!r} is not special (llama.cpp would "
                                          "split it out of text differently)")
        if piece_id.get(entry["content"]) != entry["id"]:
            raise _refuse_tokenizer(path, f"added token {entry['content']!r} (id {entry['id']}) is not the vocabulary "
                                          "piece with that id")
        if entry.get("lstrip") or entry.get("rstrip") or entry.get("single_word") or entry.get("normalized"):
            raise _refuse_tokenizer(path, f"added token {entry['content']!r} has lstrip/rstrip/single_word/normalized "
                                          "set")
    ids = _special_ids(path, tok, token_config, piece_id)
    if kind == "Unigram" and model.get("unk_id") is not None:
        ids.setdefault("unk", model["unk_id"])
    add_bos, add_eos = _special_flags(tok, path, ids)
    byte_fallback = bool(model.get("byte_fallback"))

    types = [TOKEN_NORMAL] * len(pieces)
    if byte_fallback:
        for i, piece in enumerate(pieces):
            if _BYTE_PIECE.match(piece):
                types[i] = TOKEN_BYTE
        found = {int(_BYTE_PIECE.match(p).group(1), 16) for p, t in zip(pieces, types) if t == TOKEN_BYTE}
        if found != set(range(256)):
            raise _refuse_tokenizer(path, f"byte_fallback without all 256 byte pieces <0x00>..<0xFF> "
                                          f"({256 - len(found)} missing)")
    for entry in added:
        types[entry["id"]] = TOKEN_CONTROL
    if ids.get("unk") is not None:
        types[ids["unk"]] = TOKEN_UNKNOWN

    notes = []
    tokens = list(pieces)
    if kind == "Unigram":
        gguf_model = "t5"
        # llama.cpp's UGM has no byte fallback: an ASCII character without a piece of its own would become <unk>,
        # where the Hugging Face tokenizer writes its one byte token. Make that byte token the character's piece
        # (text = the character, score = the unknown score the Hugging Face Viterbi gives it): same ids both ways,
        # and llama.cpp's detokenizer prints the character.
        unk_score = min(scores) - UNIGRAM_UNK_PENALTY
        if byte_fallback:
            for b in range(1, 128):
                char = chr(b)
                if char == " " or char in piece_id:
                    continue
                i = piece_id[f"<0x{b:02X}>"]
                tokens[i], scores[i], types[i] = char, unk_score, TOKEN_NORMAL
            notes.append("llama.cpp's Unigram (UGM) tokenizer has no byte fallback: a non-ASCII character that has no "
                         "piece of its own becomes <unk> in llama.cpp, where the Hugging Face tokenizer spells it in "
                         "byte tokens (ASCII characters are written so that both agree)")
    else:
        gguf_model = "llama"
        if not byte_fallback:
            raise _refuse_tokenizer(path, "a BPE without byte_fallback (llama.cpp's SPM tokenizer always falls back "
                                          "to byte tokens)")
        if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise _refuse_tokenizer(path, "BPE dropout, continuing_subword_prefix or end_of_word_suffix")
        if model.get("ignore_merges"):
            raise _refuse_tokenizer(path, "BPE ignore_merges")
        _check_spm_merges(path, model, pieces, piece_id, types)
    if len(tokens) > vocab_size:
        raise GGUFExportError(f"{path} has {len(tokens)} tokens but the model's vocab_size is {vocab_size}: "
                              "tokens beyond the embedding cannot be written")
    for i in range(len(tokens), vocab_size):
        # embedding rows with no token; the space makes the text unmatchable (llama.cpp escapes spaces to ▁ first)
        tokens.append(f"<unused {i}>")
        scores.append(0.0)
        types.append(TOKEN_UNUSED)
    return GGUFVocab(gguf_model, tokens, scores, types, ids.get("bos"), ids.get("eos"), ids.get("unk"),
                     ids.get("pad"), add_bos, add_eos, notes)


def _check_spm_merges(path: Path, model: dict, pieces: list[str], piece_id: dict[str, int], types: list[int]) -> None:
    """llama.cpp's SPM tokenizer merges any two adjacent symbols whose concatenation is a token, best score (lowest
    id) first: the same as the Hugging Face BPE only when its merges are exactly every split of a piece into two
    pieces, ranked by the merged piece's id."""
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    ranks = [piece_id.get(a + b) for a, b in merges]
    if None in ranks:
        raise _refuse_tokenizer(path, "a BPE merge whose result is not in the vocabulary")
    if any(x > y for x, y in zip(ranks, ranks[1:])):
        raise _refuse_tokenizer(path, "BPE merges not ranked by the merged piece's id (llama.cpp's SPM tokenizer "
                                      "merges by score)")
    expected = set()
    for piece, t in zip(pieces, types):
        if t != TOKEN_NORMAL:
            continue
        for i in range(1, len(piece)):
            if piece[:i] in piece_id and piece[i:] in piece_id:
                expected.add((piece[:i], piece[i:]))
    if set(merges) != expected:
        raise _refuse_tokenizer(path, "BPE merges are not every split of a piece into two pieces (llama.cpp's SPM "
                                      "tokenizer merges any such pair)")


# ---------------------------------------------------------------- writing

def _special_ids_agree(config: TNLConfig, vocab: GGUFVocab) -> None:
    for name in ("bos", "eos"):
        ours = getattr(config, f"{name}_token_id")
        ours = ours[0] if isinstance(ours, list) and ours else ours
        theirs = getattr(vocab, name)
        if ours is not None and theirs is not None and ours != theirs:
            raise GGUFExportError(f"{name}_token_id is {ours} in config.json but the tokenizer's {name} token has id "
                                  f"{theirs}: llama.cpp would start or stop generation differently")


def export_gguf(model_dir: str | Path, out_path: str | Path, outtype: str = "f16",
                tokenizer_dir: str | Path | None = None) -> list[str]:
    """Write ``model_dir`` (a TNL checkpoint) as a GGUF file for llama.cpp; returns notes for the user.

    Raises :class:`GGUFExportError` (a ``ValueError``) naming every field llama.cpp would compute differently,
    and :class:`~tnl_model.checkpoint_io.CheckpointError` for unreadable or mismatched checkpoints.
    """
    from .load_checks import verify_checkpoint

    if outtype not in OUTTYPES:
        raise GGUFExportError(f"outtype must be one of {OUTTYPES}, got {outtype!r}")
    model_dir, out_path = Path(model_dir), Path(out_path)
    config = TNLConfig.from_pretrained(model_dir)
    check_llama_cpp_compatible(config)
    vocab = vocab_from_tokenizer(tokenizer_dir or model_dir, config.vocab_size)
    _special_ids_agree(config, vocab)
    verify_checkpoint(model_dir, config).raise_for_problems()
    gguf = _gguf()
    plan = tensor_plan(config, outtype)
    source = SafetensorsDirectory(model_dir)
    missing = sorted({p.source for p in plan if p.source not in source})
    if missing:
        raise CheckpointError(f"{model_dir} lacks tensors {missing}")

    writer = gguf.GGUFWriter(None, ARCH)
    writer.add_type("model")
    writer.add_name(model_dir.resolve().name)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, _FTYPE_NAMES[outtype])))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_expert_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.rotary_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_expert_count(config.num_local_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_residual_scale(float(config.mlp_alpha_factor))
    # one flag per layer (true: lightning), read by llama.cpp instead of its every-8th-layer default
    writer.add_array(f"{ARCH}.attention.recurrent_layers", [kind == LINEAR for kind in config.layer_types])

    writer.add_tokenizer_model(vocab.model)
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if getattr(vocab, name) is not None:
            add(getattr(vocab, name))
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_add_space_prefix(True)
    writer.add_remove_extra_whitespaces(False)

    for item in plan:
        raw = getattr(gguf.GGMLQuantizationType, _QTYPE_NAMES[item.qtype])
        writer.add_tensor_info(item.name, item.shape, np.dtype(np.float32), _nbytes(item.shape, item.qtype), raw)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, data in _tensor_data(source, plan):
            writer.write_tensor_data(data)
        writer.close()
        tmp.replace(out_path)
    finally:
        writer.close()
        if tmp.exists():
            tmp.unlink()
    fallback = [p.name for p in plan if outtype == "q8_0" and p.qtype == "f16"]
    notes = list(vocab.notes)
    if fallback:
        notes.append(f"{len(fallback)} tensors with rows not a multiple of 32 written as f16 instead of q8_0: "
                     + ", ".join(fallback[:6]) + (" ..." if len(fallback) > 6 else ""))
    return notes


__all__ = ["export_gguf", "tensor_plan", "check_llama_cpp_compatible", "llama_cpp_problems", "vocab_from_tokenizer",
           "GGUFExportError", "GGUFVocab", "OUTTYPES"]
