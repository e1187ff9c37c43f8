"""Run a kernel test file as a script under TRITON_INTERPRET=1 (Triton's interpreter, which runs
the kernels on CPU tensors), in a subprocess: the interpreter is chosen when triton is first
imported, and the rest of the suite imports it compiled. The script prints its results as
JSON on its last line; the test files' fixtures read them."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_interpreted(path: str, timeout: float = 600) -> dict[str, dict]:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, path], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
