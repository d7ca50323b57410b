"""Streaming tokenization: bounded memory whatever the file sizes, pieces of a long document give the
whole document's tokens, ``workers=N`` writes the same shards as one process, and text that is not
UTF-8 is an error naming the file and byte offset unless ``errors="replace"``."""

import json
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from tnl_training.testing import TINY, write_corpus

import tnl_training.data as data
from tnl_training.data import DataError, open_split, prepare_shards
from tnl_training.tokenizer import TokenizerError, special_ids_from_model_config, train_tokenizer

WORDS = ["Orsino", "Viola", "loves", "the", "sea,", "a", "letter.", "caf\u00e9", "\u4e2d\u6587", "\u2603", "x" * 11]


def _words(n, seed=0, sep=" "):
    rng = random.Random(seed)
    return sep.join(rng.choice(WORDS) for _ in range(n))


def _doc_tokens(shard_dir, split="train"):
    shards = open_split(shard_dir, split)
    return [s.document(i)[1:-1].tolist() for s in shards for i in range(s.num_docs)]


def test_pieces_of_a_long_document_give_its_whole_tokens(tmp_path, tokenizer_dir, monkeypatch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    monkeypatch.setattr(data, "PIECE_CHARS", 300)  # many cuts in a small text
    plays = write_corpus(tmp_path / "plays", n_docs=1, lines=400)[0].read_text()
    texts = {
        "lines.txt": plays,  # newlines and spaces: cut at spaces
        "spaces.txt": "  lead " + _words(3000, 1).replace("a ", "a   ") + "  \n\n  tail  ",  # runs of spaces
        "unspaced.txt": _words(3000, 2, sep="") + "\n" + _words(300, 3),  # no whitespace: fixed-size cuts
    }
    files = []
    for name, text in texts.items():
        files.append(tmp_path / name)
        files[-1].write_text(text, encoding="utf-8")
    prepare_shards(files, tokenizer_dir, tmp_path / "shards", val_fraction=0.0, log=lambda m: None)
    docs = _doc_tokens(tmp_path / "shards")
    assert len(docs) == 3  # one document per file: no BOS/EOS between its pieces
    assert data.cut_mode(data._Encoder(tok).raw) == "drop"
    for (name, text), ids in zip(texts.items(), docs):
        assert tok.decode(ids) == text, name  # the text is kept exactly, cut or not
        if name != "unspaced.txt":  # cut at spaces: the very tokens of the whole document in one call
            assert ids == tok(text, add_special_tokens=False)["input_ids"], name


def test_text_is_read_in_blocks_without_cutting_characters(tmp_path):
    from tnl_training.data import iter_text, split_document

    path = tmp_path / "t.txt"
    text = "".join(random.Random(0).choice(["\u00e9", "\u4e2d", "\U0001f642", "a", " ", "\r\n", "\r", "\n"])
                   for _ in range(5000))
    path.write_bytes(text.encode("utf-8"))
    with open(path, encoding="utf-8") as f:
        want = f.read()  # universal newlines, as documents were read before
    for block_bytes in (1, 2, 3, 5, 7, 1000):
        blocks = list(iter_text(path, block_bytes=block_bytes))
        assert "".join(b for _, b in blocks) == want
        assert [o for o, _ in blocks] == sorted(o for o, _ in blocks)
    pieces = list(split_document([want[i:i + 37] for i in range(0, len(want), 37)], None, piece_chars=50))
    assert "".join(pieces) == want and max(map(len, pieces)) <= 50 and all(pieces)


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    from tnl_training.data import prepare_shards
    from tnl_training.tokenizer import load_tokenizer

    def peak_mib():  # VmHWM: this process's peak since exec (ru_maxrss also counts what fork inherited)
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024

    load_tokenizer(sys.argv[1])  # the baseline: imports and a loaded tokenizer
    base = peak_mib()
    prepare_shards(sys.argv[3:], sys.argv[1], sys.argv[2], val_fraction=0.0, log=lambda m: None)
    print(json.dumps({"baseline_mib": base, "peak_mib": peak_mib()}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc/self/status")
def test_tokenizing_big_files_stays_in_bounded_memory(tmp_path, tokenizer_dir):
    """8 MB on one line (no newline) plus 300 small files: the peak resident memory may exceed the
    baseline (Python, transformers, the tokenizer: about 310 MiB) by 400 MiB. Tokenizing each file
    in one call needed ~2.2 GiB over the baseline for the 8 MB line (12.8 GB for 50 MB);
    benchmarks/bench_tokenize.py measures 10 MB and up."""
    big = tmp_path / "one_line.txt"
    with open(big, "w", encoding="utf-8") as f:
        for seed in range(8):
            f.write(_words(190_000, seed) + " ")
    assert 8e6 < big.stat().st_size < 1e7
    small = write_corpus(tmp_path / "many", n_docs=300, lines=60)
    script = tmp_path / "measure.py"
    script.write_text(MEMORY_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tokenizer_dir), str(tmp_path / "shards"), str(big),
                           *map(str, small)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rss = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rss["peak_mib"] - rss["baseline_mib"] < 400, rss
    assert sum(s.num_docs for s in open_split(tmp_path / "shards", "train")) == 301


def test_workers_write_the_same_shards_as_one_process(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setattr(data, "PIECE_CHARS", 2000)
    monkeypatch.setattr(data, "BATCH_CHARS", 6000)  # many batches in flight
    files = write_corpus(tmp_path / "texts", n_docs=6, lines=200)
    (tmp_path / "texts" / "long.txt").write_text(_words(20000, 4))
    jsonl = tmp_path / "texts" / "records.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": _words(50 * i + 1, i)}) for i in range(40)) + "\n")
    files += [tmp_path / "texts" / "long.txt", jsonl]
    one = prepare_shards(files, tokenizer_dir, tmp_path / "one", val_fraction=0.2, shard_tokens=5000,
                         log=lambda m: None)
    two = prepare_shards(files, tokenizer_dir, tmp_path / "two", val_fraction=0.2, shard_tokens=5000,
                         log=lambda m: None, workers=2)
    assert one["splits"] == two["splits"] and one["val_documents"] == two["val_documents"]
    assert len(one["splits"]["train"]) > 3
    for entry in one["splits"]["train"] + one["splits"]["val"]:
        assert (tmp_path / "one" / entry["file"]).read_bytes() == (tmp_path / "two" / entry["file"]).read_bytes()


