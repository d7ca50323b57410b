"""Tokenizer training: AutoTokenizer loads a fast tokenizer whose ids match sentencepiece and the model config."""

import json
import subprocess
import sys

import pytest
import sentencepiece as spm
from tnl_training.testing import TINY, write_corpus
from transformers import AutoTokenizer

from tnl_training.tokenizer import TokenizerError, special_ids_from_model_config, train_tokenizer

SAMPLES = ["ORSINO. If music be the food of love, play on;", "  two leading spaces", "trailing  ", "a\n\nb\tc",
           "unicode: é, ☃, 中文 and emoji 🙂", "", "   ", "12345 67", "Viola loves the sea."]


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_autotokenizer_round_trip_matches_sentencepiece(tmp_path, model_type):
    files = write_corpus(tmp_path / "texts", n_docs=4)
    special = special_ids_from_model_config(TINY)
    out = tmp_path / "tok"
    train_tokenizer(files, out, vocab_size=512, special_ids=special, model_type=model_type)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.is_fast
    cfg = json.loads(TINY.read_text())
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (cfg["bos_token_id"], cfg["eos_token_id"],
                                                                      cfg["pad_token_id"])
    assert len(tok) <= cfg["vocab_size"]
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    texts = SAMPLES + files[0].read_text().splitlines()[:50] + [files[1].read_text()]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == text  # byte fallback: exact round trip, no <unk>
        assert tok.unk_token_id not in ids
    with_special = tok("Viola")["input_ids"]
    assert with_special[0] == tok.bos_token_id


def test_cli_reads_ids_from_model_config(tmp_path):
    files = write_corpus(tmp_path / "texts", n_docs=2)
    out = tmp_path / "tok"
    proc = subprocess.run([sys.executable, "-m", "tnl_training.tokenizer", "--out", str(out), "--model-config",
                           str(TINY), *map(str, files)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "bos=1 eos=2 pad=0" in proc.stdout
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()


def test_bad_tokenizer_inputs(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(TokenizerError, match="empty"):
        train_tokenizer([empty], tmp_path / "t", 512)
    with pytest.raises(TokenizerError, match="does not exist"):
        train_tokenizer([tmp_path / "missing.txt"], tmp_path / "t", 512)
    with pytest.raises(TokenizerError, match="too small"):
        train_tokenizer([empty], tmp_path / "t", 100)


CJK = [chr(0x4E00 + i) for i in range(300)]  # 300 distinct ideographs


def test_many_rare_characters_fit_a_small_vocab_through_byte_fallback(tmp_path):
    # mostly English text quoting ~300 distinct CJK characters: with character_coverage=1.0 each of
    # them needed its own piece (300 + 256 bytes + 4 specials > 512) and training failed
    files = write_corpus(tmp_path / "texts", n_docs=10, lines=1000)
    quotes = tmp_path / "texts" / "quotes.txt"
    quotes.write_text("".join(f"VIOLA. she wrote {''.join(CJK[i:i + 10])}\n" for i in range(0, len(CJK), 10)))
    tok = train_tokenizer(files + [quotes], tmp_path / "tok", 512)
    assert len(tok) <= 512
    text = "Viola greets the duke: " + "".join(CJK[5:40])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and tok.unk_token_id not in ids  # rare characters are spelled in bytes


def test_tokenizer_training_error_passes_on_sentencepiece_reason(tmp_path):
    # every character equally frequent: none is rare enough to leave out, so 512 cannot hold them
    rng = __import__("random").Random(0)
    text = tmp_path / "zh.txt"
    text.write_text("".join("".join(rng.choice(CJK) for _ in range(40)) + "\n" for _ in range(2000)))
    with pytest.raises(TokenizerError) as info:
        train_tokenizer([text], tmp_path / "tok", 512)
    message = str(info.value)
    assert "Vocabulary size is smaller than required_chars" in message and "character_coverage=0.9995" in message
    assert "too large" not in message
    with pytest.raises(TokenizerError, match=r"character_coverage must be in \[0.98, 1\]"):
        train_tokenizer([text], tmp_path / "tok", 512, character_coverage=0.5)
