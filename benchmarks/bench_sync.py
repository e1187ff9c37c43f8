"""Weight sync learner -> rollout engine on one GPU: in one process, or between two processes
through CUDA IPC handles. Picks the colocated worker's design by measurement.

    python benchmarks/bench_sync.py --model M [--repeats 5] [--json FILE]

- in-process: `ColocatedWorker.sync_engine`'s path: the learner's weights (its float32 master
  weights where it keeps them) copied straight into the engine's parameters on the device,
  cast on the way (`copy_into_engine`);
- ipc: the engine lives in a second process; the learner's weight tensors travel once as CUDA
  IPC handles (torch.multiprocessing shares CUDA tensors so), the engine keeps them open, and
  each sync is a "copy now" message plus the same device copy there. The first sync (the
  handle exchange and cudaIpcOpenMemHandle per tensor) is reported apart from the steady ones.

Milliseconds are wall clock around each sync, device synchronised, median of --repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.multiprocessing as mp

from rlkit.config import load_recipe
from rlkit.models.loading import load_model
from rlkit.rollout.engine import Engine
from rlkit.workers.colocated import copy_into_engine


def _engine(model_dir: str) -> Engine:
    model, tok = load_model(model_dir, dtype=torch.bfloat16)
    return Engine(model.to("cuda"), tok, dtype=torch.bfloat16, max_batch_size=8)


def _ipc_consumer(model_dir: str, inbox, outbox) -> None:
    engine = _engine(model_dir)
    shared = inbox.get()  # {name: CUDA tensor}, opened from IPC handles
    outbox.put("ready")
    while inbox.get() == "copy":
        engine.load_state_dict(shared)
        torch.cuda.synchronize()
        outbox.put("done")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from rlkit.workers.learner import Learner

    learner = Learner(args.model, load_recipe(None, [f"model.path={args.model}"]), device="cuda")
    params = sum(p.numel() for p in learner.model.parameters())
    engine = _engine(args.model)

    def in_process() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if not copy_into_engine(learner, engine):
            engine.load_state_dict(learner.weights("bfloat16", device="cuda"))
        torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - t0)

    in_process()
    inproc = [in_process() for _ in range(args.repeats)]
    engine.model.to("meta")  # its memory back before the second process takes its own
    torch.cuda.empty_cache()

    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_ipc_consumer, args=(args.model, inbox, outbox))
    child.start()
    state = learner.weights("bfloat16", device="cuda")  # the tensors the consumer keeps
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    inbox.put(state)
    assert outbox.get(timeout=600) == "ready"
    inbox.put("copy")
    assert outbox.get(timeout=600) == "done"
    first = 1000 * (time.perf_counter() - t0)
    steady = []
    for _ in range(args.repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        inbox.put("copy")
        assert outbox.get(timeout=600) == "done"
        steady.append(1000 * (time.perf_counter() - t0))
    inbox.put("stop")
    child.join(timeout=60)
    out = {
        "device": torch.cuda.get_device_name(),
        "model": args.model,
        "params": params,
        "in_process_ms": statistics.median(inproc),
        "ipc_first_ms": first,
        "ipc_steady_ms": statistics.median(steady),
    }
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
