"""Where a CPU decode step of the rollout engine goes: SmolLM2-135M-Instruct, batch 32,
64-token random prompts, the engine as `rlkit bench rollout` builds it (default packing,
fused decode step on the C kernels), each kernel and `decoder.linear` wrapped with a timer
that counts only inside `Decoder.forward_decode_fused` for one token per row (decode steps;
the fused prefill excluded), and the LM head + sampling timed per call. A float32 engine on
an AVX2 CPU runs a step's layers in one call (`decode_layers`: GEMMs, attention and row ops
together).

    .venv/bin/python benchmarks/profile_decode_step.py [--new-tokens 129] [--prepack avx2]

Prints prefill seconds, decode ms per step, and ms per step of each component; "rest" is the
step minus the components (Python around the kernels, embedding, RoPE tables, host syncs).
"""

from __future__ import annotations

import argparse
import time

import torch
from rlkit.kernels import cpu as cpu_kernels

import rlkit.models.decoder as decoder
from rlkit.models.loading import load_model, resolve_model_dir
from rlkit.rollout.engine import Engine
from rlkit.rollout.sampling import SamplingParams
from rlkit.rollout.scheduler import Run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=129)
    ap.add_argument("--prepack", default=None, help="avx2, onednn or none (default: the engine's)")
    args = ap.parse_args()
    prepack = {None: None, "none": False}.get(args.prepack, args.prepack)
    model, tok = load_model(resolve_model_dir("smollm2-135m-instruct"), dtype=torch.float32)
    eng = Engine(model, tok, max_batch_size=args.batch, dtype=torch.float32, prepack=prepack)
    print(eng.describe())
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1000, 49152, (args.batch, args.prompt_len), generator=g).tolist()
    eng.generate(prompts, SamplingParams(max_new_tokens=8, ignore_eos=True, seed=0))

    spent: dict[str, float] = {}
    inside = [False]

    def timed(mod, name: str, always: bool = False) -> None:
        f = getattr(mod, name)

        def wrapper(*a, **k):
            if not (inside[0] or always):
                return f(*a, **k)
            t = time.perf_counter()
            out = f(*a, **k)
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
            return out

        setattr(mod, name, wrapper)

    for name in ("decode_layers", "rope_append_attend", "add_rms_norm", "silu_mul"):
        timed(cpu_kernels, name)
    timed(decoder, "linear")
    step = decoder.Decoder.forward_decode_fused

    def fused(self, input_ids, *a, **k):
        if input_ids.shape[1] != 1:  # a prefill (Engine.fused_prefill)
            return step(self, input_ids, *a, **k)
        inside[0] = True
        t = time.perf_counter()
        try:
            return step(self, input_ids, *a, **k)
        finally:
            inside[0] = False
            spent["decode_fused"] = spent.get("decode_fused", 0.0) + time.perf_counter() - t

    decoder.Decoder.forward_decode_fused = fused  # type: ignore[method-assign]
    # The LM head and sampling of each step's last hidden states.
    timed(Run, "sample", always=True)

    params = SamplingParams(max_new_tokens=1, ignore_eos=True, seed=1)
    t = time.perf_counter()
    eng.generate(prompts, params)
    prefill = time.perf_counter() - t
    spent.clear()
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True, seed=1)
    t = time.perf_counter()
    eng.generate(prompts, params)
    total = time.perf_counter() - t
    steps = args.new_tokens - 1
    step_ms = (total - prefill) / steps * 1e3
    print(f"prefill {prefill:.2f} s, decode {step_ms:.1f} ms/step ({steps} steps)")
    parts = {k: v / steps * 1e3 for k, v in spent.items()}
    fused_ms = parts.pop("decode_fused")
    for k, v in parts.items():
        print(f"  {k:20s} {v:6.2f} ms/step")
    inner = sum(v for k, v in parts.items() if k != "sample")
    print(f"  {'rest of the layers':20s} {fused_ms - inner:6.2f} ms/step (Python around kernels)")
    print(f"  {'rest of the step':20s} {step_ms - fused_ms - parts.get('sample', 0):6.2f} ms/step")


if __name__ == "__main__":
    main()
