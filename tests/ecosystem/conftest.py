"""Shared fixtures for the ecosystem tests: a tiny saved TNL model with a tiny word-level tokenizer."""

import pytest

WORDS = ("the a one two three cat dog bird fish sat ran flew swam on in under over mat log tree pond "
         "and then it was big small red blue green happy sad quick slow day night sun moon star sky").split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3, matching tiny_config's pad 0 / bos 1 / eos 2


def build_tokenizer():
    """A word-level fast tokenizer with ids < 97 (the tiny config's vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    assert len(vocab) <= 97
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def saved_model_dir(tmp_path_factory):
    """A tiny random TNL model saved with ``save_pretrained`` plus the tiny tokenizer.

    No EOS token, so a random model's generation always runs to max_new_tokens.
    """
    from tnl_model.testing import build_model, tiny_config

    directory = tmp_path_factory.mktemp("tiny_model")
    build_model(tiny_config(eos_token_id=None), seed=0).save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return directory
