"""lm-evaluation-harness itself (lm-eval's HFLM, `--model hf`) agrees with tnl_model on a TNL model.

The tasks live in ``lm_eval_tasks/`` (yaml + jsonl, no downloads): multiple choice by
log-likelihood, rolling log-likelihood of documents, and greedy generation. The tokenizer is a
real sentencepiece one (trained here), so encoding context and continuation jointly (lm-eval)
and apart gives different ids: `" and"` alone is [▁, and], after "sea," it is [▁and].

Tolerance: ``TOL`` = 1e-5 absolute on a sum of fp32 log-probabilities (sums of -5 to -400). Both
sides run the same fp32 model on the same token ids, each with its own batching and padding
(lm-eval batches of 4, ``tnl_model.scoring`` batches of 4 or 3), which can only change matmul
rounding: measured differences are exactly 0 on CPU, and 1e-5 leaves room for another BLAS.
A tokenisation difference moves a sum by whole nats.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a test dependency: pip install 'tnl-model[test]'")

from tnl_model import TNLConfig, TNLForCausalLM  # noqa: E402
from tnl_model.scoring import loglikelihood  # noqa: E402

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
TINY = Path(__file__).resolve().parents[2] / "configs" / "model" / "tiny.json"
TOL = 1e-5
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """configs/model/tiny.json (vocab 512) with random weights and a 512-piece sentencepiece tokenizer."""
    tnl_testing = pytest.importorskip("tnl_training.testing")
    from tnl_training.tokenizer import special_ids_from_model_config, train_tokenizer

    root = tmp_path_factory.mktemp("lm_eval")
    files = tnl_testing.write_corpus(root / "texts", n_docs=2, lines=60)
    directory = root / "model"
    train_tokenizer(files, directory, vocab_size=512, special_ids=special_ids_from_model_config(TINY))
    torch.manual_seed(0)
    TNLForCausalLM(TNLConfig.from_json_file(str(TINY))).eval().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def loaded(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(model_dir)).eval(), AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def samples(model_dir):
    """Per-request results of lm-eval's own run, by task."""
    from lm_eval.tasks import TaskManager

    with pytest.MonkeyPatch.context() as patch:
        for key, value in OFFLINE.items():
            patch.setenv(key, value)
        results = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(model_dir)}, tasks=["tnl_choice", "tnl_rolling", "tnl_generate"],
            batch_size=4, device="cpu", log_samples=True,
            task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
            random_seed=None, numpy_random_seed=None, torch_random_seed=None)  # leave the suite's RNGs alone
    return results["samples"]


def _pairs(sample):
    return [tuple(args) for args in sample["arguments"]]


def test_multiple_choice_loglikelihood_equals_lm_eval(samples, loaded):
    model, tokenizer = loaded
    requests, expected = [], []
    for sample in samples["tnl_choice"]:
        requests += _pairs(sample)
        expected += [tuple(resp) for resp in sample["filtered_resps"]]
    assert len(requests) == 12 and any(context == "" for context, _ in requests)
    assert any(context.endswith(" ") for context, _ in requests)
    ours = loglikelihood(model, tokenizer, requests, batch_size=4)
    for request, (score, greedy), (want, want_greedy) in zip(requests, ours, expected):
        assert abs(score - want) < TOL, (request, score, want)
        assert greedy == want_greedy, request
    # The check has teeth: encoding the parts apart (the old scoring) misses by whole nats.
    apart = [(tokenizer(c, add_special_tokens=False)["input_ids"] or [tokenizer.bos_token_id],
              tokenizer(x, add_special_tokens=False)["input_ids"]) for c, x in requests]
    assert tokenizer(" and", add_special_tokens=False)["input_ids"] != tokenizer("sea, and")["input_ids"][-1:]
    assert max(abs(a[0] - b[0]) for a, b in zip(loglikelihood(model, None, apart), expected)) > 1.0


