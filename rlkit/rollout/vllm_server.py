"""The vLLM side of the vLLM rollout backend: a process that owns one `vllm.LLM`.

vLLM pins its own torch and transformers, so it lives in its own environment (`.venv-vllm`,
made by `scripts/setup_vllm.sh`). `rlkit.rollout.vllm_engine.VLLMEngine`, in rlkit's own
environment, runs this file as a script with that environment's python (it imports only the
standard library, torch, safetensors and vLLM, no rlkit module) and sends it requests over the
child's stdin/stdout. `python -m rlkit.rollout.vllm_server` works too where rlkit is installed.

Protocol: frames of an 8-byte big-endian length and a pickle (protocol 4) of plain Python
values (dicts, lists, str, int, float), one reply per request, in order. A request is
`{"op": name, "args": {...}}`; a reply is `{"ok": True, "result": ...}` or
`{"ok": False, "error": "Type: message", "traceback": "..."}`. Ops:

  init          args: the `LLM` options below; result: {"vllm_version", "platform",
                "sleep_supported", "max_model_len", "init_seconds"}. Must come first.
  generate      args: prompts (token id lists), params (rlkit SamplingParams as a dict), n;
                result: {"completions": [(prompt_index, token_ids, logprobs, finish_reason,
                text)], prompt-major, "generate_seconds": time inside `LLM.generate`}.
  load_weights  args: path of a safetensors file of Hugging Face-named tensors; result:
                {"num_tensors", "seconds"}. Loaded with vLLM's in-place reload
                (`Worker.reload_weights`, which runs `model.load_weights` on (name, tensor)
                pairs and re-runs the kernels' weight post-processing, e.g. the CPU backend's
                GEMM repacking), then the prefix cache is reset: cached KV of the old weights
                must not serve new requests.
  sleep, wake   vLLM sleep mode (level 1: weights to host memory, KV cache dropped); a no-op
                where the platform has none (CPU), reported as sleep_supported=False.
  ping, shutdown

Log-probs are vLLM's "processed_logprobs": the log-probabilities of the sampled tokens under
the distribution they were drawn from (after temperature, top-k, top-p), as rlkit's native
engine reports them; greedy requests report the temperature-1 distribution, as the native
engine does.

vLLM logs to stdout; the frames go to a private copy of the original stdout and fd 1 is pointed
at stderr before vLLM is imported, so no log line or C++ print can corrupt a frame.
`VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps the engine core (and the model) in this process.

This module imports vLLM only inside functions: the client imports its framing helpers.
"""

from __future__ import annotations

import os
import pickle
import struct
import sys
import time
import traceback
from typing import Any, BinaryIO

HEADER = struct.Struct(">Q")


def encode_frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=4)
    return HEADER.pack(len(data)) + data


def _read_exact(f: BinaryIO, size: int) -> bytes | None:
    chunks = []
    while size:
        chunk = f.read(size)
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_frame(f: BinaryIO) -> Any:
    """The next frame's object; raises EOFError when the stream ends."""
    header = _read_exact(f, HEADER.size)
    if header is None:
        raise EOFError
    data = _read_exact(f, HEADER.unpack(header)[0])
    if data is None:
        raise EOFError
    return pickle.loads(data)


