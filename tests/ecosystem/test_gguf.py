"""GGUF export for llama.cpp (`tnl convert to-gguf`): llama.cpp itself is the oracle.

A small random TNL model in the MiniMax-Text-01 form is exported in every --outtype and run by
llama.cpp (llama-cpp-python) on CPU: its logits, prefill and token-by-token decode, and its greedy
tokens are compared with our fp32 forward and `generate`. Its tokenizer (tnl_training's
sentencepiece Unigram, and the BPE variant) tokenizes a few hundred lines as the Hugging Face
tokenizer does (f32 logits and greedy tokens must match; the other outtypes get measured
tolerances). Every model llama.cpp would compute differently is refused. The llama.cpp tests skip
only when `llama_cpp` (or `gguf`; both come with pip install 'tnl-model[gguf]', which builds
llama.cpp from source, ~6 minutes on 2 cores, and scripts/setup_env.sh installs) cannot be imported.
"""

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tnl_model.configuration_tnl import TNLConfig
from tnl_model.gguf_export import GGUFExportError, export_gguf, llama_cpp_problems, vocab_from_tokenizer
from tnl_model.testing import build_model

try:
    import llama_cpp
except ImportError:  # pragma: no cover - depends on the environment
    llama_cpp = None
try:
    import gguf
except ImportError:  # pragma: no cover - depends on the environment
    gguf = None

# the gguf extra brings both; refusals need neither
needs_llama_cpp = pytest.mark.skipif(llama_cpp is None or gguf is None, reason="llama_cpp (llama-cpp-python >= "
                                     "0.3.36) or gguf is not installed: pip install 'tnl-model[gguf]'")
needs_gguf = pytest.mark.skipif(gguf is None, reason="gguf is not installed: pip install 'tnl-model[gguf]'")

REPO = Path(__file__).resolve().parents[2]
SPECIAL_TEXT = re.compile(r"<s>|</s>|<pad>|<unk>")
SPECIAL = {"pad": 0, "bos": 1, "eos": 2, "unk": 3}
# llama.cpp against our fp32 forward of the same (rounded) weights, logits spanning about +-4: (max |diff| over
# positions, median over positions of the per-position max, argmax agreement). Measured here: f32 2.8e-6 / 1.0;
# f16 2.3e-3 / 1.0; bf16 8.8e-2 (median 1.0e-2) / 1.0; q8_0 0.56 (median 4.5e-2) / 0.945. llama.cpp rounds the
# activations to the weight type in its matmuls (q8_0: to 8 bits), which flips the top-2 choice of a few routers,
# hence the maxima.
TOLERANCE = {"f32": (2e-5, 1e-5, 1.0), "f16": (1e-2, 5e-3, 0.95), "bf16": (3e-1, 5e-2, 0.95),
             "q8_0": (1.0, 0.1, 0.9)}
PROMPT = ("ORSINO. Viola loves the sea, and the duke mocks Maria; 2024 cafés at 10:45!\n"
          "FESTE. the ring serves my lady")

EXTRA_WORDS = ("café naïve über straße 中文 字 日本語 ☃ ♥ → « » “quote” — – … 🙂 ½ € £ ¥ ± µ Ωmega αβγ "
               "Ünïcödé ñandú façade").split()


def _extra_lines(n: int, seed: int) -> list[str]:
    """Lines with digits, punctuation, repeated and leading spaces, tabs and non-ASCII text."""
    rng = random.Random(seed)
    punct = list("!?.,;:'\"()[]{}<>/\\|@#$%^&*-_+=~`")
    lines = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(3, 9)):
            kind = rng.random()
            if kind < 0.3:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 7))))
            elif kind < 0.55:
                parts.append(rng.choice(EXTRA_WORDS))
            elif kind < 0.75:
                parts.append("".join(rng.choice(punct) for _ in range(rng.randint(1, 3))))
            else:
                parts.append(rng.choice(["Viola", "the", "sea", "ORSINO.", "loves", "duke", "x=1.5", "a/b"]))
        sep = rng.choice([" ", " ", " ", "  ", "\t", " - "])
        lines.append(" " * rng.choice([0, 0, 0, 1, 2, 3]) + sep.join(parts))
    return lines


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def corpus(workdir):
    from tnl_training.testing import write_corpus

    files = write_corpus(workdir / "texts", n_docs=4)
    extra = workdir / "texts" / "extra.txt"
    extra.write_text("\n".join(_extra_lines(400, seed=0)) + "\n", encoding="utf-8")
    return files + [extra]


