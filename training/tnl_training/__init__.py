"""tnl_training: DeepSpeed ZeRO pretraining of TNL models (DESIGN.md section 2)."""

# Entry points (run as modules, from any directory):
#   python -m tnl_training.tokenizer   train a sentencepiece tokenizer -> AutoTokenizer directory
#   python -m tnl_training.data        tokenize text/JSONL into checksummed memory-mapped shards
#   python -m tnl_training.corpus      fetch and cache the Shakespeare demo corpus
#   deepspeed --num_gpus N --module tnl_training.pretrain --config configs/train/<name>.yaml [key=value ...]
#   python -m tnl_training.export CKPT DST
# Submodules import torch / transformers / deepspeed lazily, so importing the package is cheap.

__all__ = ["config", "corpus", "data", "export", "metrics", "prepare", "pretrain", "tokenizer"]
