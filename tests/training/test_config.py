"""Run config: YAML + typed overrides + clear errors; DeepSpeed JSON injection; lr schedules."""

import json
from pathlib import Path

import pytest

from tnl_training.config import ConfigError, RunConfig, apply_overrides, load_config
from tnl_training.pretrain import build_deepspeed_config, lr_lambda, parse_args

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["demo-cpu", "small-gpu", "zero3-multinode"])
def test_shipped_recipes_load(name):
    cfg = load_config(REPO / "configs" / "train" / f"{name}.yaml")
    assert isinstance(cfg, RunConfig)
    assert (REPO / cfg.model_config).is_file()
    assert (REPO / cfg.deepspeed_config).is_file()
    build_deepspeed_config(cfg, REPO / cfg.deepspeed_config, world_size=4)


def test_required_override_names():
    cfg = load_config(REPO / "configs/train/demo-cpu.yaml",
                      ["max_steps=7", "zero_stage=3", "output_dir=/tmp/x", "model_config=configs/model/tiny.json",
                       "seed=3", "optimizer.lr=1e-3", "data.val_files=[a.txt,b.txt]", "bf16=true"])
    assert (cfg.max_steps, cfg.zero_stage, cfg.output_dir, cfg.seed) == (7, 3, "/tmp/x", 3)
    assert cfg.model_config == "configs/model/tiny.json"
    assert cfg.optimizer.lr == 1e-3 and isinstance(cfg.optimizer.lr, float)
    assert cfg.data.val_files == ["a.txt", "b.txt"] and cfg.bf16 is True