def _tokenizer(workdir, corpus, model_type):
    from tnl_training.tokenizer import train_tokenizer

    return train_tokenizer(corpus, workdir / f"tok-{model_type}", vocab_size=600, special_ids=SPECIAL,
                           model_type=model_type)


@pytest.fixture(scope="module")
def unigram(workdir, corpus):
    return _tokenizer(workdir, corpus, "unigram")


def minimax_config(**overrides) -> TNLConfig:
    """MiniMax-Text-01's layout in miniature: 8 layers, softmax at layer 7, all MoE, GQA, partial rotary,
    one residual alpha != 1; widths multiples of 32 so that q8_0 covers every matrix."""
    fields = dict(vocab_size=640, hidden_size=64, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, rotary_dim=8, num_local_experts=4, num_experts_per_tok=2,
                  full_attn_alpha_factor=1.3, linear_attn_alpha_factor=1.3, mlp_alpha_factor=1.3,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1,
                  max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    fields.update(overrides)
    return TNLConfig(**fields)


def _save(directory, config, tokenizer, seed=0):
    model = build_model(config, seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def minimax_model(workdir, unigram):
    directory = workdir / "model"
    return directory, _save(directory, minimax_config(), unigram)


def _llama(path, **kwargs):
    return llama_cpp.Llama(str(path), n_ctx=256, n_batch=16, n_ubatch=16, logits_all=True, n_threads=1,
                           verbose=False, **kwargs)


def _llama_logits(llm, ids: list[int], one_by_one: bool) -> np.ndarray:
    llm.reset()
    if not one_by_one:  # in ubatches of 16: the later ones start from a carried lightning state
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float64)
    rows = []
    for token in ids:
        llm.eval([token])
        rows.append(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64))
    return np.stack(rows)


def _llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def _model_from_gguf(path, config: TNLConfig):
    """A TNL model holding the (dequantized) weights of a GGUF file: exactly the model llama.cpp runs."""
    from tnl_model.gguf_export import tensor_plan
    from tnl_model.modeling_tnl import TNLForCausalLM

    reader = gguf.GGUFReader(str(path))
    stored = {t.name: t for t in reader.tensors}
    model = TNLForCausalLM(config).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for item in tensor_plan(config, "f32"):
        t = stored[item.name]
        data = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
        data = torch.from_numpy(np.array(data, dtype=np.float32))
        if item.rows is None:
            state[item.source] = data
        else:
            state[item.source][:, item.rows] = data
    model.load_state_dict(state)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


@pytest.fixture(scope="module", params=["f32", "f16", "bf16", "q8_0"])
def exported(request, minimax_model, workdir):
    """(outtype, GGUF path, the TNL model with the file's weights) for each --outtype."""
    from tnl_model.cli import main

    outtype = request.param
    directory, model = minimax_model
    out = workdir / f"model-{outtype}.gguf"
    # the README's command, through the `tnl` entry point
    assert main(["convert", "to-gguf", str(directory), str(out), "--outtype", outtype]) == 0
    return outtype, out, _model_from_gguf(out, model.config)


@needs_gguf
def test_the_file_holds_the_weights(exported, minimax_model):
    """Every weight is in the file, in its place, rounded only as the outtype rounds (no llama.cpp needed)."""
    outtype, _, from_file = exported
    original = minimax_model[1].state_dict()
    rounding = {"f32": 0.0, "f16": 2 ** -11, "bf16": 2 ** -8, "q8_0": 1 / 127}[outtype]
    for name, value in from_file.state_dict().items():
        scale = float(original[name].abs().max())  # q8_0: one scale per 32 values, max |block| / 127
        assert torch.allclose(value, original[name], rtol=rounding, atol=rounding * scale), name
        if name.endswith(("norm.weight", "mlp.gate.weight")):  # kept in f32 whatever the outtype
            assert torch.equal(value, original[name]), name


