#!/usr/bin/env bash
# The CUDA tests and the CPU kernel tests (this machine's CPU may have AVX-512 BF16) on the
# lent GPU machine, from the repository root. Logs into $OUT. The Triton-interpreter tests are
# left out there: triton 3.6's interpreter cannot take the kernel's loop bounds loaded from
# memory; they run in CI under the dev extras' triton 3.9. One pytest per test folder: the
# machine's pytest once left tests/rollout/conftest.py's fixtures unloaded when files of
# several folders shared a command line.
source benchmarks/gpu/setup.sh
grep -m1 -o 'avx512_bf16' /proc/cpuinfo || echo "CPU: no avx512_bf16"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pytest --version
rc=0
for group in "tests/workers/test_gpu.py tests/workers/test_colocated.py" \
             "tests/rollout/test_cuda_graph_steps.py tests/rollout/test_rollout_engine.py tests/rollout/test_speculative.py tests/rollout/test_rollout_kv_cache.py tests/rollout/test_kv_compression.py" \
             "tests/kernels" "tests/test_device.py" ${EXTRA_TESTS:-}; do
  echo "== $group"
  # A test stuck past 120 s prints every thread's stack, and a group past GROUP_TIMEOUT is
  # aborted with its stacks (the 2026-11-29 sixth session lost 8 minutes of device time to a
  # test that never returned).
  PYTHONFAULTHANDLER=1 timeout -s ABRT ${GROUP_TIMEOUT:-300} \
    python3 -m pytest -q -p no:cacheprovider -rs --rootdir=$PWD -o faulthandler_timeout=120 \
    $group -k "not triton_interpreted" \
    2>&1 | tee -a $OUT/gpu_tests.log | tail -25
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
done
exit $rc
