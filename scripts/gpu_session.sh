#!/usr/bin/env bash
# Everything to run when a session is lent a GPU, as one call of the device tool, in priority
# order so that a call cut short still brings back the most important part:
#   1. the Triton kernel tests at real sizes, bf16 included (tests/kernels, GPU-only cases run);
#   2. benchmarks/bench_lightning_attn.py (operator: triton auto / sequential / split forward,
#      torch, SDPA, fla; roofline);
#   3. benchmarks/bench_vs_minimax.py in bf16 on CUDA;
#   4. benchmarks/bench_long_context.py in bf16 on CUDA;
#   5. torch.compile on CUDA: the Triton custom operators and the bf16 model
#      (the GPU cases of tests/model/test_torch_compile.py).
# One log ($OUT/session.log) plus each benchmark's JSON and PNG land in $OUT (the device tool
# brings back at most 8 files).
#
# The device image has torch and triton but an older transformers and no flash-linear-attention.
# Before the call, fetch pure-Python wheels into .whl/ (ignored by git) from this machine
# (transformers >= 5.25 requires Hugging Face's `kernels` distribution, so it comes along):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl transformers==5.25.0 kernels==0.19.1 fla-core
# then run it with carry [".whl"]:  bash scripts/gpu_session.sh   (timeout_s 600; about 9 minutes)
# A session has 15 minutes of device time in all, start included, so a whole second run does not
# fit: name steps to run only those again, e.g.  bash scripts/gpu_session.sh operator minimax
# (steps: tests operator minimax long_context compile; default all five).
set -uo pipefail
cd "$(dirname "$0")/.."
STEPS=${*:-tests operator minimax long_context compile}
for name in $STEPS; do
  case $name in tests | operator | minimax | long_context | compile) ;;
    *) echo "unknown step '$name': choose from tests operator minimax long_context compile" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-/tmp/tnl-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The three import packages straight from the checkout (no install step needs the network):
# each source root holds one package named as it is imported (DESIGN.md section 1).
export PYTHONPATH=$PWD:$PWD/kernels:$PWD/training${PYTHONPATH:+:$PYTHONPATH}

LOG=$OUT/session.log
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  python3 -c "import fla; print('fla', getattr(fla, '__version__', '?'))" 2>&1 | tail -1
} 2>&1 | tee "$LOG"


step() {  # step NAME SECONDS COMMAND...: run COMMAND if NAME is among the requested steps
  local name=$1 seconds=$2
  shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  echo "=== $* (limit ${seconds}s)" | tee -a "$LOG"
  timeout "$seconds" "$@" 2>&1 | tee -a "$LOG"
  echo "=== exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

step tests 180 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_triton_lightning.py \
  tests/kernels/test_moe_dispatch.py tests/kernels/test_reference.py
step operator 170 python3 benchmarks/bench_lightning_attn.py --out "$OUT"
step minimax 120 python3 benchmarks/bench_vs_minimax.py --device cuda --dtype bfloat16 --out "$OUT"
step long_context 60 python3 benchmarks/bench_long_context.py --device cuda --dtype bfloat16 \
  --max-context 1048576 --max-hybrid-context 262144 --chunk 65536 --out "$OUT"
step compile 60 python3 -m pytest -q -p no:cacheprovider tests/model/test_torch_compile.py -k "triton or gpu"
ls -la "$OUT"
