"""Packaging contracts of DESIGN.md section 1.

No folder at the repo root may be a regular package named after another distribution:
transformers >= 5.25 requires Hugging Face's ``kernels`` distribution, and Python puts the
current directory first on ``sys.path`` for ``python -c``, ``python -m`` (so ``python -m
pytest``), notebooks and setuptools builds. Each check runs in a subprocess whose working
directory is the repo root, the place a user's shell stands in; the wheel must hold exactly
our three import packages with every subpackage.
"""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IMPORT_PACKAGES = {"tnl_model": REPO / "tnl_model", "tnl_kernels": REPO / "kernels" / "tnl_kernels",
                   "tnl_training": REPO / "training" / "tnl_training"}


def _run_from_root(*args, timeout=300):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} failed from the repo root:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}"
    return proc.stdout


def test_no_root_folder_is_a_regular_package():
    for folder in ("kernels", "training"):
        assert not (REPO / folder / "__init__.py").exists(), f"{folder}/__init__.py makes the root folder a package"


def test_imports_from_the_repo_root_find_hugging_faces_kernels():
    out = _run_from_root("-c", "import tnl_model, tnl_kernels, tnl_training, kernels\n"
                               "print(kernels.__file__)\n"
                               "print(tnl_kernels.__file__); print(tnl_training.__file__)")
    kernels_file, kernels_ours, training_ours = out.split()
    assert kernels_file != "None" and not Path(kernels_file).is_relative_to(REPO / "kernels"), (
        f"`import kernels` from the repo root found {kernels_file}, not Hugging Face's installed package")
    assert Path(kernels_ours).parent == IMPORT_PACKAGES["tnl_kernels"]
    assert Path(training_ours).parent == IMPORT_PACKAGES["tnl_training"]


def test_transformers_hub_kernels_import_from_the_repo_root():
    # transformers' own integration imports names from `kernels` (what failed with our folder first on sys.path).
    _run_from_root("-c", "from transformers.integrations import hub_kernels\n"
                         "import kernels; assert hasattr(kernels, 'kernelize'), kernels.__file__")


@pytest.mark.parametrize("module_args", [
    ["tnl_model.cli", "info", "configs/model/tiny.json"],
    ["tnl_training.pretrain", "--help"],
    ["tnl_model.convert", "--help"],
])
def test_module_runs_from_the_repo_root(module_args):
    _run_from_root("-m", *module_args)


def test_wheel_contains_exactly_our_packages_built_from_the_root(tmp_path):
    _run_from_root("-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), ".")
    wheel = next(tmp_path.glob("tnl_model-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_levels = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_levels == set(IMPORT_PACKAGES)
    for package, folder in IMPORT_PACKAGES.items():
        for source in folder.rglob("*.py"):
            relative = source.relative_to(folder).as_posix()
            assert f"{package}/{relative}" in names, f"{package}/{relative} missing from the wheel"


def test_editable_install_builds_from_the_root(tmp_path):
    # What `pip install --no-build-isolation -e .` runs, without replacing this environment's own install:
    # setuptools' PEP 660 hooks in this environment, where HF kernels' egg_info writer is registered.
    _run_from_root("-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "--dry-run", "-e", ".")
    _run_from_root("-c", f"from setuptools import build_meta; print(build_meta.build_editable({str(tmp_path)!r}))")
    wheel = next(tmp_path.glob("tnl_model-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".pth") for n in names), names
