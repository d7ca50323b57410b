"""Tokenizing a corpus into token shards: throughput and peak memory versus file size.

Generates text files of 10 MB up to ``--max-mb`` (one line each, no newline: the worst case,
one document that can only be cut at spaces), trains a sentencepiece tokenizer on a sample,
and runs ``python -m tnl_training.data`` on each file in a fresh process, reading its peak
resident memory from the kernel (VmHWM). Compared in the same run:

* the tokenizer's own batch encode (``tokenizers.Tokenizer.encode_batch`` on the text already
  cut into 64 KiB pieces, ids only: no reading, splitting, checks or writing) on a 10 MB sample;
* ``--workers 2`` at one size;
* the pipeline as it was before streaming (each file encoded in one call with offsets, the
  corpus held in memory), on the smallest file only (it needs ~250 bytes per input byte).

    python benchmarks/bench_tokenize.py                # 10 MB -> 1 GB (~20 minutes on 2 cores)
    python benchmarks/bench_tokenize.py --max-mb 100   # 10 MB -> 100 MB
    python benchmarks/bench_tokenize.py --quick        # 1 and 3 MB, a smoke run

Targets: peak RSS below 1 GiB at every size; throughput within 1.5x of the tokenizer's own
batch encode. Prints a table and writes ``results/bench_tokenize[_quick].json`` and ``.png``.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import RESULTS, print_table, save_results  # noqa: E402

SYLLABLES = ["ka", "lo", "ren", "mi", "sa", "tor", "vel", "qui", "an", "de", "ul", "pha", "stro", "ny", "e",
             "caf\u00e9", "\u00fcber", "\u4e2d", "\u6587", "\u2603"]
PUNCT = ["", "", "", "", ",", ".", ";", "!", "?"]
BLOCK_BYTES = 1 << 20
DISTINCT_BLOCKS = 32


def make_vocabulary(rng: random.Random, n_words: int = 20000) -> tuple[list[str], list[float]]:
    """Pseudo-words of 1-4 syllables with Zipf frequencies, so subword pieces and the tokenizer's
    word cache behave as on natural text rather than on a handful of repeated words."""
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))) for _ in range(n_words)]
    weights = [1.0 / (rank + 1) for rank in range(n_words)]
    return words, weights


def make_blocks(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words, weights = make_vocabulary(rng)
    blocks = []
    for _ in range(DISTINCT_BLOCKS):
        parts, size = [], 0
        while size < BLOCK_BYTES:
            chosen = rng.choices(words, weights, k=4096)
            text = " ".join(w + rng.choice(PUNCT) for w in chosen) + " "
            parts.append(text)
            size += len(text.encode())
        blocks.append("".join(parts))
    return blocks


def write_text(path: Path, megabytes: int, blocks: list[str], seed: int) -> int:
    """``megabytes`` MB on one line: the distinct blocks in a random order, repeated as needed."""
    rng = random.Random(seed)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < megabytes * 10**6:
            block = blocks[rng.randrange(len(blocks))]
            f.write(block)
            written += len(block.encode())
    return written


PEAK_RSS = r"""
import runpy, sys
def peak_rss_mib():  # VmHWM: the high-water mark of this process since exec (ru_maxrss also counts what a
    for line in open("/proc/self/status"):  # child inherits from its parent at fork)
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
try:
    if sys.argv[1] == "-m":
        sys.argv = sys.argv[2:]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        code, sys.argv = sys.argv[2], sys.argv[2:]
        exec(compile(code, "<bench>", "exec"), {"__name__": "__main__"})
finally:
    print(f"\nPEAK_RSS_MIB {peak_rss_mib()}", file=sys.stderr)
"""


def run_measured(args: list[str], env=None) -> dict:
    """Run ``python ARGS`` (``-m module ...`` or ``-c code ...``) in a fresh process; its wall time and
    peak resident memory (VmHWM, read by the process itself as it ends)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, *args], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    peak = float(proc.stderr.rsplit("PEAK_RSS_MIB", 1)[1])
    return {"seconds": seconds, "peak_rss_mib": peak, "stdout": proc.stdout}


