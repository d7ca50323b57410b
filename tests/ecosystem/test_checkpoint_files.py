"""Damaged or hostile checkpoint files: safetensors headers whose byte ranges overlap, leave the file or
disagree with dtype x shape; indexes that point outside the model directory; a FIFO where a weights
file belongs (it used to hang every loader). Each is refused with an error naming the file (and the
tensor), by every loader and by the `tnl` command line; `tnl info` exits non-zero when it reports
unusable weights, and `tnl generate` refuses non-finite sampling settings."""

import json
import os
import re
import shutil
import struct
import threading

import pytest
from transformers import AutoModelForCausalLM

import tnl_model  # noqa: F401
from tnl_model import cli
from tnl_model.checkpoint_io import CheckpointError, SafetensorsDirectory
from tnl_model.load_checks import load_model, read_safetensors_header, verify_checkpoint
from tnl_model.testing import build_model, tiny_config

LOADERS = {
    "read_safetensors_header": lambda d: read_safetensors_header(d / "model.safetensors"),
    "verify_checkpoint": lambda d: verify_checkpoint(d),
    "load_model": lambda d: load_model(d),
    "AutoModelForCausalLM": lambda d: AutoModelForCausalLM.from_pretrained(d),
}


@pytest.fixture()
def model_dir(tmp_path):
    directory = tmp_path / "model"
    build_model(tiny_config()).save_pretrained(directory)
    return directory


def _rewrite_header(path, edit):
    """Apply ``edit(header_dict)`` to a safetensors file's header, keeping its data bytes."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * ((-len(text)) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])


def _tensors(header):
    return sorted((info["data_offsets"], name) for name, info in header.items() if name != "__metadata__")


def _overlap(header):
    """Give a later tensor the byte range of an earlier one of the same size."""
    spans = _tensors(header)
    for i, ((start, stop), name) in enumerate(spans):
        for (start2, stop2), name2 in spans[i + 1:]:
            if stop2 - start2 == stop - start:
                header[name2]["data_offsets"] = [start, stop]
                return
    raise AssertionError("no two tensors of one size")


def _beyond_the_end(header):
    (start, stop), name = _tensors(header)[-1]
    header[name]["data_offsets"] = [start + 64, stop + 64]


def _negative_dim(header):
    name = "model.norm.weight"
    header[name]["shape"] = [-header[name]["shape"][0]]


def _wrong_dtype(header):
    header["model.norm.weight"]["dtype"] = "F16"  # 48 elements: 96 bytes, but the range holds 192


def _unknown_dtype(header):
    header["model.norm.weight"]["dtype"] = "F33"


DAMAGE = {
    "overlap": (_overlap, r"model\.safetensors is corrupt: tensors '.+' and '.+' overlap"),
    "beyond_the_end": (_beyond_the_end, r"model\.safetensors is truncated or corrupt: its header describes \d+ bytes "
                                        r"but the file has \d+ \(the last tensor, '.+', ends at byte \d+\)"),
    "negative_dim": (_negative_dim, r"model\.safetensors is corrupt: tensor 'model\.norm\.weight' has a negative "
                                    r"dimension in its shape \[-48\]"),
    "size_disagrees_with_dtype_and_shape": (
        _wrong_dtype, r"model\.safetensors is corrupt: tensor 'model\.norm\.weight' is F16 of shape \[48\], which takes "
                      r"96 bytes, but its data_offsets \[\d+, \d+\] hold 192"),
    "unknown_dtype": (_unknown_dtype, r"tensor 'model\.norm\.weight' has an unknown dtype 'F33'"),
}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("damage", DAMAGE)
def test_inconsistent_safetensors_headers_are_refused(model_dir, loader, damage):
    edit, message = DAMAGE[damage]
    _rewrite_header(model_dir / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match=message):
        LOADERS[loader](model_dir)


def test_tnl_generate_on_a_corrupt_file_prints_the_error_line(model_dir, capsys):
    _rewrite_header(model_dir / "model.safetensors", _overlap)  # passed the old checks; safetensors raised
    code = cli.main(["generate", str(model_dir), "--token-ids", "1,2,3", "--max-new-tokens", "2"])
    out, err = capsys.readouterr()
    assert code == 2 and not out and "Traceback" not in err
    assert err.startswith("error: ") and "model.safetensors is corrupt: tensors" in err and "overlap" in err


@pytest.fixture()
def sharded_dir(tmp_path):
    directory = tmp_path / "sharded"
    build_model(tiny_config()).save_pretrained(directory, max_shard_size="100KB")
    assert (directory / "model.safetensors.index.json").exists()
    return directory


SHARD_LOADERS = {
    "verify_checkpoint": lambda d: verify_checkpoint(d),
    "load_model": lambda d: load_model(d),
    "AutoModelForCausalLM": lambda d: AutoModelForCausalLM.from_pretrained(d),
    "SafetensorsDirectory": lambda d: SafetensorsDirectory(d),
}


@pytest.mark.parametrize("loader", SHARD_LOADERS)
@pytest.mark.parametrize("escape", ["../outside/{}", "{absolute}"])
def test_index_paths_outside_the_model_directory_are_refused(sharded_dir, tmp_path, loader, escape):
    index_path = sharded_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    tensor, shard = next(iter(index["weight_map"].items()))
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    shutil.copy(sharded_dir / shard, outside / shard)  # a valid file: only where it lies is wrong
    target = escape.format(shard, absolute=str(outside / shard))
    index["weight_map"] = {k: (target if v == shard else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json lists shard .+ for tensor .+: a path "
                                              r"outside the model directory, refused"):
        SHARD_LOADERS[loader](sharded_dir)


def _call_with_timeout(fn, seconds=30):
    """Run ``fn`` in a daemon thread; (finished, result or exception)."""
    box = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed back to the test
            box["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive(), box


def _unblock(fifo):
    """Open the FIFO for writing and close it, so a reader stuck in open() sees end-of-file."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


