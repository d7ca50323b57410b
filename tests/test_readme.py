"""The README stays true: its Python examples run as written, and every command it shows is
run either by CI (`.ci/run`) or by a named test. A new command in the README without an entry
in COVERAGE, or an entry whose test no longer exists, fails here."""

import ast
import re
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()

#: command prefix -> where it is exercised: "ci" (a line of .ci/run) or "path::test_function"
COVERAGE = {
    "make test": "ci",
    "make quickstart": "ci",
    "make demo": "ci",
    "make deps-report": "ci",
    ".venv/bin/deepspeed --num_gpus 2 --module tnl_training.pretrain --config configs/train/demo-cpu.yaml": "ci",
    "tnl info configs/model/minimax-text-01.json": "tests/ecosystem/test_cli.py::test_info_on_the_minimax_config",
    "tnl info": "tests/ecosystem/test_cli.py::test_info_on_a_model_directory",
    "tnl generate MODEL_DIR --prompt": "tests/ecosystem/test_cli.py::test_generate_streams_tokens_as_they_are_produced",
    "tnl generate MODEL_DIR --token-ids": "tests/ecosystem/test_cli.py::test_generate_with_raw_token_ids_needs_no_tokenizer",
    "tnl generate MODEL_DIR --context-file":
        "tests/ecosystem/test_cli.py::test_context_snapshot_round_trip_answers_like_the_whole_prompt",
    "tnl generate MODEL_DIR --load-context":
        "tests/ecosystem/test_cli.py::test_context_snapshot_round_trip_answers_like_the_whole_prompt",
    "tnl info MODEL_DIR_OR_CONFIG.json --context-length":
        "tests/ecosystem/test_cli.py::test_info_prints_the_snapshot_size_for_a_context_length",
    "tnl convert": "tests/ecosystem/test_cli.py::test_convert_is_the_real_entry_point",
    "tnl convert to-gguf": "tests/ecosystem/test_gguf.py::test_llama_cpp_computes_the_same_model",
    "tnl eval MODEL_DIR --tasks": "tests/ecosystem/test_lm_eval.py::test_tnl_eval_runs_lm_eval_on_a_model_directory",
    "tnl train": "tests/ecosystem/test_cli.py::test_forwarding_subcommands",
    "tnl export": "tests/ecosystem/test_cli.py::test_forwarding_subcommands",
    "deepspeed --num_gpus N --module tnl_training.pretrain": "tests/training/test_distributed.py::test_zero3_loss_falls",
    "deepspeed --num_gpus 8 --module tnl_training.pretrain --config configs/train/long-context-sp.yaml":
        "tests/training/test_sequence_parallel_training.py::test_the_long_context_recipe_is_a_valid_sequence_parallel_run",
    "python -m tnl_training.pretrain": "tests/training/test_distributed.py::test_kill_and_resume_replays_the_same_losses",
    "python -m tnl_training.export": "tests/training/test_distributed.py::test_zero2_loss_falls_and_export_loads",
    "python -m tnl_training.tokenizer": "tests/training/test_tokenizer.py::test_cli_reads_ids_from_model_config",
    "python -m tnl_training.data": "tests/training/test_data.py::test_data_cli_writes_the_same_shards_as_the_library",
    "python -m tnl_model.convert from-minimax": "tests/model/test_minimax_parity.py::test_from_minimax_gives_the_same_logits",
    "python -m tnl_model.convert to-minimax":
        "tests/model/test_minimax_parity.py::test_to_minimax_loads_in_transformers_with_the_same_logits",
    "python benchmarks/bench_vs_minimax.py": "tests/test_benchmarks.py::test_bench_vs_minimax_quick",
    "python benchmarks/bench_long_context.py": "tests/test_benchmarks.py::test_bench_long_context_small",
    "python benchmarks/bench_lightning_attn.py": "tests/test_benchmarks.py::test_bench_lightning_attn_cpu_smoke",
    "python benchmarks/bench_tokenize.py": "tests/test_benchmarks.py::test_bench_tokenize_quick",
    "python benchmarks/bench_speculative.py": "tests/test_benchmarks.py::test_bench_speculative_quick",
}
COMMAND_START = ("make ", "tnl ", "python -m ", "python benchmarks/", "deepspeed ", ".venv/bin/")


def _blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def readme_commands() -> list[str]:
    """Every command line of the bash blocks, and inline `code` that starts like a command."""
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    for span in re.findall(r"`([^`\n]+)`", README):
        if span.startswith(COMMAND_START):
            commands.append(span)
    return commands


def _covering(command):
    matches = [prefix for prefix in COVERAGE if command.startswith(prefix)]
    return max(matches, key=len) if matches else None


def test_every_readme_command_is_exercised():
    commands = readme_commands()
    assert len(commands) >= 20
    missing = [c for c in commands if _covering(c) is None]
    assert not missing, f"README commands with no test or CI step (add one, then list it in COVERAGE): {missing}"
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    for prefix in {_covering(c) for c in commands}:
        where = COVERAGE[prefix]
        if where == "ci":
            make_target = prefix if prefix.startswith("make ") else "make demo"  # the spelled-out demo command
            assert make_target in ci, f"{prefix!r} is said to run in CI but .ci/run does not run it"
            continue
        path, test = where.split("::")
        tree = ast.parse((REPO / path).read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert test in names, f"{prefix!r}: {where} does not exist"
    makefile = (REPO / "Makefile").read_text()
    assert "--module tnl_training.pretrain --config configs/train/demo-cpu.yaml" in makefile  # = make demo


def test_python_examples_run_as_written(tmp_path):
    blocks = _blocks("python")
    assert len(blocks) >= 2
    (tmp_path / "configs").symlink_to(REPO / "configs")  # the examples use repo-relative paths
    for block in blocks:
        proc = subprocess.run([sys.executable, "-c", block], cwd=str(tmp_path), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, f"README example failed:\n{block}\n{proc.stderr[-3000:]}"
