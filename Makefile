# The two commands of the README quick start. Each creates .venv on first use.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.tnl-installed

.PHONY: demo quickstart test env deps-report clean

$(STAMP): setup.py scripts/setup_env.sh
	PYTHON=$(PYTHON) bash scripts/setup_env.sh $(VENV)
	touch $(STAMP)

env: $(STAMP)

# Prepare Shakespeare + tokenizer, pretrain with DeepSpeed ZeRO-2 on 2 CPU processes, export, generate.
demo: $(STAMP)
	$(BIN)/deepspeed --num_gpus 2 --module tnl_training.pretrain --config configs/train/demo-cpu.yaml

# Build a model from configs/model/small.json, save, reload with AutoModelForCausalLM, generate.
quickstart: $(STAMP)
	$(BIN)/python -m tnl_model.quickstart

test: $(STAMP)
	$(BIN)/python -m pytest

# The resolved versions of torch, triton, transformers, kernels, deepspeed, ... (CI prints them first).
deps-report: $(STAMP)
	$(BIN)/python scripts/deps_report.py

clean:
	rm -rf $(VENV) .pytest_cache runs