def test_unknown_key_is_named_with_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'max_step'.*max_steps"):
        load_config(None, ["max_step=3", "data.text_files=[x]"])
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer.learning_rate'"):
        load_config(None, ["optimizer.learning_rate=3", "data.text_files=[x]"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("seq_len: 64\nmicro_batchsize: 2\ndata: {text_files: [a]}\n")
    with pytest.raises(ConfigError, match="micro_batchsize.*micro_batch_size"):
        load_config(bad)


@pytest.mark.parametrize("override, message", [
    ("max_steps=ten", "max_steps: expected int or null"),
    ("zero_stage=2.5", "zero_stage: expected int"),
    ("bf16=maybe", "bf16: expected bool"),
    ("optimizer=3", "optimizer is a section"),
    ("zero_stage=5", "zero_stage must be 0, 1, 2 or 3"),
    ("seq_len=0", "seq_len must be a positive integer"),
    ("max_consecutive_nonfinite=0", "max_consecutive_nonfinite must be a positive integer"),
    ("optimizer.schedule=linear", "optimizer.schedule must be"),
    ("noequals", "not of the form key=value"),
    ("compile=true compile_backend=inductr", "compile_backend must be a torch.compile backend .*inductor"),
])
def test_wrong_values_are_clear(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.text_files=[x]", *override.split()])


def test_cli_flags_and_local_rank():
    args, overrides = parse_args(["--local_rank=1", "--config", "c.yaml", "max_steps=3", "--resume"])
    assert args.config == "c.yaml" and overrides == ["max_steps=3", "resume=latest"]
    _, overrides = parse_args(["--config", "c.yaml", "--resume", "step10"])
    assert overrides == ["resume=step10"]


def test_deepspeed_json_gets_batch_sizes_from_run_config(tmp_path):
    cfg = load_config(None, ["data.text_files=[x]", "micro_batch_size=3", "gradient_accumulation_steps=5",
                             "zero_stage=3", "grad_clip=0.5", "bf16=true", "cpu_offload=true"])
    ds = build_deepspeed_config(cfg, REPO / "configs/deepspeed/engine.json", world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 60 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    clash = tmp_path / "ds.json"
    clash.write_text(json.dumps({"train_batch_size": 8, "zero_optimization": {"stage": 1}}))
    with pytest.raises(ConfigError, match="train_batch_size, zero_optimization.stage"):
        build_deepspeed_config(cfg, clash, world_size=1)


def test_token_budget_sets_steps():
    cfg = load_config(None, ["data.text_files=[x]", "max_steps=null", "max_tokens=10000", "seq_len=100",
                             "micro_batch_size=4"])
    assert cfg.total_steps(world_size=2) == 13  # ceil(10000 / (4 * 2 * 100))
    with pytest.raises(ConfigError, match="max_steps or max_tokens"):
        load_config(None, ["data.text_files=[x]", "max_steps=null"])


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_lr_schedules(schedule):
    cfg = apply_overrides(RunConfig(), [f"optimizer.schedule={schedule}", "optimizer.warmup_steps=10",
                                        "optimizer.min_lr_ratio=0.1", "optimizer.decay_fraction=0.2"])
    fn = lr_lambda(cfg, total_steps=100)
    values = [fn(s) for s in range(101)]
    assert values[0] < values[5] < values[9] <= 1.0  # warmup rises
    # transformers' warmup: step / warmup_steps (WSD: from min_lr_ratio), so the first step runs at lr 0
    floor = 0.1 if schedule == "wsd" else 0.0
    assert values[0] == pytest.approx(floor) and values[5] == pytest.approx(floor + (1 - floor) * 5 / 10)
    assert values[10] == pytest.approx(1.0) and max(values) == pytest.approx(1.0)
    if schedule == "cosine":
        assert values[55] < values[30] and values[100] == pytest.approx(0.1)
    elif schedule == "wsd":
        assert values[50] == 1.0 and values[79] == 1.0 and values[90] < 1.0 and values[100] == pytest.approx(0.1)
    else:
        assert values[100] == 1.0


def test_max_tokens_must_agree_with_max_steps(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    base = ["data.text_files=[x]", "max_tokens=10000", "seq_len=100", "micro_batch_size=4"]
    # max_steps keeps its default (1000): the budget (25 steps) is not silently ignored
    with pytest.raises(ConfigError, match=r"max_steps=1000 and max_tokens=10000 disagree: max_tokens is 25 steps"):
        load_config(None, base)
    with pytest.raises(ConfigError, match=r"max_steps=24 and max_tokens=10000 disagree"):
        load_config(None, [*base, "max_steps=24"])
    assert load_config(None, [*base, "max_steps=25"]).total_steps(world_size=1) == 25  # they agree
    assert load_config(None, [*base, "max_steps=null"]).total_steps(world_size=1) == 25
    monkeypatch.setenv("WORLD_SIZE", "5")  # as the launcher sets it: 5 x 4 x 100 tokens per step
    assert load_config(None, [*base, "max_steps=5"]).total_steps(world_size=5) == 5
    with pytest.raises(ConfigError, match="max_steps=25 and max_tokens=10000 disagree"):
        load_config(None, [*base, "max_steps=25"])


@pytest.mark.parametrize("override, expected", [
    ("data.val_files=[*_val.txt]", ["*_val.txt"]),  # "*" starts a YAML alias
    ("data.val_files=[*_val.txt, b.txt]", ["*_val.txt", "b.txt"]),
    ("data.val_files=[a.txt,*_val.txt]", ["a.txt", "*_val.txt"]),
    ("data.val_files=[*_val.txt, 'c d.txt']", ["*_val.txt", "c d.txt"]),
    ("data.val_files=*_val.txt", ["*_val.txt"]),
    ("data.text_files=[&x.txt]", ["&x.txt"]),  # "&" starts a YAML anchor
])
def test_list_override_with_yaml_alias_characters(override, expected):
    cfg = load_config(None, ["data.text_files=[x]", override])
    key = override.split("=", 1)[0].split(".")[1]
    assert getattr(cfg.data, key) == expected


@pytest.mark.parametrize("override, message", [
    ("data.val_files=[*a.txt,,b.txt]", "data.val_files: the list .* has an empty item"),
    ("data.val_files={*a: 1}", r"data.val_files: cannot read '\{\*a: 1\}'"),
])
def test_unreadable_list_override_is_an_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.text_files=[x]", override])
