"""The loading checks live in one module that imports the config only: no import cycle with modeling_tnl,
one pickle refusal message for every reader, and expected shapes from the registered model classes."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tnl_model  # noqa: F401
from tnl_model.checkpoint_io import CheckpointError, SafetensorsDirectory
from tnl_model.load_checks import expected_shapes, load_model, verify_checkpoint
from tnl_model.testing import build_model, tiny_config

PACKAGE = Path(tnl_model.__file__).resolve().parent
CHECK_MODULES = ("load_checks", "checkpoint_io", "configuration_tnl")


def test_load_checks_and_config_import_without_modeling_tnl():
    """In a fresh interpreter, with the package's own __init__ (which imports the model) kept out of the way,
    importing the loading checks and the config must not import modeling_tnl: no cycle through it."""
    code = f"""
import sys, types
package = types.ModuleType("tnl_model")
package.__path__ = [{str(PACKAGE)!r}]
sys.modules["tnl_model"] = package
import tnl_model.configuration_tnl, tnl_model.load_checks, tnl_model.checkpoint_io
loaded = sorted(name for name in sys.modules if name.startswith("tnl_model."))
assert "tnl_model.modeling_tnl" not in sys.modules, loaded
print(loaded)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(sorted(f"tnl_model.{name}" for name in CHECK_MODULES))


@pytest.mark.parametrize("module", CHECK_MODULES)
def test_no_deferred_import_of_the_model_either(module):
    """A function-level ``from .modeling_tnl import ...`` (or of the package, which imports it) would be the
    same cycle at call time; the checks module may import the config, and checkpoint_io the checks."""
    allowed = {"load_checks": {"configuration_tnl"}, "checkpoint_io": {"load_checks"}, "configuration_tnl": set()}
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    own = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            own.add(node.module or "<package>")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [alias.name for alias in node.names]
            own.update(name.split(".", 1)[1] if "." in name else "<package>" for name in names
                       if name.split(".")[0] == "tnl_model")
    assert own <= allowed[module], f"{module} imports {sorted(own - allowed[module])}"


@pytest.fixture()
def pickle_only_dir(tmp_path):
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    tiny_config().save_pretrained(tmp_path)
    (tmp_path / "training_args.bin").write_bytes(b"not weights")  # Trainer's file: never named as weights
    return tmp_path


def test_one_pickle_refusal_message_for_every_reader(pickle_only_dir):
    messages = set()
    for read in (SafetensorsDirectory, verify_checkpoint, load_model):
        with pytest.raises(CheckpointError, match=r"only has pickle weights \(pytorch_model\.bin\); unpickling can "
                                                  r"run arbitrary code, so they are refused.*allow_pickle=True") as err:
            read(pickle_only_dir)
        messages.add(str(err.value))
    assert len(messages) == 1, messages


def test_expected_shapes_are_the_registered_models_state_dict():
    config = tiny_config(shared_intermediate_size=16)
    model = build_model(config)
    assert expected_shapes(config) == {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert expected_shapes(config, base_model=True) == {name: tuple(t.shape)
                                                        for name, t in model.model.state_dict().items()}
    tied = tiny_config(tie_word_embeddings=True)
    assert "lm_head.weight" not in expected_shapes(tied)


def test_mismatches_are_listed_before_loading_when_a_dtype_is_given(tmp_path):
    """``dtype`` is from_pretrained's own argument, not a config override: the header check still runs first."""
    from tnl_model.load_checks import CheckpointMismatchError

    build_model(tiny_config()).save_pretrained(tmp_path)
    config = tmp_path / "config.json"
    config.write_text(config.read_text().replace('"num_local_experts": 4', '"num_local_experts": 6'))
    with pytest.raises(CheckpointMismatchError, match=r"9 tensor\(s\) have a different shape"):
        load_model(tmp_path, dtype=torch.bfloat16)
