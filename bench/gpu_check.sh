#!/usr/bin/env bash
# One-shot verification of pyshrink's CUDA kernels on a GPU machine with a CUDA build of torch:
#   1. build the extension with CUDA (editable install, no dependency resolution: nothing is fetched),
#   2. run the CUDA tests (tests/ops/test_cuda_ops.py, tests/test_cuda_pipeline.py) and the nvcc compile test,
#   3. run a few kernels under compute-sanitizer (memcheck, racecheck, synccheck) when it is on PATH,
#   4. run the benchmark (bench/cuda_kernels.py),
#   5. (only when asked for: `profile`) time linear_q4 by graph replay and profile it with Nsight Compute.
# Everything is tee'd to $OUT/gpu_check.log when $OUT is set, else to ${TMPDIR:-/tmp}/pyshrink_gpu_check.log.
# Exit status: non-zero if the build, the tests or the sanitizer failed (the benchmark reports its own
# PASS/FAIL targets and does not change the status).
#
#   bash bench/gpu_check.sh                  # all steps: build test sanitize bench
#   bash bench/gpu_check.sh build test       # only some (e.g. to split a run under a per-command limit)
set -uo pipefail
cd "$(dirname "$0")/.."

LOG="${OUT:+$OUT/gpu_check.log}"
LOG="${LOG:-${TMPDIR:-/tmp}/pyshrink_gpu_check.log}"
mkdir -p "$(dirname "$LOG")"
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
status=0
STEPS="${*:-build test sanitize bench}"
want() { [[ " $STEPS " == *" $1 "* ]]; }
step() { echo; echo "==== $* ($(date +%H:%M:%S))"; }
build_ext() { "$PY" -m pip install --no-build-isolation --no-deps -v -e . ; }
# Does the built extension export std::ostream's symbols (libstdc++ linked into it)? grep -c reads all of
# nm's output: `grep -q` would close the pipe early and, under pipefail, turn a match into a failure.
static_libstdcxx() {
  local so
  so=$(ls pyshrink/_C*.so 2>/dev/null | head -1)
  [ -n "$so" ] && [ "$(nm -D --defined-only "$so" 2>/dev/null | grep -c ' _ZNSo')" -gt 0 ]
}

step "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.memory --format=csv || true
nvcc --version | tail -2 || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"

if want build; then
  step "build (pip install --no-build-isolation --no-deps -e .)"
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  build_ext || { echo "BUILD FAILED"; exit 1; }
  # A compiler wrapper that links libstdc++ statically into the extension (seen: the CUDA image's
  # CC/CXX=/opt/gcc/bin/g{cc,++}) gives it a private iostream whose locale is never set up: the first
  # formatted error message segfaults. Exported std::ostream symbols give it away; rebuild with the
  # system compiler then.
  if static_libstdcxx; then
    echo "pyshrink._C carries its own libstdc++ (CC=${CC:-} CXX=${CXX:-}); rebuilding with /usr/bin/gcc, /usr/bin/g++"
    export CC=/usr/bin/gcc CXX=/usr/bin/g++
    build_ext || { echo "BUILD FAILED"; exit 1; }
    if static_libstdcxx; then echo "BUILD FAILED: pyshrink._C still links libstdc++ statically"; exit 1; fi
  fi
fi
step "import"
"$PY" - <<'EOF' || { echo "IMPORT FAILED"; exit 1; }
import torch, pyshrink
from pyshrink import _C
info = _C.build_info()
print("build_info:", info)
assert info["cuda"], "pyshrink._C was built without CUDA"
print(torch._C._dispatch_dump("pyshrink::linear_q4"))
EOF

if want test; then
  step "CUDA tests"
  "$PY" -m pytest -q -ra tests/ops/test_cuda_ops.py tests/test_cuda_pipeline.py tests/test_cuda_compile.py || { echo "TESTS FAILED"; status=1; }
fi

if want sanitize && command -v compute-sanitizer >/dev/null 2>&1; then
  step "compute-sanitizer memcheck on the custom kernels"
  cat > /tmp/pyshrink_sanitize.py <<'EOF'
import os, torch, pyshrink.ops as ops
from pyshrink.ops import q4
torch.manual_seed(0)
for M in (1, 5, 17, 40):
    # (200, 7, 64): 14 bytes of zero points, so the last 32-bit word is partial
    # (1000, 130, 32, False) at M = 40: a K over several k-tiles that is not a multiple of BK, and at M = 5 more
    # than 48 KB of shared memory (the opt-in path)
    for K, N, g, sym in ((200, 7, 32, False), (200, 7, 64, False), (99, 33, 128, True), (1000, 130, 64, False),
                         (1000, 130, 32, False)):
        p, s, z = q4.quantize_q4_reference(torch.randn(N, K, device="cuda"), g, sym)
        x = torch.randn(M, K, device="cuda").half()
        os.environ["PYSHRINK_Q4_DEQUANT_MATMUL_MIN_M"] = str(1 << 40)
        ops.linear_q4(x, p, s, z, torch.randn(N, device="cuda"))
        ops.linear_q4(x.bfloat16(), p, s, z)
        ops.dequantize_q4(p, s, z, K)
acc, cnt = ops.new_accumulators(130, device="cuda")
for x in (torch.randn(77, 130, device="cuda"), torch.randn(5, 140, device="cuda").half()[:, 3:133]):
    ops.act_stats_(x, acc, cnt)
torch.cuda.synchronize()
print("sanitized run done")
EOF
  # without the caching allocator every tensor is its own allocation, so reads past a tensor are caught;
  # racecheck and synccheck catch shared-memory hazards and barrier misuse in the pipelines, which memcheck does not
  for tool in memcheck racecheck synccheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 600 \
      compute-sanitizer --tool $tool --error-exitcode 3 "$PY" /tmp/pyshrink_sanitize.py \
      || { echo "SANITIZER ($tool) FAILED"; status=1; }
  done
fi

if want bench; then
  step "benchmark"
  "$PY" bench/cuda_kernels.py || echo "BENCHMARK FAILED (exit $?)"
fi

if want profile; then
  step "profile (bench/cuda_profile.py; Nsight Compute when ncu is on PATH)"
  for M in 1 16; do
    "$PY" bench/cuda_profile.py --m $M || echo "PROFILE FAILED"
    if command -v ncu >/dev/null 2>&1; then
      timeout 300 ncu --kernel-name regex:linear_q4_mma --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section SourceCounters "$PY" bench/cuda_profile.py --m $M || echo "NCU FAILED"
    fi
  done
fi

step "done: status $status, log at $LOG"
exit $status
