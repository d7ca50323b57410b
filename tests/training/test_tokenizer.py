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