BASELINE_SCRIPT = r"""
import json, resource, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1] + "/tokenizer.json")
tok.no_truncation(); tok.no_padding()
text = open(sys.argv[2], encoding="utf-8").read()
pieces, i, n = [], 0, len(text)
while i < n:  # 64 KiB pieces cut at spaces, as the pipeline cuts them
    j = text.rfind(" ", i + 32768, i + 65536) if n - i > 65536 else n
    j = i + 65536 if j <= i else j
    pieces.append(text[i:j]); i = j + (j < n and text[j] == " ")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
tokens = 0
for b in range(0, len(pieces), 16):
    tokens += sum(len(e.ids) for e in tok.encode_batch(pieces[b:b + 16], add_special_tokens=False))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "tokens": tokens, "chars": n}))
"""

OLD_SCRIPT = r"""
import json, sys, time
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
start = time.perf_counter()
text = open(sys.argv[2], encoding="utf-8", errors="replace").read()
ids = tok([text], add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)["input_ids"][0]
print(json.dumps({"seconds_after_import": time.perf_counter() - start, "tokens": len(ids)}))
"""


def shards_tokens(out_dir: Path) -> int:
    index = json.loads((out_dir / "index.json").read_text())
    return sum(e["tokens"] for split in index["splits"].values() for e in split)


