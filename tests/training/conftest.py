"""Fixtures for the training tests. Tests never download: the corpus is written into tmp dirs."""

import pytest

from tnl_training.testing import TINY, write_corpus, write_run_config


@pytest.fixture(scope="session")
def prepared_corpus(tmp_path_factory):
    """A corpus, tokenizer and shards prepared once for the session (root directory returned)."""
    from tnl_training.config import load_config
    from tnl_training.prepare import preflight

    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root / "texts")
    cfg_path = write_run_config(root / "run.yaml", root)
    preflight(load_config(cfg_path), cfg_path, log=lambda m: None)
    return root


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A 512-piece sentencepiece tokenizer trained on a small generated corpus."""
    from tnl_training.tokenizer import special_ids_from_model_config, train_tokenizer

    root = tmp_path_factory.mktemp("tok")
    files = write_corpus(root / "texts", n_docs=3)
    train_tokenizer(files, root / "tok", 512, special_ids_from_model_config(TINY))
    return root / "tok"