@needs_llama_cpp
def test_llama_cpp_computes_the_same_model(exported, minimax_model, unigram):
    """llama.cpp's logits (prefill in ubatches of 16 and token-by-token decode) against our fp32 forward of the
    same weights; for f32 also the greedy continuation against our generate()."""
    outtype, path, from_file = exported
    ids = unigram(PROMPT)["input_ids"]
    assert len(ids) > 40
    reference = _logits(from_file, ids)
    original = _logits(minimax_model[1], ids)
    # f32 K/V cache for the f32 file, so that only the kernels differ; llama.cpp's default (f16) otherwise
    llm = _llama(path, **({"type_k": 0, "type_v": 0} if outtype == "f32" else {}))
    for one_by_one in (False, True):
        got = _llama_logits(llm, ids, one_by_one)
        per_position = np.abs(got - reference).max(-1)
        agree = (got.argmax(-1) == reference.argmax(-1)).mean()
        print(f"{outtype} {'decode' if one_by_one else 'prefill'}: max |diff| {per_position.max():.2e} (median "
              f"{np.median(per_position):.2e}) against the file's weights, {np.abs(got - original).max():.2e} against "
              f"the fp32 model; argmax agreement {agree:.3f}, {(got.argmax(-1) == original.argmax(-1)).mean():.3f}")
        max_diff, median_diff, min_agree = TOLERANCE[outtype]
        assert per_position.max() < max_diff and np.median(per_position) < median_diff, (outtype, one_by_one)
        assert agree >= min_agree, (outtype, one_by_one, agree)
    with torch.no_grad():
        greedy = minimax_model[1].generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                           eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    theirs = _llama_greedy(llm, ids, len(greedy))
    same = next((i for i, (a, b) in enumerate(zip(theirs, greedy)) if a != b), len(greedy))
    print(f"{outtype} greedy: the first {same} of {len(greedy)} tokens agree with our generate()")
    if outtype == "f32":
        assert theirs == greedy
        # llama.cpp's default f16 K/V cache costs more than the kernels do
        default_cache = _llama_logits(_llama(path), ids, one_by_one=False)
        print(f"f32 with the default f16 K/V cache: max |diff| {np.abs(default_cache - reference).max():.2e}")
        assert np.abs(default_cache - reference).max() < 2e-3


@needs_llama_cpp
def test_any_layer_pattern_tied_embeddings_and_wide_heads(workdir, unigram):
    """llama.cpp reads the layer pattern from the file: softmax first, two softmax layers, tied embeddings,
    head_dim * heads != hidden_size, full rotary and plain MHA all compute the same."""
    config = minimax_config(num_hidden_layers=5, layer_types=["full_attention", "linear_attention", "linear_attention",
                                                              "full_attention", "linear_attention"],
                            tie_word_embeddings=True, head_dim=32, rotary_dim=32, num_key_value_heads=4,
                            full_attn_alpha_factor=0.7, linear_attn_alpha_factor=0.7, mlp_alpha_factor=0.7)
    directory = workdir / "pattern"
    model = _save(directory, config, unigram, seed=3)
    out = workdir / "pattern.gguf"
    export_gguf(directory, out, outtype="f32")
    ids = unigram(PROMPT)["input_ids"]
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].double().numpy()
    llm = _llama(out, type_k=0, type_v=0)
    for one_by_one in (False, True):
        assert np.abs(_llama_logits(llm, ids, one_by_one) - reference).max() < TOLERANCE["f32"][0]


# ---------------------------------------------------------------- tokenizer


def _tokenizer_lines(corpus) -> list[str]:
    lines = corpus[0].read_text().splitlines()[:80] + _extra_lines(250, seed=1)
    lines += [
        "", "a", "  two leading spaces", "trailing  ", "a\n\nb\tc", "line one\nline two\r\n", "tab\tand\\back",
        "12345 67 0.5e-3", "ORSINO.  Viola   loves\tthe sea.", "x" * 40, "<s> inside", "a</s>b", "<pad><unk>",
        "C'est naïve, n'est-ce pas?", "Straße № 5", "日本語と中文", "emoji 🙂🙂 and ☃", "\x7f\x01 control",
        "unseen: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 Ж ऄ",
    ]
    return lines


def _byte_id(tokenizer, b: int) -> int:
    return tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>")


def _expected_llama_ids(tokenizer, ids: list[int]) -> list[int]:
    """The HF ids with each run of non-ASCII byte tokens (a character without a piece, spelled in bytes) replaced
    by one <unk>: llama.cpp's UGM tokenizer has no byte fallback (ASCII byte tokens are exported as pieces)."""
    high = {_byte_id(tokenizer, b) for b in range(128, 256)}
    out = []
    for token in ids:
        if token in high:
            if not out or out[-1] != tokenizer.unk_token_id:
                out.append(tokenizer.unk_token_id)
        else:
            out.append(token)
    return out


