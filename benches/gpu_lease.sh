#!/usr/bin/env bash
# Everything a short GPU lease runs, in one call, printing each result as soon as it has it:
#   bash benches/gpu_lease.sh            (OUT=<dir> keeps the logs and JSON files)
# 1. wheels carried in .whl/ go to /tmp/site when present. The device image has no diffusers and an
#    older transformers; fetch them here first (.whl/ is git-ignored; carry it with the call):
#      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#          --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 transformers==5.24.0 importlib_metadata
# 2. `pip install .` builds the extension with the CUDA kernels for FLOWSTEER_CUDA_ARCHS (default 90 here);
# 3. the kernel checks and timings (benches/gpu_suite.py), then the SD3.5-Medium rollout section, each in
#    its own process under its own time limit, so a failure in one leaves the other's numbers;
# 4. with PYTEST_LIMIT=<seconds>, the unit tests' CUDA cases.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/flowsteer-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FLOWSTEER_CUDA_ARCHS=${FLOWSTEER_CUDA_ARCHS:-90} CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.used --format=csv,noheader
command -v nvcc >/dev/null || export PATH=$PATH:/usr/local/cuda/bin
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
t0=$(date +%s)
if ! python3 -m pip install --no-deps --no-build-isolation -v . >"$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"; echo "build FAILED"; exit 1
fi
grep -i -E "cuda|nvcc" "$OUT/build.log" | grep -v "^ *$" | head -5
echo "build: $(( $(date +%s) - t0 )) s"
if [ "${KERNEL_LIMIT:-240}" -gt 0 ]; then  # KERNEL_LIMIT=0: the rollout section alone
    timeout "${KERNEL_LIMIT:-240}" python3 benches/gpu_suite.py --skip-rollout --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
fi
timeout "${ROLLOUT_LIMIT:-240}" python3 benches/gpu_suite.py --rollout-only --out "$OUT/rollout.json" 2>&1 | tee "$OUT/rollout.log"
# Last, as time allows: the unit tests' CUDA cases (the cuda and triton backends on the GPU).
if [ "${PYTEST_LIMIT:-0}" -gt 0 ]; then
    timeout "$PYTEST_LIMIT" python3 -m pytest -q -x -p no:cacheprovider -k "cuda or triton" tests/test_sde_step.py tests/test_advantages.py \
        2>&1 | tail -15
fi
