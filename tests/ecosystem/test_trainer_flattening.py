"""transformers.Trainer with DataCollatorWithFlattening (padding-free packed batches) on CPU: every
layer sees the sequence boundaries (one cu_seqlens per batch, from the restarting positions), no
cache is built, and training runs."""

import math

import pytest
import torch

from tnl_model.testing import build_model, random_ids, tiny_config

pytest.importorskip("accelerate")


def test_trainer_with_flattening_collator_keeps_sequences_apart(tmp_path):
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    model = build_model(tiny_config()).train()
    lengths = [12, 30, 7, 25, 16, 9, 21, 14]
    data = [{"input_ids": random_ids(1, n, seed=i)[0].tolist()} for i, n in enumerate(lengths)]
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs.get("cu_seqlens"))

    model.model.layers[0].self_attn.register_forward_pre_hook(record, with_kwargs=True)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
                             logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
                             dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorWithFlattening())
    trainer.train()
    assert len(seen) == 2 and all(bounds is not None and bounds.numel() == 5 for bounds in seen)  # 4 per batch
    # the two shuffled batches together hold every sequence once, each cut at its own length
    assert sorted(int(n) for bounds in seen for n in bounds.diff()) == sorted(lengths)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert torch.isfinite(next(model.parameters())).all()