def test_text_that_is_not_utf8_is_an_error_naming_file_and_offset(tmp_path, tokenizer_dir):
    good = write_corpus(tmp_path / "texts", n_docs=2)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(b"x" * 5000 + "caf\u00e9 au lait".encode("latin-1"))
    binary = tmp_path / "archive.txt"
    binary.write_bytes(b"name.txt" + b"\0" * 100 + b"payload")
    records = tmp_path / "records.jsonl"
    records.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    out = tmp_path / "shards"
    for path, pattern in [(latin, r"latin1.txt: not UTF-8 text: .* byte offset 5003 \(e9 .*data.errors=replace"),
                          (binary, r"archive.txt is binary, not text: a NUL byte at byte offset 8"),
                          (records, r"records.jsonl \(line 2\): not UTF-8 text: .* byte offset 30 ")]:
        with pytest.raises(DataError, match=pattern):
            prepare_shards(good + [path], tokenizer_dir, out, log=lambda m: None)
        assert not (out / "index.json").exists() and not list(out.glob("*.bin"))  # found before any tokenizing
    index = prepare_shards(good + [latin], tokenizer_dir, out, val_fraction=0.0, errors="replace", log=lambda m: None)
    assert index["settings"]["errors"] == "replace"
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tokenizer_dir)).decode(_doc_tokens(out)[-1]).endswith("caf\ufffd au lait")
    with pytest.raises(TokenizerError, match=r"latin1.txt: not UTF-8 text: .* byte offset 5003"):
        train_tokenizer(good + [latin], tmp_path / "tok", 512)
    proc = subprocess.run([sys.executable, "-m", "tnl_training.data", str(latin), "--tokenizer", str(tokenizer_dir),
                           "--out", str(tmp_path / "cli"), "--errors", "strict", "--workers", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "byte offset 5003" in proc.stderr and "Traceback" not in proc.stderr


def test_run_config_data_errors(tmp_path):
    from tnl_training.config import ConfigError, load_config

    cfg = tmp_path / "run.yaml"
    cfg.write_text("model_config: x.json\ndata:\n  text_files: [a.txt]\nmax_steps: 1\n")
    assert load_config(cfg).data.errors == "strict"
    assert load_config(cfg, ["data.errors=replace"]).data.errors == "replace"
    with pytest.raises(ConfigError, match="data.errors must be 'strict'.* or 'replace'"):
        load_config(cfg, ["data.errors=ignore"])


def test_tokenizer_trains_on_a_file_without_newlines(tmp_path):
    # sentencepiece skips sentences over 16 KiB, so one 300 KB line used to leave it nothing to train on
    path = tmp_path / "one_line.txt"
    path.write_text(_words(60000, 5))
    tok = train_tokenizer([path], tmp_path / "tok", 300)
    assert tok.tokenize("Orsino loves the letter.")[:3] == ["\u2581Orsino", "\u2581loves", "\u2581the"]