def _vocab_only(workdir, model_dir, tokenizer_dir, name):
    from tnl_model.convert import main

    out = workdir / f"{name}.gguf"
    # `python -m tnl_model.convert to-gguf`, with the tokenizer from another directory when given
    tokenizer = ["--tokenizer", str(tokenizer_dir)] if tokenizer_dir else []
    assert main(["to-gguf", str(model_dir), str(out), *tokenizer]) == 0
    return llama_cpp.Llama(str(out), vocab_only=True, verbose=False)


@needs_llama_cpp
def test_unigram_tokenization_matches_the_hf_tokenizer(workdir, corpus, unigram, minimax_model):
    llm = _vocab_only(workdir, minimax_model[0], None, "unigram-vocab")
    lines = _tokenizer_lines(corpus)
    assert len(lines) >= 340
    exact = unk = 0
    for text in lines:
        ids = unigram(text)["input_ids"]
        got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        if text and not text.strip(" "):
            continue  # an all-space text: see test_known_tokenizer_differences
        expected = _expected_llama_ids(unigram, ids)
        assert got == expected, (text, ids, got)
        exact += expected == ids
        unk += expected != ids
        if expected == ids and not SPECIAL_TEXT.search(text):  # llama.cpp gives the text back, as HF decode does
            assert llm.detokenize(got).decode("utf-8") == unigram.decode(ids[1:]) == text
    print(f"unigram: {exact} lines tokenized identically, {unk} with <unk> for unpieced non-ASCII characters")
    assert exact >= 250 and unk >= 1


@needs_llama_cpp
def test_known_tokenizer_differences(workdir, unigram, minimax_model):
    """Documented, not wanted: the two places where llama.cpp's UGM tokenizer differs from the HF one."""
    llm = _vocab_only(workdir, minimax_model[0], None, "unigram-vocab-2")
    # a non-ASCII character with no piece: bytes in HF, <unk> in llama.cpp
    text = "𝔘"
    assert unigram(text)["input_ids"][2:] == [_byte_id(unigram, b) for b in text.encode()]
    assert llm.tokenize(text.encode(), add_bos=True, special=True)[-1] == unigram.unk_token_id
    # a text of spaces only: HF prepends one more "▁" than llama.cpp, which adds it before the first non-space
    assert len(unigram("   ")["input_ids"]) == len(llm.tokenize(b"   ", add_bos=True, special=True)) + 1


@needs_llama_cpp
def test_bpe_tokenization_matches_the_hf_tokenizer(workdir, corpus, minimax_model):
    bpe = _tokenizer(workdir, corpus, "bpe")
    llm = _vocab_only(workdir, minimax_model[0], workdir / "tok-bpe", "bpe-vocab")
    lines = _tokenizer_lines(corpus)
    for text in lines:
        ids = bpe(text)["input_ids"]
        got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        assert got == ids, (text, ids, got)
        if not SPECIAL_TEXT.search(text):
            assert llm.detokenize(got).decode("utf-8") == bpe.decode(ids[1:]) == text


# ---------------------------------------------------------------- refusals

