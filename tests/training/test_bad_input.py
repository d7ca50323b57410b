"""Bad input fails with a clear error before any compute: missing data path, unknown config key,
sequence length beyond the model, empty corpus, corrupt shard."""

import subprocess
import sys

import pytest

from tnl_training.config import load_config
from tnl_training.prepare import PreflightError, preflight
from tnl_training.testing import REPO, run_env, write_corpus, write_run_config


def _cfg(tmp_path, root, **fields):
    path = write_run_config(tmp_path / "run.yaml", root, **fields)
    return load_config(path), path


def test_missing_data_path(tmp_path):
    cfg, path = _cfg(tmp_path, tmp_path, data={"text_files": [str(tmp_path / "nowhere" / "*.txt")]})
    with pytest.raises(PreflightError, match="does not exist"):
        preflight(cfg, path, log=lambda m: None)
    assert not (tmp_path / "tokenizer").exists()  # nothing was trained


def test_sequence_longer_than_model(tmp_path):
    write_corpus(tmp_path / "texts", n_docs=2)
    cfg, path = _cfg(tmp_path, tmp_path, seq_len=4096)
    with pytest.raises(PreflightError, match=r"seq_len=4096 is longer than the model supports.*max_position_embeddings"):
        preflight(cfg, path, log=lambda m: None)
    assert not (tmp_path / "tokenizer").exists()


def test_empty_corpus(tmp_path):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("")
    (tmp_path / "texts" / "b.txt").write_text("")
    cfg, path = _cfg(tmp_path, tmp_path)
    with pytest.raises(PreflightError, match="corpus is empty"):
        preflight(cfg, path, log=lambda m: None)


def test_corrupt_shard(prepared_corpus, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(prepared_corpus, root)
    cfg, path = _cfg(tmp_path, root)
    preflight(cfg, path, log=lambda m: None)  # the copy's shards are valid (re-indexed for the new paths)
    shard = sorted((root / "shards").glob("train-*.bin"))[0]
    raw = bytearray(shard.read_bytes())
    raw[200] ^= 0x5A
    shard.write_bytes(bytes(raw))
    with pytest.raises(PreflightError, match=r"train-00000.bin is corrupt: payload checksum"):
        preflight(cfg, path, log=lambda m: None)
    shard.write_bytes(bytes(raw[:-100]))
    with pytest.raises(PreflightError, match="truncated"):
        preflight(cfg, path, log=lambda m: None, verify=False)


def test_too_little_text_for_one_row(tmp_path):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("ORSINO. Hello there, Viola loves the sea.\n" * 30)
    (tmp_path / "texts" / "b.txt").write_text("Short.\n")
    cfg, path = _cfg(tmp_path, tmp_path, seq_len=1500, data={"val_fraction": 0.0})
    with pytest.raises(PreflightError, match="fewer than one row"):
        preflight(cfg, path, log=lambda m: None)


def test_cli_config_error_exits_before_launching(tmp_path):
    override, message = "bogus_key=1", "unknown config key 'bogus_key'"
    cfg_path = write_run_config(tmp_path / "run.yaml", tmp_path)
    proc = subprocess.run([sys.executable, "-m", "tnl_training.pretrain", "--config", str(cfg_path), override],
                          capture_output=True, text=True, env=run_env(), cwd=str(REPO), timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unwritable_output_dir_fails_before_any_work(tmp_path):
    write_corpus(tmp_path / "texts", n_docs=2)
    (tmp_path / "a-file").write_text("not a directory")
    cfg, path = _cfg(tmp_path, tmp_path, output_dir=str(tmp_path / "a-file" / "run"))
    with pytest.raises(PreflightError, match=r"output_dir .*a-file/run' is not a writable directory"):
        preflight(cfg, path, log=lambda m: None)
    assert not (tmp_path / "tokenizer").exists()
