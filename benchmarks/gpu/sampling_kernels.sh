#!/usr/bin/env bash
# The sampling kernels on the lent GPU, from the repository root (after the carry, or with
# SmolLM2 absent: the tests that need it skip): the compiled tests of the nucleus floor, the
# verification rule and the engine's CUDA-graph and speculative steps that use them
# -> $OUT/gpu_tests_sampling.txt; then the kernels' device times side by side in one process:
#   benchmarks/bench_top_p.py (the floor's search over values against over keys, and the sort)
#     -> $OUT/gpu_bench_top_p_search.json
#   benchmarks/bench_verify.py (verification with the vocabulary in chunks against one
#     program a row) -> $OUT/gpu_bench_verify_chunks.json
source benchmarks/gpu/setup.sh
timeout ${TEST_LIMIT:-300} python3 -m pytest -q -k "not interpreted" tests/kernels/test_top_p.py \
  tests/kernels/test_spec_verify.py tests/rollout/test_rollout_sampling.py \
  tests/rollout/test_cuda_graph_steps.py tests/rollout/test_sync_free_spec.py \
  tests/rollout/test_speculative.py 2>&1 | grep -v Warn | tail -12 | tee $OUT/gpu_tests_sampling.txt
python3 benchmarks/bench_top_p.py --json $OUT/gpu_bench_top_p_search.json 2>&1 | cut -c1-600
python3 benchmarks/bench_verify.py --json $OUT/gpu_bench_verify_chunks.json 2>&1 | cut -c1-300