def plot(payload, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["runs"]
    sizes = [r["megabytes"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    axes[0].plot(sizes, [r["mb_per_s"] for r in rows], marker="o", label="python -m tnl_training.data")
    axes[0].axhline(payload["tokenizer_batch_encode"]["mb_per_s"], color="gray", linestyle="--",
                    label="tokenizer's own encode_batch")
    if payload.get("workers_2"):
        w = payload["workers_2"]
        axes[0].plot([w["megabytes"]], [w["mb_per_s"]], marker="s", linestyle="", label="--workers 2")
    axes[0].set_title("throughput (MB of text per second)")
    axes[0].set_ylim(bottom=0)
    axes[1].plot(sizes, [r["peak_rss_mib"] for r in rows], marker="o", label="python -m tnl_training.data")
    if payload.get("before_streaming"):
        b = payload["before_streaming"]
        axes[1].plot([b["megabytes"]], [b["peak_rss_mib"]], marker="x", linestyle="", color="red",
                     label="before: one call per file")
    axes[1].axhline(1024, color="gray", linestyle="--", label="target: 1 GiB")
    axes[1].set_title("peak resident memory (MiB)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("file size (MB, one line)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 and 3 MB: a smoke run")
    parser.add_argument("--max-mb", type=int, default=1000, help="largest file, MB (sizes 10, 30, 100, ...)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--workdir", default=None, help="where to put the generated text (default: a temp dir)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    sizes = [1, 3] if args.quick else [s for s in (10, 30, 100, 300, 1000, 3000) if s <= args.max_mb]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        print("generating text ...", flush=True)
        blocks = make_blocks()
        sample = tmp / "sample.txt"
        sample.write_text("\n".join(line for block in blocks[:4] for line in block.split(". ")), encoding="utf-8")
        from tnl_training.tokenizer import train_tokenizer

        tok_dir = tmp / "tok"
        tok = train_tokenizer([sample], tok_dir, 1024 if args.quick else args.vocab_size)
        vocab = len(tok)
        del tok

        # the tokenizer alone, on the same kind of text
        base_file = tmp / "baseline.txt"
        base_mb = sizes[0]
        base_bytes = write_text(base_file, base_mb, blocks, seed=99)
        baseline = json.loads(run_measured(["-c", BASELINE_SCRIPT, str(tok_dir), str(base_file)],
                                           env)["stdout"])
        baseline["mb_per_s"] = base_bytes / 1e6 / baseline["seconds"]
        baseline["megabytes"] = base_mb
        print(f"tokenizer encode_batch on {base_mb} MB: {baseline['mb_per_s']:.2f} MB/s", flush=True)

        tiny = tmp / "tiny.txt"
        tiny.write_text(blocks[0][:2000], encoding="utf-8")
        startup = run_measured(["-m", "tnl_training.data", str(tiny), "--tokenizer", str(tok_dir),
                                "--out", str(tmp / "shards_tiny"), "--val-fraction", "0"], env)
        print(f"start-up (imports, tokenizer load, a 2 KB file): {startup['seconds']:.1f} s, peak RSS "
              f"{startup['peak_rss_mib']:.0f} MiB", flush=True)

        runs = []
        before = workers_2 = None
        for i, mb in enumerate(sizes):
            text = tmp / f"text_{mb}mb.txt"
            n_bytes = write_text(text, mb, blocks, seed=mb)
            out = tmp / f"shards_{mb}"
            cmd = ["-m", "tnl_training.data", str(text), "--tokenizer", str(tok_dir), "--out", str(out),
                   "--val-fraction", "0"]
            r = run_measured(cmd, env)
            row = {"megabytes": n_bytes / 1e6, "seconds": r["seconds"], "peak_rss_mib": r["peak_rss_mib"],
                   "tokens": shards_tokens(out)}
            # throughput net of the process start-up (imports, tokenizer load), timed on a tiny file
            row["mb_per_s"] = row["megabytes"] / max(1e-3, row["seconds"] - startup["seconds"])
            runs.append(row)
            print(f"{row['megabytes']:8.0f} MB: {row['seconds']:7.1f} s, {row['mb_per_s']:.2f} MB/s, "
                  f"peak RSS {row['peak_rss_mib']:.0f} MiB", flush=True)
            if i == 0 and not args.quick:
                r = run_measured(["-c", OLD_SCRIPT, str(tok_dir), str(text)], env)
                before = {"megabytes": row["megabytes"], "seconds": r["seconds"], "peak_rss_mib": r["peak_rss_mib"]}
                print(f"  before streaming (one call per file): {before['seconds']:.1f} s, peak RSS "
                      f"{before['peak_rss_mib']:.0f} MiB", flush=True)
            if mb == min(100, sizes[-1]):
                r = run_measured(cmd[:-2] + ["--val-fraction", "0", "--workers", "2", "--out", str(out) + "_w2"], env)
                workers_2 = {"megabytes": row["megabytes"], "seconds": r["seconds"],
                             "mb_per_s": row["megabytes"] / max(1e-3, r["seconds"] - startup["seconds"]),
                             "peak_rss_mib_parent": r["peak_rss_mib"],
                             "same_shards": all((out / f.name).read_bytes() == f.read_bytes()
                                                for f in Path(str(out) + "_w2").glob("*.bin"))}
                print(f"  --workers 2: {workers_2['seconds']:.1f} s ({workers_2['mb_per_s']:.2f} MB/s), shards identical: "
                      f"{workers_2['same_shards']}", flush=True)
            text.unlink()
            for f in out.glob("*.bin"):
                f.unlink()

    payload = {"sizes_mb": sizes, "vocab_size": vocab, "runs": runs, "tokenizer_batch_encode": baseline,
               "workers_2": workers_2, "before_streaming": before, "startup": startup, "cpus": os.cpu_count(),
               "note": "seconds: wall time of a fresh process; MB/s: net of the start-up (imports, tokenizer load); "
                       "peak RSS: the kernel's maxrss of that process"}
    payload["slowdown_vs_tokenizer_at_largest"] = baseline["mb_per_s"] / runs[-1]["mb_per_s"]
    payload["max_peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    print_table("python -m tnl_training.data on one line of N MB (fresh process each)",
                ["MB", "seconds", "MB/s (net)", "tokens", "peak RSS MiB", "tokenizer MB/s / ours"],
                [[r["megabytes"], r["seconds"], r["mb_per_s"], r["tokens"], r["peak_rss_mib"],
                  baseline["mb_per_s"] / r["mb_per_s"]] for r in runs])
    if before:
        print(f"\nbefore streaming, {before['megabytes']:.0f} MB: {before['seconds']:.1f} s, peak RSS "
              f"{before['peak_rss_mib']:.0f} MiB")
    print(f"tokenizer's own encode_batch: {baseline['mb_per_s']:.2f} MB/s; peak RSS at most "
          f"{payload['max_peak_rss_mib']:.0f} MiB (target < 1024)")
    save_results(f"bench_tokenize{'_quick' if args.quick else ''}", payload, args.out, plot)


if __name__ == "__main__":
    main()