REFUSED = {
    "dense": (dict(mlp_layer_types=["sparse"] * 7 + ["dense"]), "mlp_layer_types"),
    "shared_expert": (dict(shared_intermediate_size=32), "shared_intermediate_size"),
    "heads": (dict(num_attention_heads=6, num_key_value_heads=2), "num_attention_heads=6 is not a power of two"),
    "all_lightning": (dict(layer_types=["linear_attention"] * 8), "layer_types has no softmax"),
    "all_softmax": (dict(layer_types=["full_attention"] * 8), "layer_types has no lightning"),
    "one_layer": (dict(num_hidden_layers=1, layer_types=["linear_attention"]), "layer_types has no softmax"),
    "srmsnorm": (dict(linear_attn_norm="srmsnorm"), "linear_attn_norm='srmsnorm'"),
    "identity_gate": (dict(linear_attn_gate="identity"), "linear_attn_gate='identity'"),
    "qk_activation": (dict(linear_attn_activation_on="qk"), "linear_attn_activation_on='qk'"),
    "norm_eps": (dict(linear_attn_norm_eps=1e-5), "linear_attn_norm_eps=1e-05 differs from rms_norm_eps"),
    "prenorm": (dict(postnorm=False), "postnorm=False"),
    "alphas": (dict(mlp_alpha_factor=2.0), "must be equal"),
    "beta": (dict(linear_attn_beta_factor=0.5), "linear_attn_beta_factor=0.5"),
    "rope_scaling": (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}),
                     "rope_type='linear'"),
    "no_rotary": (dict(rotary_dim=0), "rotary_dim=0"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_models_llama_cpp_computes_differently_are_refused(tmp_path, case):
    overrides, message = REFUSED[case]
    config = minimax_config(**overrides)
    assert any(message in problem for problem in llama_cpp_problems(config)), llama_cpp_problems(config)
    config.save_pretrained(tmp_path)  # refused from the config alone, before any weight or tokenizer is read
    out = tmp_path / "out.gguf"
    with pytest.raises(GGUFExportError, match="llama.cpp's minimax-01 architecture would compute a different model"):
        export_gguf(tmp_path, out)
    assert not out.exists()


def test_the_minimax_form_is_accepted_and_the_cli_names_the_field(tmp_path, capsys):
    from tnl_model.convert import main

    assert llama_cpp_problems(minimax_config()) == []
    # MiniMax-Text-01 itself: its lightning output norm uses eps 1e-6, llama.cpp uses rms_norm_eps (1e-5) there
    real = TNLConfig.from_json_file(str(REPO / "configs" / "model" / "minimax-text-01.json"))
    assert [p.split(":")[0] for p in llama_cpp_problems(real)] == [
        "linear_attn_norm_eps=1e-06 differs from rms_norm_eps=1e-05"]
    assert llama_cpp_problems(TNLConfig.from_dict({**real.to_dict(), "linear_attn_norm_eps": 1e-5})) == []
    minimax_config(postnorm=False, mlp_alpha_factor=2.0).save_pretrained(tmp_path)
    assert main(["to-gguf", str(tmp_path), str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert "postnorm=False" in err and "residual_scale" in err and not (tmp_path / "x.gguf").exists()


def _write_tokenizer_json(directory, tok: dict, config: dict | None = None):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(config or {}), encoding="utf-8")
    return directory


def test_tokenizers_llama_cpp_reads_differently_are_refused(tmp_path, unigram, workdir):
    base = json.loads((workdir / "tok-unigram" / "tokenizer.json").read_text(encoding="utf-8"))
    token_config = json.loads((workdir / "tok-unigram" / "tokenizer_config.json").read_text(encoding="utf-8"))
    cases = {
        "byte_level": ({**base, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                                   "use_regex": True}}, "normalizer/pre_tokenizer"),
        "wordpiece": ({**base, "model": {"type": "WordPiece", "vocab": {"a": 0}}}, "model type 'WordPiece'"),
        "user_token": ({**base, "added_tokens": base["added_tokens"] + [
            {"id": 300, "content": base["model"]["vocab"][300][0], "special": False, "single_word": False,
             "lstrip": False, "rstrip": False, "normalized": False}]}, "is not special"),
        "post_eos": ({**base, "post_processor": {"type": "TemplateProcessing", "single": [
            {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<pad>", "type_id": 0}}],
            "pair": [], "special_tokens": {"<pad>": {"id": "<pad>", "ids": [0], "tokens": ["<pad>"]}}}},
            "not the EOS token"),
    }
    for name, (tok, message) in cases.items():
        directory = _write_tokenizer_json(tmp_path / name, tok, token_config)
        with pytest.raises(GGUFExportError, match=message):
            vocab_from_tokenizer(directory, 640)
    with pytest.raises(GGUFExportError, match="vocab_size is 100"):
        vocab_from_tokenizer(workdir / "tok-unigram", 100)
    with pytest.raises(GGUFExportError, match="has no tokenizer.json"):
        vocab_from_tokenizer(tmp_path, 640)


def test_special_ids_must_agree_with_the_config(tmp_path, unigram):
    config = minimax_config(eos_token_id=5, vocab_size=640)
    _save(tmp_path, config, unigram)
    with pytest.raises(GGUFExportError, match="eos_token_id is 5 in config.json"):
        export_gguf(tmp_path, tmp_path / "x.gguf")