FIFO_CALLS = {
    "tnl info": lambda d: cli.main(["info", str(d)]),
    "tnl generate": lambda d: cli.main(["generate", str(d), "--token-ids", "1,2", "--max-new-tokens", "1"]),
    "AutoModelForCausalLM": lambda d: AutoModelForCausalLM.from_pretrained(d),
    "load_model": lambda d: load_model(d),
    "verify_checkpoint": lambda d: verify_checkpoint(d),
    "SafetensorsDirectory": lambda d: [reader.get(key) for reader in [SafetensorsDirectory(d)] for key in reader.keys()],
}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
@pytest.mark.parametrize("call", FIFO_CALLS)
@pytest.mark.parametrize("layout", ["single", "shard"])
def test_a_fifo_instead_of_a_weights_file_is_refused_unopened(model_dir, sharded_dir, capsys, call, layout):
    directory = model_dir if layout == "single" else sharded_dir
    name = "model.safetensors" if layout == "single" else sorted(directory.glob("model-*.safetensors"))[0].name
    fifo = directory / name
    fifo.unlink()
    os.mkfifo(fifo)
    try:
        finished, box = _call_with_timeout(lambda: FIFO_CALLS[call](directory))
    finally:
        _unblock(fifo)
    assert finished, f"{call} hangs on a FIFO named {name}"
    message = rf"{name} is a FIFO \(named pipe\), not a regular file, and is refused unread"
    if call.startswith("tnl "):
        assert box.get("result") == 2, box
        out, err = capsys.readouterr()
        assert err.startswith("error: ") and re.search(message, out + err), (out, err)  # info: on its weights: line
    else:
        assert isinstance(box.get("error"), CheckpointError), box
        assert re.search(message, str(box["error"])), box["error"]


# ------------------------------------------------------------------------------------ tnl info / generate


def test_tnl_info_exits_nonzero_when_the_weights_do_not_fit(model_dir, capsys):
    assert cli.main(["info", str(model_dir)]) == 0
    capsys.readouterr()
    (model_dir / "config.json").write_text(
        (model_dir / "config.json").read_text().replace('"num_local_experts": 4', '"num_local_experts": 6'))
    code = cli.main(["info", str(model_dir)])
    out, err = capsys.readouterr()
    assert code == 2 and "weights: DO NOT MATCH the config" in out and err.startswith("error: ")
    assert cli.main(["info", str(model_dir), "--json"]) == 2
    capsys.readouterr()
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    code = cli.main(["info", str(model_dir)])
    out, err = capsys.readouterr()
    assert code == 2 and "weights: NOT LOADABLE" in out and "truncated or corrupt" in out and "error: " in err


@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "nan", r"--temperature must be a finite number >= 0 \(0 = greedy\), got nan"),
    ("--temperature", "inf", r"--temperature must be a finite number >= 0 \(0 = greedy\), got inf"),
    ("--temperature", "-0.5", r"--temperature must be a finite number >= 0"),
    ("--top-p", "nan", r"--top-p must be in \(0, 1\], got nan"),
    ("--top-p", "inf", r"--top-p must be in \(0, 1\], got inf"),
    ("--top-p", "1.5", r"--top-p must be in \(0, 1\], got 1.5"),
])
def test_tnl_generate_refuses_non_finite_sampling_settings(model_dir, capsys, flag, value, message):
    code = cli.main(["generate", str(model_dir), "--token-ids", "1,2", "--max-new-tokens", "2",
                     "--temperature", "0.7", flag, value])
    out, err = capsys.readouterr()
    assert code == 2 and not out and re.search(message, err), err
