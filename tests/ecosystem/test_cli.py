"""The `tnl` command line, called in-process: generate (streaming and not, text and raw ids),
info, the forwarding subcommands, and its errors."""

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
import transformers

from tnl_model import cli
from tnl_model.load_checks import load_model

MINIMAX_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "model" / "minimax-text-01.json"


def _run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_streams_tokens_as_they_are_produced(saved_model_dir, tiny_tokenizer, capsys, monkeypatch):
    chunks = []
    original = transformers.TextStreamer.on_finalized_text

    def recording(self, text, stream_end=False):
        chunks.append(text)
        return original(self, text, stream_end)

    monkeypatch.setattr(transformers.TextStreamer, "on_finalized_text", recording)
    code, streamed, _ = _run(capsys, "generate", saved_model_dir, "--prompt", "the cat sat on", "--max-new-tokens", 6)
    assert code == 0
    assert len([c for c in chunks if c]) >= 3  # printed piece by piece, not once at the end
    # Same greedy text as transformers' generate on the same model, and as the non-streaming mode.
    model = load_model(saved_model_dir).eval()
    prompt = tiny_tokenizer("the cat sat on", return_tensors="pt")["input_ids"]
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False)[0, prompt.shape[1]:]
    expected_text = tiny_tokenizer.decode(expected, skip_special_tokens=True)
    assert streamed.split() == expected_text.split()
    code, whole, _ = _run(capsys, "generate", saved_model_dir, "--prompt", "the cat sat on", "--max-new-tokens", 6,
                          "--no-stream")
    assert code == 0 and whole.split() == expected_text.split()


def test_generate_sampling_is_seeded(saved_model_dir, capsys):
    args = ["generate", saved_model_dir, "--prompt", "a red bird", "--max-new-tokens", 8, "--temperature", 1.5,
            "--top-p", 0.9, "--seed", 3, "--no-stream"]
    first, second = _run(capsys, *args), _run(capsys, *args)
    assert first[0] == 0 and first[1] == second[1] and first[1].strip()


def test_generate_with_raw_token_ids_needs_no_tokenizer(saved_model_dir, tmp_path, capsys):
    no_tokenizer = tmp_path / "bare"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(saved_model_dir / name, no_tokenizer / name)
    code, out, _ = _run(capsys, "generate", no_tokenizer, "--token-ids", "1,5,9,13", "--max-new-tokens", 5)
    assert code == 0
    ids = [int(t) for t in out.split()]
    model = load_model(no_tokenizer)
    expected = model.generate(torch.tensor([[1, 5, 9, 13]]), max_new_tokens=5, do_sample=False)[0, 4:].tolist()
    assert ids == expected


def test_generate_errors(saved_model_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(saved_model_dir / name, bare / name)
    code, out, err = _run(capsys, "generate", bare, "--prompt", "hello")
    assert code == 2 and not out
    assert "has no tokenizer" in err and "save_pretrained" in err and "--token-ids" in err
    code, _, err = _run(capsys, "generate", bare, "--token-ids", "1,500")
    assert code == 2 and "token id 500, outside the vocabulary [0, 97)" in err
    code, _, err = _run(capsys, "generate", bare, "--token-ids", "")
    assert code == 2 and "--token-ids is empty" in err
    code, _, err = _run(capsys, "generate", saved_model_dir, "--prompt", "the", "--top-p", 0)
    assert code == 2 and "--top-p must be in (0, 1]" in err
    code, _, err = _run(capsys, "generate", tmp_path / "nowhere", "--prompt", "x")
    assert code == 2 and "is not a model directory" in err
    truncated = tmp_path / "truncated"
    shutil.copytree(saved_model_dir, truncated)
    path = truncated / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    code, _, err = _run(capsys, "generate", truncated, "--prompt", "the cat")
    assert code == 2 and "model.safetensors is truncated or corrupt" in err


def test_info_on_a_model_directory(saved_model_dir, capsys):
    code, out, _ = _run(capsys, "info", saved_model_dir)
    assert code == 0
    assert "layers: 4 = 3 lightning + 1 softmax; pattern LSlL" in out
    assert "parameters total: 111,840" in out
    assert "shapes match the config" in out and "tokenizer: tokenizer.json" in out
    code, out, _ = _run(capsys, "info", saved_model_dir, "--json")
    data = json.loads(out)
    model = load_model(saved_model_dir)
    assert data["total_parameters"] == model.num_parameters()
    assert data["recurrent_state_bytes_per_sequence"] == 3 * 4 * 12 * 12 * 4


def test_info_on_the_minimax_config(capsys):
    code, out, _ = _run(capsys, "info", MINIMAX_CONFIG)
    print(out)
    assert code == 0
    assert "pattern LLLLLLLS x10" in out
    assert "parameters total: 456,089,655,296 (456.09B" in out
    assert "45,944,920,064 (45.94B) without" in out
    assert "lightning 280.00 MiB fp32" in out


def test_info_errors(tmp_path, capsys):
    code, _, err = _run(capsys, "info", tmp_path)
    assert code == 2 and "has no config.json" in err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "tnl", "num_local_experts": 1,
                                                      "num_experts_per_tok": 2}))
    code, _, err = _run(capsys, "info", tmp_path)
    assert code == 2 and "num_experts_per_tok (2) cannot exceed num_local_experts (1)" in err


