"""Dataset loader for the local lm-eval tasks in this folder: reads a jsonl file next to
this module, so the tasks run without any download (``custom_dataset`` in each yaml)."""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_jsonl(file: str, **_metadata):
    """``{"test": Dataset}`` from ``file`` (one JSON object per line); lm-eval also passes the
    task metadata and model arguments as keywords, which are not needed here."""
    import datasets

    rows = [json.loads(line) for line in (HERE / file).read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}
