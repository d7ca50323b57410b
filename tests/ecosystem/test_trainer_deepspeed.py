"""transformers.Trainer + DeepSpeed ZeRO-3 (configs/deepspeed/zero3.json, HF-style "auto" values)
fine-tunes a saved TNL model on CPU with 2 processes (gloo); the loss falls and the saved model
reloads through AutoModelForCausalLM with a lower loss than before training."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tnl_model.testing import build_model, tiny_config

pytest.importorskip("deepspeed")
pytest.importorskip("accelerate")

ZERO3 = Path(__file__).resolve().parents[2] / "configs" / "deepspeed" / "zero3.json"

SCRIPT = r'''
import json, os, sys
import torch
import tnl_model  # noqa: F401
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

model_dir, ds_config, out = sys.argv[1:4]
# accelerate only picks a process-group backend for DeepSpeed when a GPU is present; on a CPU-only
# machine, set up the state with gloo first and let TrainingArguments reuse it.
if not torch.cuda.is_available():
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    from accelerate import PartialState
    PartialState(backend="gloo")
    extra = dict(accelerator_config={"use_configured_state": True})
else:
    extra = {}
args = TrainingArguments(output_dir=out, deepspeed=ds_config, per_device_train_batch_size=2, max_steps=8,
                         learning_rate=5e-3, warmup_steps=1, logging_steps=1, save_strategy="no", report_to=[],
                         disable_tqdm=True, seed=0, dataloader_num_workers=0, **extra)
model = AutoModelForCausalLM.from_pretrained(model_dir)  # built partitioned under zero.Init
data = [json.loads(line) for line in open(os.path.join(model_dir, "train.jsonl"))]
trainer = Trainer(model=model, args=args, train_dataset=data)
trainer.train()
trainer.save_model(os.path.join(out, "final"))  # gathers the 16-bit/fp32 weights on rank 0
if trainer.args.process_index == 0:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    partitioned = hasattr(next(trainer.model.parameters()), "ds_id")
    json.dump({"losses": losses, "world_size": trainer.args.world_size, "partitioned": partitioned,
               "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage},
              open(os.path.join(out, "result.json"), "w"))
torch.distributed.barrier()
torch.distributed.destroy_process_group()
# Results are on disk; skip interpreter teardown, where a native thread of the CPU collectives
# occasionally aborts the process ("terminate called without an active exception").
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
'''


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dataset(count=32, length=24):
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(count):  # "count by 3" from a random start: learnable in a few steps
        start = int(torch.randint(3, 30, (1,), generator=generator))
        ids = [(start + 3 * t) % 90 + 3 for t in range(length)]
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def _mean_loss(model, rows):
    with torch.no_grad():
        ids = torch.tensor([row["input_ids"] for row in rows])
        return model(ids, labels=ids).lm_loss.item()


def test_zero3_config_uses_hf_auto_values():
    config = json.loads(ZERO3.read_text())
    assert config["zero_optimization"]["stage"] == 3
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        assert config[key] == "auto"
    assert config["optimizer"]["params"]["lr"] == "auto"


@pytest.mark.slow
def test_trainer_with_deepspeed_zero3_fine_tunes_on_cpu(tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir, out = tmp_path / "model", tmp_path / "out"
    config = tiny_config(shared_intermediate_size=16)
    build_model(config, seed=0).save_pretrained(model_dir)
    rows = _dataset()
    (model_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "train_script.py").write_text(SCRIPT)
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    assert torchrun, "torchrun not found"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "MASTER_ADDR": "127.0.0.1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), str(tmp_path / "train_script.py"),
           str(model_dir), str(ZERO3), str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    result = json.loads((out / "result.json").read_text())
    print(result)
    assert result["world_size"] == 2 and result["zero_stage"] == 3 and result["partitioned"]
    losses = result["losses"]
    assert len(losses) == 8 and all(l == l for l in losses)
    assert losses[-1] < losses[0] - 0.5, losses

    before = AutoModelForCausalLM.from_pretrained(model_dir)
    after = AutoModelForCausalLM.from_pretrained(out / "final")
    assert after.config.num_local_experts == config.num_local_experts
    assert _mean_loss(after, rows) < _mean_loss(before, rows) - 0.5
