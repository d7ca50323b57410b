"""Packaging contracts of DESIGN.md section 1.

Installing tnl-model must not make ``import kernels`` or ``import training`` find
our folders (Hugging Face ships a ``kernels`` distribution that transformers
imports), and the wheel must contain every subpackage under its mapped name.
"""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["kernels", "training"])
def test_generic_names_do_not_resolve_to_our_folders(name, tmp_path):
    probe = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.find_spec({name!r})\n"
        "print(spec.origin if spec and spec.origin else (list(spec.submodule_search_locations) if spec else None))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    location = result.stdout.strip()
    assert str(REPO / name) not in location, f"`import {name}` resolves to our folder: {location}"


def test_import_names_resolve_to_the_mapped_folders(tmp_path):
    probe = "import tnl_kernels, tnl_model, tnl_training; print(tnl_kernels.__file__, tnl_training.__file__)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    kernels_file, training_file = result.stdout.split()
    assert Path(kernels_file).parent.name in ("kernels", "tnl_kernels")
    assert Path(training_file).parent.name in ("training", "tnl_training")


def test_wheel_contains_every_subpackage_under_its_import_name(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("tnl_model-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_levels = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_levels == {"tnl_model", "tnl_kernels", "tnl_training"}
    for folder, package in (("kernels", "tnl_kernels"), ("training", "tnl_training"), ("tnl_model", "tnl_model")):
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.relative_to(REPO / folder).as_posix()
            assert f"{package}/{relative}" in names, f"{package}/{relative} missing from the wheel"
    assert "tnl_model/convert.py" in names and "tnl_kernels/reference.py" in names