@pytest.mark.parametrize("name, module", [("convert", "tnl_model.convert"), ("train", "tnl_training.pretrain"),
                                          ("export", "tnl_training.export")])
def test_forwarding_subcommands(monkeypatch, name, module):
    calls = []
    fake = types.ModuleType(module)
    fake.main = lambda argv=None: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, module, fake)
    assert cli.main([name, "--some", "args"]) == 0
    assert calls == [["--some", "args"]]


def test_forwarding_runs_a_module_without_main(monkeypatch):
    seen = []
    fake = types.ModuleType("tnl_training.export")
    monkeypatch.setitem(sys.modules, "tnl_training.export", fake)
    monkeypatch.setattr(cli.runpy, "run_module", lambda name, **kw: seen.append((name, list(sys.argv))))
    assert cli.main(["export", "a", "b"]) == 0
    assert seen == [("tnl_training.export", ["tnl export", "a", "b"])]


def test_convert_is_the_real_entry_point(capsys, tmp_path):
    code = cli.main(["convert", "to-minimax", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert code == 2 and "error:" in capsys.readouterr().err


def test_console_script_is_declared():
    setup = (Path(__file__).resolve().parents[2] / "setup.py").read_text()
    assert '"tnl=tnl_model.cli:main"' in setup


def test_context_snapshot_round_trip_answers_like_the_whole_prompt(saved_model_dir, tiny_tokenizer, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(["the cat sat on the mat and then it ran under the tree"] * 6))
    snapshot = tmp_path / "doc.tnlctx"
    code, out, err = _run(capsys, "generate", saved_model_dir, "--context-file", doc, "--save-context", snapshot)
    assert code == 0 and snapshot.is_file() and "saved the cache of" in err and not out.strip()
    # The question as raw ids, so the answer prints as ids too (the random model emits ids the tiny
    # word-level tokenizer has no word for).
    question = ["--token-ids", "20,21,22,5", "--max-new-tokens", 8, "--no-stream"]
    code, from_snapshot, _ = _run(capsys, "generate", saved_model_dir, "--load-context", snapshot, *question)
    assert code == 0
    code, from_text, _ = _run(capsys, "generate", saved_model_dir, "--context-file", doc, *question)
    assert code == 0 and from_snapshot == from_text
    # The oracle: transformers' generate over the same ids from scratch.
    model = load_model(saved_model_dir).eval()
    ids = tiny_tokenizer(doc.read_text())["input_ids"] + [20, 21, 22, 5]
    expected = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):]
    assert from_text.split() == [str(t) for t in expected.tolist()]
    code, again, _ = _run(capsys, "generate", saved_model_dir, "--load-context", snapshot, *question)
    assert again == from_snapshot  # answering does not change the file


def test_context_options_are_checked(saved_model_dir, tmp_path, capsys):
    code, _, err = _run(capsys, "generate", saved_model_dir, "--save-context", tmp_path / "x.tnlctx")
    assert code == 2 and "--save-context needs --context-file" in err
    (tmp_path / "bad.tnlctx").write_bytes(b"not a snapshot")
    code, _, err = _run(capsys, "generate", saved_model_dir, "--load-context", tmp_path / "bad.tnlctx", "--prompt", "a")
    assert code == 2 and "not a readable snapshot" in err


def test_info_prints_the_snapshot_size_for_a_context_length(capsys):
    code, out, _ = _run(capsys, "info", MINIMAX_CONFIG, "--context-length", 1000000)
    assert code == 0 and "context snapshot of 1,000,000 tokens: 38.43 GiB" in out
    code, out, _ = _run(capsys, "info", MINIMAX_CONFIG, "--json", "--context-length", 1000000)
    assert json.loads(out)["snapshot_bytes_bf16_kv"] == 280 * 2**20 + 1000000 * (40 * 1024 + 8)
