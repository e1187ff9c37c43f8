"""How a model does on a built-in task before training: the mean score, lengths and verifier
metrics of its samples, dense and under KV compression, on the CPU or a GPU.

    python benchmarks/probe_task.py --task counting [--task-args JSON] [--prompts 8]
        [--samples 2] [--temperature 1] [--top-p 0.7] [--max-new-tokens 1536]
        [--budgets 256,512] [--window 16] [--interval 32] [--seed 1]

SmolLM2-135M-Instruct (bf16 where the CPU has AVX-512 BF16, float32 otherwise), the task's
first `--prompts` train prompts, each sampled `--samples` times by the native engine, scored
by the task's default verifier: dense, then SnapKV at each budget in `--budgets` (a fresh
model each, as the engine packs the weights it decodes with). Prints a line a mode: the mean
score and every other metric the verifier returns, the mean generated tokens and how many
samples reached the cap. The counting task's recipe comment came from
`--task counting --budgets 256,512`.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from rlkit.rewards import get_verifier

from rlkit.config.schema import KVCompressionConfig
from rlkit.data.tasks import get_task
from rlkit.device import pick_dtype
from rlkit.models.loading import load_model, resolve_model_dir
from rlkit.models.tokenizer import apply_chat, load_tokenizer
from rlkit.rollout.engine import Engine
from rlkit.rollout.sampling import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--task", required=True)
    ap.add_argument("--task-args", default="{}", help="the task's build arguments, JSON")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=1536)
    ap.add_argument("--budgets", default="256,512", help="SnapKV budgets ('' for none)")
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--interval", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    model_dir = resolve_model_dir(a.model)
    task = get_task(a.task)
    samples = task.build("train", a.prompts, 0, **json.loads(a.task_args))
    verify = get_verifier(task.default_verifier)
    tok = load_tokenizer(model_dir)
    prompts = [apply_chat(tok, s["prompt"]) for s in samples]
    modes: list[tuple[str, KVCompressionConfig | None]] = [("dense", None)]
    for b in filter(None, a.budgets.split(",")):
        kv = KVCompressionConfig(
            policy="snapkv", budget=int(b), window=a.window, interval=a.interval
        )
        modes.append((f"snapkv{b}", kv))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = pick_dtype("auto", device).dtype
    params = SamplingParams(
        temperature=a.temperature, top_p=a.top_p, max_new_tokens=a.max_new_tokens, seed=a.seed
    )
    print(f"probe_task: {a.task} on {device} ({dtype}), prompt tokens {len(prompts[0])}")
    for name, kv in modes:
        model, tokenizer = load_model(model_dir, dtype=dtype)
        model = model.to(device)
        engine = Engine(
            model, tokenizer, max_batch_size=len(prompts) * a.samples, dtype=dtype,
            kv_compression=kv,
        )  # fmt: skip
        t0 = time.perf_counter()
        outs = engine.generate(prompts, params, n=a.samples)
        seconds = time.perf_counter() - t0
        metrics: dict[str, float] = {}
        for i, out in enumerate(outs):
            result = verify(tokenizer.decode(out.token_ids), samples[i // a.samples])
            for key, value in (result if isinstance(result, dict) else {"score": result}).items():
                metrics[key] = metrics.get(key, 0.0) + float(value) / len(outs)
        lengths = [len(o.token_ids) for o in outs]
        capped = sum(o.finish_reason == "length" for o in outs)
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items())
        print(
            f"{name}: {shown}; {sum(lengths) / len(lengths):.0f} generated tokens on average, "
            f"{capped} of {len(outs)} at the cap ({seconds:.0f} s)"
        )


if __name__ == "__main__":
    main()
