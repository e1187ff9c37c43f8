#!/usr/bin/env bash
# The CUDA tests and the CPU kernel tests (this machine's CPU may have AVX-512 BF16) on the
# lent GPU machine, from the repository root. Logs into $OUT. The Triton-interpreter tests are
# left out there: triton 3.6's interpreter cannot take the kernel's loop bounds loaded from
# memory; they run in CI under the dev extras' triton 3.9.
source benchmarks/gpu/setup.sh
grep -m1 -o 'avx512_bf16' /proc/cpuinfo || echo "CPU: no avx512_bf16"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider -rs \
  tests/workers/test_gpu.py tests/rollout/test_cuda_graph_steps.py tests/kernels \
  tests/test_device.py tests/rollout/test_rollout_engine.py ${EXTRA_TESTS:-} \
  -k "not triton_interpreted" 2>&1 | tee $OUT/gpu_tests.log | tail -40
