"""Turn a verifier spec into one uniform batched call, whatever style the function is written in.

Specs: a registered name (`arithmetic`), `package.module:function`, or `path/to/file.py:function`
(a relative path is resolved against `base_dir`, default the working directory).

Styles:
- rlkit: `fn(completion, sample, **kwargs) -> float | dict`
- verl:  `compute_score(data_source, solution_str, ground_truth, extra_info, **kwargs) -> float | dict`
- trl:   `reward_func(prompts, completions, **kwargs) -> list[float]`, called once per batch with
  every other sample field (`ground_truth`, `data_source`, `extra_info`, ...) as a list in
  kwargs; completions are `[{"role": "assistant", "content": ...}]` when the prompt is a
  message list (TRL's conversational form) and plain strings otherwise.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal

from .registry import get_verifier

Style = Literal["auto", "rlkit", "verl", "trl"]
STYLES = ("auto", "rlkit", "verl", "trl")
# The fields of a sample besides its prompt (rlkit.data's loaders and tasks build these); a TRL
# function receives each as a keyword argument holding one list per batch.
SAMPLE_FIELDS = ("data_source", "extra_info", "ground_truth")


@dataclass
class BatchVerifier:
    # The spec with a file path made absolute, so that a worker process resolves the same file.
    spec: str
    style: Literal["rlkit", "verl", "trl"]
    fn: Callable[..., Any]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def batched(self) -> bool:
        """True when one call scores a whole batch (TRL), so a timeout covers the whole call."""
        return self.style == "trl"

    def __call__(self, completions: list[str], samples: list[dict]) -> list[Any]:
        """Raw results, one per sample (a float, a dict with `score`, or anything invalid)."""
        if len(completions) != len(samples):
            raise ValueError(f"{len(completions)} completions for {len(samples)} samples")
        if self.style == "trl":
            return self._call_trl(completions, samples)
        return [self._call_one(c, s) for c, s in zip(completions, samples, strict=True)]

    def check_call(self, kwargs: dict[str, Any] | None = None) -> None:
        """Raise ValueError unless the function accepts the call this style makes with these
        keyword arguments (default: its own), so a wrong kwarg fails before any scoring."""
        kwargs = self.kwargs if kwargs is None else kwargs
        if self.style == "rlkit":
            fixed: dict[str, Any] = {}
        elif self.style == "verl":
            fixed = dict.fromkeys(("data_source", "solution_str", "ground_truth", "extra_info"))
        else:
            fixed = dict.fromkeys(("prompts", "completions", *SAMPLE_FIELDS))
        clash = sorted(set(fixed) & set(kwargs))
        if clash:
            raise ValueError(
                f"verifier {self.spec!r} ({self.style} style) already receives {', '.join(clash)} "
                "from each sample; they cannot be keyword arguments too"
            )
        try:
            signature = inspect.signature(self.fn)
        except (TypeError, ValueError):
            return  # a builtin without a readable signature: nothing to check
        try:
            if self.style == "rlkit":
                signature.bind("", {}, **kwargs)
            else:
                signature.bind(**fixed, **kwargs)
        except TypeError as e:
            params = ", ".join(signature.parameters)
            raise ValueError(
                f"verifier {self.spec!r} ({self.style} style) cannot be called with "
                f"{'keyword arguments ' + ', '.join(kwargs) if kwargs else 'no keyword arguments'}: "
                f"{e}; its parameters: {params}"
            ) from None

    def _call_one(self, completion: str, sample: dict) -> Any:
        if self.style == "rlkit":
            return self.fn(completion, sample, **self.kwargs)
        return self.fn(
            data_source=sample.get("data_source", "custom"),
            solution_str=completion,
            ground_truth=sample["ground_truth"],
            extra_info=sample.get("extra_info") or {},
            **self.kwargs,
        )

    def _call_trl(self, completions: list[str], samples: list[dict]) -> list[Any]:
        prompts = [s["prompt"] for s in samples]
        trl_completions: list[Any] = [
            [{"role": "assistant", "content": c}] if isinstance(p, list) else c
            for p, c in zip(prompts, completions, strict=True)
        ]
        columns = sorted({k for s in samples for k in s} - {"prompt"})
        batch_kwargs = {k: [s.get(k) for s in samples] for k in columns}
        out = self.fn(prompts=prompts, completions=trl_completions, **batch_kwargs, **self.kwargs)
        results = list(out)
        if len(results) != len(samples):
            raise ValueError(
                f"{self.spec} returned {len(results)} rewards for {len(samples)} completions"
            )
        return results


def resolve_verifier(
    spec: str,
    style: Style = "auto",
    kwargs: dict[str, Any] | None = None,
    base_dir: str | None = None,
) -> BatchVerifier:
    if style not in STYLES:
        raise ValueError(f"verifier style {style!r} is not one of {', '.join(STYLES)}")
    kwargs = dict(kwargs or {})
    if ":" not in spec:
        if style not in ("auto", "rlkit"):
            raise ValueError(f"registered verifier {spec!r} is rlkit style, not {style!r}")
        return BatchVerifier(spec=spec, style="rlkit", fn=get_verifier(spec), kwargs=kwargs)
    location, name = spec.rsplit(":", 1)
    if location.endswith(".py") or "/" in location or os.sep in location:
        path = os.path.abspath(os.path.join(base_dir or os.getcwd(), location))
        module = _import_file(spec, path)
        spec = f"{path}:{name}"
    else:
        module = _import_module(spec, location)
    fn = getattr(module, name, None)
    if fn is None:
        raise ValueError(f"verifier {spec!r}: {location} has no function {name!r}")
    if not callable(fn):
        raise ValueError(f"verifier {spec!r}: {location}.{name} is not callable")
    resolved = detect_style(spec, fn) if style == "auto" else style
    return BatchVerifier(spec=spec, style=resolved, fn=fn, kwargs=kwargs)


def detect_style(spec: str, fn: Callable[..., Any]) -> Literal["rlkit", "verl", "trl"]:
    """Guess the calling convention from the parameter names."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"verifier {spec!r}: cannot read its signature; set the style explicitly"
        ) from e
    names = set(params)
    if "solution_str" in names or (
        {"data_source", "ground_truth"} <= names and "sample" not in names
    ):
        return "verl"
    if "completions" in names:
        return "trl"
    positional = [
        p
        for p in params.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    if len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in positional):
        return "rlkit"
    raise ValueError(
        f"verifier {spec!r}: cannot tell its style from parameters ({', '.join(params)}); expected "
        "fn(completion, sample), compute_score(data_source, solution_str, ground_truth, extra_info) "
        "or reward_func(prompts, completions, **kwargs)"
    )


def _import_module(spec: str, module_name: str) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"verifier {spec!r}: cannot import module {module_name!r}: {e}") from e


def _import_file(spec: str, path: str) -> ModuleType:
    if not os.path.isfile(path):
        raise ValueError(f"verifier {spec!r}: file {path} does not exist")
    # One module per absolute path, registered in sys.modules so that pickling and repeated
    # resolution (in each worker and per call) find the same module.
    digest = hashlib.sha1(path.encode()).hexdigest()[:10]
    module_name = f"rlkit_user_verifier_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"verifier {spec!r}: cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise ValueError(
            f"verifier {spec!r}: importing {path} failed: {type(e).__name__}: {e}"
        ) from e
    return module
