"""Helpers for the training tests (and for trying the pipeline by hand): a small synthetic
corpus, run-config files for the tiny model, and the DeepSpeed launch command on CPU.
``REPO`` is the source checkout this package is installed from (editable install)."""

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "model" / "tiny.json"
ENGINE = REPO / "configs" / "deepspeed" / "engine.json"

_NAMES = ["Orsino", "Viola", "Malvolio", "Olivia", "Feste", "Toby", "Maria", "Antonio"]
_VERBS = ["loves", "mocks", "follows", "greets", "serves", "fears", "praises", "wrongs"]
_THINGS = ["the duke", "the sea", "a letter", "the ring", "my lady", "the fool", "his sword", "the night"]


def write_corpus(directory: Path, n_docs: int = 10, lines: int = 120, seed: int = 0) -> list[Path]:
    """Plain-text documents with a simple grammar, so a tiny model's loss visibly falls."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for d in range(n_docs):
        out = []
        for _ in range(lines):
            who = rng.choice(_NAMES)
            out.append(f"{who.upper()}. {rng.choice(_NAMES)} {rng.choice(_VERBS)} {rng.choice(_THINGS)}, "
                       f"and {rng.choice(_THINGS)} {rng.choice(_VERBS)} {who}.")
        path = directory / f"play{d:02d}.txt"
        path.write_text("\n".join(out) + "\n")
        files.append(path)
    return files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_env() -> dict:
    env = dict(os.environ)
    env["DS_ACCELERATOR"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def launch_cmd(nproc: int, args: list[str], module: str | None = "tnl_training.pretrain") -> list[str]:
    """``deepspeed --num_gpus N --master_port P --module tnl_training.pretrain ARGS`` (the documented launch;
    ``module=None``: ARGS start with a script path). A free port keeps concurrent runs apart."""
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
                "--master_port", str(free_port())]
    return launcher + (["--module", module] if module else []) + list(args)


def run_training(nproc: int, args: list[str], timeout: int = 300, log: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(launch_cmd(nproc, args), env=run_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=str(REPO))
    if log is not None:
        log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    return proc


def write_run_config(path: Path, root: Path, **fields) -> Path:
    import yaml

    cfg = {
        "model_config": str(TINY),
        "output_dir": str(root / "run"),
        "deepspeed_config": str(ENGINE),
        "tokenizer": {"path": str(root / "tokenizer")},
        "data": {"text_files": [str(root / "texts" / "*.txt")], "shard_dir": str(root / "shards"),
                 "val_fraction": 0.2},
        "seq_len": 32,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 30,
        "optimizer": {"lr": 3.0e-3, "warmup_steps": 3, "schedule": "cosine"},
        "zero_stage": 2,
        "log_interval": 5,
        "eval_interval": 15,
        "eval_batches": 2,
        "checkpoint_interval": 10,
        "keep_checkpoints": 5,
        "seed": 7,
    }
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path




def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