@pytest.mark.parametrize("add_bos_token", [None, False, True])
def test_string_requests_get_the_token_ids_hflm_gives_them(loaded, add_bos_token):
    """Token for token, on the awkward cases: trailing and doubled whitespace, an empty context, a
    context or continuation that starts with the BOS text, newlines, characters spelled in bytes."""
    from lm_eval.models.huggingface import HFLM

    from tnl_model.scoring import _encode_strings, _prefix_token

    model, tokenizer = loaded
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=1, add_bos_token=add_bos_token)
    seen = []
    lm._loglikelihood_tokens = lambda requests, **_: seen.extend(requests) or [(0.0, False)] * len(requests)
    pairs = [("ORSINO. Viola loves the sea,", " and the night"), ("Toby greets ", "my lady"),
             ("Toby greets  ", " my lady"), ("", "Orsino loves"), ("", " Orsino"), ("", "<s> Viola"),
             ("<s> Feste", " mocks the fool"), ("unicode: é ☃", " 中文 🙂"), ("MARIA.\n\n", "TOBY."), ("x", "\n")]
    lm.loglikelihood([type("Request", (), {"args": pair})() for pair in pairs], disable_tqdm=True)
    prefix = _prefix_token(model, tokenizer)
    for pair, (_, context_ids, continuation_ids) in zip(pairs, seen, strict=True):
        assert _encode_strings(tokenizer, *pair, prefix, add_bos_token) == (context_ids, continuation_ids), pair


def test_rolling_loglikelihood_equals_lm_eval(samples, loaded):
    """lm-eval's rolling score of a document shorter than the context: one window, the prefix
    token (BOS) as context and the document encoded with the tokenizer's special tokens."""
    model, tokenizer = loaded
    documents = [sample["arguments"][0][0] for sample in samples["tnl_rolling"]]
    expected = [sample["filtered_resps"][0] for sample in samples["tnl_rolling"]]
    windows = [([tokenizer.bos_token_id], tokenizer(text)["input_ids"]) for text in documents]
    assert max(len(ids) for _, ids in windows) < model.config.max_position_embeddings
    ours = loglikelihood(model, None, windows, batch_size=3)
    for text, (score, _), want in zip(documents, ours, expected):
        assert abs(score - float(want)) < TOL, (text, score, want)


def test_generate_until_equals_greedy_generate(samples, loaded):
    model, tokenizer = loaded
    for sample in samples["tnl_generate"]:
        prompt, gen_kwargs = sample["arguments"][0]
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=gen_kwargs["max_gen_toks"])
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        for stop in gen_kwargs["until"]:
            text = text.split(stop)[0]
        assert sample["filtered_resps"][0] == text, prompt


def test_tnl_eval_runs_lm_eval_on_a_model_directory(model_dir, loaded, tmp_path):
    """`tnl eval MODEL_DIR --tasks TASK --include-path DIR [lm-eval flags]`, as a user runs it."""
    model, tokenizer = loaded
    tnl = Path(sys.executable).with_name("tnl")
    command = [str(tnl)] if tnl.exists() else [sys.executable, "-m", "tnl_model.cli"]
    out = tmp_path / "out"
    proc = subprocess.run([*command, "eval", str(model_dir), "--tasks", "tnl_choice", "--include-path", str(TASKS),
                           "--batch_size", "2", "--device", "cpu", "--output_path", str(out), "--log_samples"],
                          cwd=str(tmp_path), env={"OMP_NUM_THREADS": "1", **os.environ, **OFFLINE},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "neither marked as CausalLM" not in proc.stderr + proc.stdout  # lm-eval knows "tnl" is a causal LM
    assert "tnl_choice" in proc.stdout and "acc" in proc.stdout  # lm-eval's results table
    [results_file] = out.rglob("results_*.json")
    [samples_file] = out.rglob("samples_tnl_choice_*.jsonl")
    rows = [json.loads(line) for line in samples_file.read_text().splitlines()]
    correct = []
    for row in sorted(rows, key=lambda r: r["doc_id"]):
        pairs = [(a["arg_0"], a["arg_1"]) for a in row["arguments"].values()]
        scores = [score for score, _ in loglikelihood(model, tokenizer, pairs)]
        for score, (want, _) in zip(scores, row["filtered_resps"]):
            assert abs(score - float(want)) < TOL
        correct.append(float(scores.index(max(scores)) == row["doc"]["answer"]))
    accuracy = json.loads(results_file.read_text())["results"]["tnl_choice"]["acc,none"]
    assert len(correct) == 5 and accuracy == pytest.approx(sum(correct) / len(correct))
    shutil.rmtree(out)


def test_tnl_eval_errors(model_dir, tmp_path, capsys):
    from tnl_model import cli

    assert cli.main(["eval", str(tmp_path), "--tasks", "x"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert cli.main(["eval", str(model_dir), "--tasks", "x", "--model", "vllm"]) == 2
    assert "sets --model itself" in capsys.readouterr().err
    assert cli.main(["eval", str(model_dir), "--tasks", "x", "--include-path", str(tmp_path / "none")]) == 2
    assert "not a directory" in capsys.readouterr().err
