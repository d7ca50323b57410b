"""A 64K-token prompt on a tiny all-linear model generates on CPU with bounded memory.

Each run happens in a fresh process whose large allocations are all ``mmap``-backed
(glibc's dynamic mmap threshold is pinned), so resident memory follows live tensors;
a sampling thread records the peak above the level just before ``generate``. The
bound comes from the chunk size: with ``prefill_chunk_size=C`` the prefill holds at
most a few ``[C, hidden]``-sized activations per layer plus the ``[C, C_block]``
score tiles, independent of the prompt length.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

PROMPT = 65536
CHUNK = 2048

SCRIPT = textwrap.dedent("""
    import json, sys, threading, time, torch
    from tnl_model.testing import build_model, tiny_config, random_ids

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    torch.set_num_threads(2)
    prompt_length, chunk = int(sys.argv[1]), int(sys.argv[2]) or None
    model = build_model(tiny_config(layer_types=["linear_attention"] * 4, prefill_chunk_size=chunk))
    prompt = random_ids(1, prompt_length, seed=3)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)

    with torch.no_grad():
        model.generate(random_ids(1, 64), max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm up
        before = rss()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        out = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        done.set()
        sampler.join()
    growth = (max(peak[0], rss()) - before) / 2**20
    print(json.dumps({"peak_growth_mb": growth, "new_tokens": out.shape[1] - prompt_length}))
""")

# Every allocation above 64 KiB gets its own mmap and is unmapped when freed, so RSS tracks live tensors
# instead of whatever the heap kept from earlier (glibc otherwise raises this threshold dynamically).
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "2"}


def run(prompt_length, chunk):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(prompt_length), str(chunk)], capture_output=True,
                            text=True, timeout=600, env={**os.environ, **ALLOCATOR_ENV})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_64k_prompt_generates_with_memory_bounded_by_the_chunk():
    # Bound: 48 KiB per token of the chunk (hidden 48, 4 heads x 12 dims, 4 experts: ~100 fp32 values per
    # token per live tensor, a few dozen live tensors at the peak) -> 96 MiB for C = 2048, plus the prompt's
    # own int64 ids and attention mask (~1 MiB).
    bound_mb = 48 * CHUNK / 1024 + 8
    chunked = run(PROMPT, CHUNK)
    print(f"64K prompt, chunk {CHUNK}: peak RSS growth {chunked['peak_growth_mb']:.1f} MiB (bound {bound_mb:.0f} MiB)")
    assert chunked["new_tokens"] == 4
    assert chunked["peak_growth_mb"] < bound_mb
    # The bound is tight enough to mean something: one unchunked pass over the same prompt exceeds it.
    whole = run(PROMPT, 0)
    print(f"64K prompt, single pass: peak RSS growth {whole['peak_growth_mb']:.1f} MiB")
    assert whole["peak_growth_mb"] > bound_mb
