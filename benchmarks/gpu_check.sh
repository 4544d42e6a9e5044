#!/usr/bin/env bash
# The GPU check of the Triton kernels, as one run that fits a short lease of one H100 / H200
# (at most 8 minutes after the machine starts, leaving a lease of 15 minutes room to rerun one
# part): versions, the issue's target rows of the kernel benchmark against PyTorch SDPA and, when
# its wheels travel along, flash-linear-attention; the kernel tests compiled for real
# (TRITON_INTERPRET=0); then every op from 1K to 64K. Most important first, each step
# time-limited, so a step that runs out still leaves the earlier results. Logs and tables go to
# $OUT (default benchmarks/results/):
#   gpu_check.log            versions and each step's exit status
#   gpu_kernel_tests.log     pytest tests/kernels on the GPU
#   kernels_cuda_targets.md  attention, linear attention (and the ring step's in-kernel
#                            merge), bf16, head dim 128, 8K-32K
#   kernels_cuda.md          every op at 1K and 64K
#   kernels_cuda*.log        the benchmarks' own output (errors included)
#
# Nothing is installed: the package is put on PYTHONPATH through links (ctxscale is a namespace
# package), so the machine's own torch and triton are used. flash-linear-attention is pure
# Python; to compare against it, fetch its wheels on a machine with the package index first:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl \
#       flash-linear-attention==0.6.0 fla-core==0.6.0
# and carry .whl with the run. flash-attn has no wheel on PyPI (it compiles for an hour), so the
# attention target is then SDPA.
#
#   bash benchmarks/gpu_check.sh [targets] [tests] [sweep]   # default all three, in this order
#   PYTHON=... picks the interpreter
set -u
PARTS=${*:-targets tests sweep}
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
note() { echo "== $*" | tee -a "$LOG"; }

export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
PKG=$(mktemp -d)
mkdir -p "$PKG/ctxscale"
for d in dist kernels models launch; do ln -s "$PWD/$d" "$PKG/ctxscale/$d"; done
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$PKG/site" .whl/*.whl && export PYTHONPATH="$PYTHONPATH:$PKG/site"
  note "carried wheels: $(cd .whl && ls *.whl | tr '\n' ' ')"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib, torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("flash_attn", "fla", "mamba_ssm"):
    try:
        importlib.import_module(name)
        print(name, "importable")
    except Exception as e:  # noqa: BLE001
        print(name, "not importable:", type(e).__name__, str(e)[:120])
EOF

step() {  # step NAME SECONDS LOGFILE CMD...: run with a time limit into LOGFILE, log the status
  local name=$1 limit=$2 logfile=$3
  shift 3
  local t0=$SECONDS
  timeout "$limit" "$@" >"$logfile" 2>&1
  note "$name: exit $? after $((SECONDS - t0)) s (limit $limit s); last lines of $(basename "$logfile"):"
  tail -n 4 "$logfile" | tee -a "$LOG"
}

for part in $PARTS; do
  case $part in
    targets)  # bf16, head dim 128, 8K-32K: the rows the issue's targets are read from
      step "benchmark targets" 180 "$OUT/kernels_cuda_targets.log" "$PY" benchmarks/kernels.py \
        --device cuda --dtype bfloat16 --ops attention linear_attention ring_step --seq 8192 16384 32768 \
        --head-dim 128 --repeats 5 --skip blockwise reference recurrent \
        --out "$OUT/kernels_cuda_targets.md" ;;
    tests)  # compile-for-sm_90 is for machines without a GPU: here every test compiles for real
      # (the document-reset kernels of linear attention and the scan included).
      # Each kernel runs its first fitting config (one compile per specialization).
      CTXSCALE_TRITON_AUTOTUNE=0 step "kernel tests" 180 "$OUT/gpu_kernel_tests.log" "$PY" -m \
        pytest -q -p no:cacheprovider --maxfail=20 tests/kernels \
        --deselect tests/kernels/test_triton_compile.py ;;
    sweep)
      step "benchmark sweep" 90 "$OUT/kernels_cuda.log" "$PY" benchmarks/kernels.py \
        --device cuda --dtype bfloat16 --seq 1024 65536 --repeats 3 \
        --skip blockwise reference recurrent --out "$OUT/kernels_cuda.md" ;;
    *) note "unknown part '$part' (targets, tests, sweep)"; rm -rf "$PKG"; exit 2 ;;
  esac
done
rm -rf "$PKG"
