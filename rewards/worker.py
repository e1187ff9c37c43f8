"""The verifier worker process, and the conversion of raw verifier output to a score.

The pool starts `python -c "from rlkit.rewards.worker import main; main()" FD`: a fresh
interpreter that imports only rlkit.rewards and the user's module (multiprocessing's spawn would
also re-run the parent's `__main__`, which in Ray or the rlkit CLI imports torch and Ray in
every worker).

Protocol over the socket FD, in multiprocessing's pickled messages. The pool sends
`(sys_path, spec, style, kwargs, base_dir)`; the worker answers `("ready", None)` or
`("init_error", message)`, then answers each `(task_id, completions, samples)` with
`(task_id, "ok", results)` or `(task_id, "error", message)`; `None` asks it to exit. `results`
are `normalize_result` tuples, plain data, so what a user's function returns need not pickle.
"""

from __future__ import annotations

import math
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any

from .adapters import resolve_verifier

# (score, extras, None) for a valid result; (None, {}, reason) for an invalid one.
Result = tuple[float | None, dict[str, Any], str | None]

_DROP = object()


def normalize_result(raw: Any) -> Result:
    """A float or bool, or a dict with a numeric `score`; anything else (None, NaN, text) is invalid."""
    extras: dict[str, Any] = {}
    score = raw
    if isinstance(raw, dict):
        if "score" not in raw:
            return None, {}, f"dict result without 'score' (keys: {', '.join(map(str, raw))})"
        score = raw["score"]
        for key, value in raw.items():
            plain = _plain(value)
            if key != "score" and plain is not _DROP:
                extras[str(key)] = plain
    if score is None or isinstance(score, (str, bytes)) or not hasattr(score, "__float__"):
        return None, {}, f"non-numeric score {score!r}"
    try:
        value = float(score)
    except (TypeError, ValueError) as e:
        return None, {}, f"score {score!r} does not convert to float: {e}"
    if not math.isfinite(value):
        return None, {}, f"non-finite score {value}"
    return value, extras, None


def _plain(value: Any) -> Any:
    """Numbers become floats; strings and None stay; other values are dropped."""
    if value is None or isinstance(value, str):
        return value
    if hasattr(value, "__float__") and not isinstance(value, bytes):
        try:
            return float(value)
        except (TypeError, ValueError):
            return _DROP
    return _DROP


def main() -> None:
    # Ctrl-C reaches the whole process group; the parent pool decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(int(sys.argv[1]))
    sys_path, spec, style, kwargs, base_dir = conn.recv()
    # The parent's path, so that `package.module:function` imports here as it did there.
    sys.path[:] = list(dict.fromkeys([*sys_path, *sys.path]))
    serve(conn, spec, style, kwargs, base_dir)


def serve(
    conn: Connection, spec: str, style: str, kwargs: dict[str, Any], base_dir: str | None
) -> None:
    try:
        verifier = resolve_verifier(spec, style, kwargs, base_dir)  # type: ignore[arg-type]
    except Exception as e:
        conn.send(("init_error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        task_id, completions, samples = message
        try:
            results = [normalize_result(raw) for raw in verifier(completions, samples)]
            conn.send((task_id, "ok", results))
        except BaseException as e:  # noqa: B036  # a user's sys.exit() is an error of that sample
            conn.send((task_id, "error", f"{type(e).__name__}: {e}"))
