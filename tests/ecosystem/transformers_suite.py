"""transformers' own common model tests, fetched for the installed transformers version.

The transformers source distribution on PyPI ships ``tests/test_modeling_common.py`` (with
``ModelTesterMixin``) for each release. :func:`common_tests_module` downloads the sdist that matches
the installed transformers once (``pip download --no-binary :all:``), keeps only that file in a cache
folder, and imports it as a package. The sdist lacks two modules the file imports for its other
mixins (``generation/test_utils.py`` with ``GenerationTesterMixin`` and ``exporters/test_export.py``
with ``ExportTesterMixin``); empty stand-ins written here take their place, and this project's own
tests cover what ``GenerationTesterMixin`` would (tests/model/test_generation.py,
test_cache_conformance.py, test_speculative.py).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

PACKAGE = "transformers_common_tests"
STAND_INS = {
    "generation/test_utils.py": "class GenerationTesterMixin:\n    \"\"\"Stand-in: not shipped in the sdist.\"\"\"\n",
    "exporters/test_export.py": "class ExportTesterMixin:\n    \"\"\"Stand-in: not shipped in the sdist.\"\"\"\n",
}


def cache_root() -> Path:
    """Next to the environment (``.venv/share/...``), so it is kept as long as the environment is."""
    return Path(sys.prefix) / "share" / "tnl-model" / f"transformers-{transformers.__version__}"


def _download(root: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "-d", tmp, f"transformers=={transformers.__version__}"], check=True, capture_output=True,
                       timeout=600)
        (archive,) = Path(tmp).glob("transformers-*.tar.gz")
        with tarfile.open(archive) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("/tests/test_modeling_common.py"))
            source = tar.extractfile(member).read()
    package = root / PACKAGE
    for relative, text in STAND_INS.items():
        (package / relative).parent.mkdir(parents=True, exist_ok=True)
        (package / relative).write_text(text)
        (package / relative).with_name("__init__.py").touch()
    (package / "__init__.py").touch()
    (package / "test_modeling_common.py").write_bytes(source)


def common_tests_module():
    """The ``test_modeling_common`` module of the installed transformers version."""
    root = cache_root()
    if not (root / PACKAGE / "test_modeling_common.py").exists():
        root.mkdir(parents=True, exist_ok=True)
        _download(root)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(f"{PACKAGE}.test_modeling_common")