class _Server:
    def __init__(
        self,
        model: str,
        dtype: str = "bfloat16",
        seed: int = 0,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        enforce_eager: bool = True,
        gpu_memory_utilization: float = 0.5,
        cpu_kv_cache_gb: float = 1.0,
        enable_sleep_mode: bool = False,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        t0 = time.perf_counter()
        import vllm
        from vllm.platforms import current_platform

        self.vllm = vllm
        is_cpu = current_platform.is_cpu()
        kwargs: dict[str, Any] = dict(
            model=model,
            tokenizer=model,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            enforce_eager=enforce_eager,
            # Log-probs of the sampling distribution (after temperature/top-k/top-p).
            logprobs_mode="processed_logprobs",
            # The n samples of a prompt share its prefill through the prefix cache.
            enable_prefix_caching=True,
        )
        if is_cpu:
            # The CPU backend sizes its KV cache from this, not from gpu_memory_utilization.
            kwargs["kv_cache_memory_bytes"] = int(cpu_kv_cache_gb * (1 << 30))
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        self.sleep_supported = (
            bool(enable_sleep_mode) and current_platform.is_sleep_mode_available()
        )
        if self.sleep_supported:
            kwargs["enable_sleep_mode"] = True
        elif enable_sleep_mode:
            print(
                f"vllm_server: sleep mode is not available on {current_platform.device_name}; "
                "sleep/wake are no-ops",
                file=sys.stderr,
            )
        kwargs.update(engine_kwargs or {})
        self.llm = vllm.LLM(**kwargs)
        self.asleep = False
        self.platform = "cpu" if is_cpu else str(current_platform.device_name)
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        # One short request: first-call set-up (kernels, sampler) is not billed to the first
        # rollout's generate_seconds.
        self.generate([[0]], {"temperature": 1.0, "max_new_tokens": 2, "seed": 0}, 1)
        self.init_seconds = time.perf_counter() - t0

    def info(self) -> dict[str, Any]:
        return {
            "vllm_version": self.vllm.__version__,
            "platform": self.platform,
            "sleep_supported": self.sleep_supported,
            "max_model_len": self.max_model_len,
            "init_seconds": self.init_seconds,
        }

    def _sampling_params(self, params: dict[str, Any], n: int, max_tokens: int) -> Any:
        return self.vllm.SamplingParams(
            n=n,
            temperature=float(params.get("temperature", 1.0)),
            top_p=float(params.get("top_p", 1.0)),
            top_k=int(params.get("top_k", 0)),
            max_tokens=max_tokens,
            stop=list(params.get("stop") or []) or None,
            stop_token_ids=list(params.get("stop_token_ids") or []) or None,
            ignore_eos=bool(params.get("ignore_eos", False)),
            seed=params.get("seed"),
            # 0: the sampled token's log-prob only.
            logprobs=0,
            # rlkit keeps the stop string in the text (and its tokens in token_ids).
            include_stop_str_in_output=True,
            skip_special_tokens=True,
        )

    def generate(self, prompts: list[list[int]], params: dict[str, Any], n: int) -> dict[str, Any]:
        from vllm.inputs import TokensPrompt

        self.wake()
        want = int(params.get("max_new_tokens", 256))
        # vLLM refuses n > 1 with greedy decoding: send such prompts n times instead (the
        # prefix cache still prefills each once).
        copies = n if float(params.get("temperature", 1.0)) == 0 and n > 1 else 1
        per_request = n // copies
        # Like the native engine, a completion stops at the context length: long prompts'
        # budgets shrink instead of vLLM rejecting the request.
        by_budget: dict[int, Any] = {}
        owners: list[int] = []  # prompt index of each request
        inputs, sps = [], []
        for i, p in enumerate(prompts):
            if len(p) >= self.max_model_len:
                raise ValueError(
                    f"a prompt has {len(p)} tokens; max_model_len is {self.max_model_len}"
                )
            budget = min(want, self.max_model_len - len(p))
            if budget not in by_budget:
                by_budget[budget] = self._sampling_params(params, per_request, budget)
            for _ in range(copies):
                owners.append(i)
                inputs.append(TokensPrompt(prompt_token_ids=list(p)))
                sps.append(by_budget[budget])
        t0 = time.perf_counter()
        outputs = self.llm.generate(inputs, sps, use_tqdm=False)
        seconds = time.perf_counter() - t0
        completions = []
        for i, out in zip(owners, outputs, strict=True):
            if list(out.prompt_token_ids or []) != list(prompts[i]):
                raise RuntimeError(f"vLLM returned outputs out of order at prompt {i}")
            samples = sorted(out.outputs, key=lambda c: c.index)
            if len(samples) != per_request:
                raise RuntimeError(
                    f"vLLM returned {len(samples)} samples for prompt {i}, not {per_request}"
                )
            for c in samples:
                if c.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM finished a request with {c.finish_reason!r}")
                tokens = list(c.token_ids)
                steps = c.logprobs or []
                if len(steps) != len(tokens):
                    raise RuntimeError("vLLM returned no log-prob for some sampled tokens")
                logprobs = [float(step[t].logprob) for step, t in zip(steps, tokens)]
                completions.append((i, tokens, logprobs, str(c.finish_reason), c.text))
        return {"completions": completions, "generate_seconds": seconds}

    def load_weights(self, path: str) -> dict[str, Any]:
        from safetensors.torch import load_file

        self.wake()
        t0 = time.perf_counter()
        items = list(load_file(path).items())
        self.llm.collective_rpc(_reload_weights, args=(items,))
        self.llm.reset_prefix_cache()
        return {"num_tensors": len(items), "seconds": time.perf_counter() - t0}

    def sleep(self) -> dict[str, Any]:
        if self.sleep_supported and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True
        return {"asleep": self.asleep}

    def wake(self) -> dict[str, Any]:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        return {"asleep": self.asleep}


def _reload_weights(worker: Any, items: list[tuple[str, Any]]) -> None:
    """Runs on the vLLM worker (collective_rpc passes it as the first argument)."""
    if hasattr(worker, "reload_weights"):
        # In-place reload: layers whose weights the backend repacked (the CPU backend's GEMM
        # dispatch drops the plain weight) get them back, load, and are post-processed again.
        worker.reload_weights(weights_iterator=items, is_checkpoint_format=True)
    else:  # older vLLM: the model's own loader
        worker.model_runner.model.load_weights(iter(items))


def _serve(proto_in: BinaryIO, proto_out: BinaryIO) -> None:
    server: _Server | None = None
    while True:
        try:
            request = read_frame(proto_in)
        except EOFError:  # the client is gone
            return
        op = request.get("op")
        args = request.get("args") or {}
        reply: dict[str, Any]
        try:
            if op == "shutdown":
                proto_out.write(encode_frame({"ok": True, "result": None}))
                proto_out.flush()
                return
            if op == "ping":
                result: Any = "pong"
            elif op == "init":
                if server is not None:
                    raise RuntimeError("the server is already initialised")
                server = _Server(**args)
                result = server.info()
            elif server is None:
                raise RuntimeError(f"{op!r} before init")
            elif op in ("generate", "load_weights", "sleep", "wake"):
                result = getattr(server, op)(**args)
            else:
                raise ValueError(f"unknown op {op!r}")
            reply = {"ok": True, "result": result}
        except Exception as e:
            reply = {
                "ok": False,
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(),
            }
        proto_out.write(encode_frame(reply))
        proto_out.flush()


def main() -> None:
    # Frames use private copies of fds 0 and 1; fd 1 then points at stderr (vLLM logs to stdout).
    proto_in = os.fdopen(os.dup(0), "rb")
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    _serve(proto_in, proto_out)
    proto_out.close()
    # vLLM's engine threads and atexit hooks can hang an orderly interpreter exit.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
