"""The `rlkit` command: parse the arguments, then call into the package.

Commands import their modules when they run, so `rlkit --help`, `rlkit check` and a bad recipe
fail fast without loading torch or Ray. Every failure is one line on stderr,
`rlkit <command>: error: ...`, and an exit status from `rlkit.exit_codes`; `--debug` or
RLKIT_DEBUG=1 lets the traceback through instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any

from rlkit.config import ConfigError, dump_recipe, load_recipe, sources_of
from rlkit.data.loaders import DataError
from rlkit.exit_codes import ExitCode, RunFailed, RunInterrupted
from rlkit.workers.placement import PlacementError


class CommandError(Exception):
    """A user-facing failure: printed without a traceback, exit status 2."""


# What the user can fix from the message alone: exit status 2 (USAGE).
_USER_ERRORS = (ConfigError, DataError, CommandError, PlacementError)
_DEBUG_HINT = "run with --debug or RLKIT_DEBUG=1 for the traceback"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        # One line, like every other error (argparse would print the usage above it).
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _lazy(module: str, name: str) -> Callable[..., Any]:
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as e:
        # Only the module itself missing is the user's news; a missing import inside it is a bug.
        if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
            raise
        raise CommandError(f"{module} is not part of this rlkit installation") from None
    return getattr(found, name)


def _train(args: argparse.Namespace) -> int:
    cfg = load_recipe(args.recipe, args.overrides)
    if args.address is not None:
        cfg.ray.address = args.address
        sources_of(cfg)["ray.address"] = f"command-line option --address {args.address}"
    train = _lazy("rlkit.trainer.run", "train")
    train(cfg, args.recipe)
    return 0


def _check(args: argparse.Namespace) -> int:
    cfg = load_recipe(args.recipe, args.overrides)
    load_raw = _lazy("rlkit.trainer.data_setup", "load_raw")
    raw = load_raw(cfg)
    sys.stdout.write(f"# resolved recipe of {args.recipe}\n{dump_recipe(cfg)}")
    sys.stdout.flush()
    stages = ", ".join(s.name or s.type for s in cfg.stages)
    print(
        f"rlkit check: {args.recipe} is valid (stages: {stages}; "
        f"{len(raw['train'])} train and {len(raw['eval'])} eval samples)",
        file=sys.stderr,
    )
    return ExitCode.OK


def _eval(args: argparse.Namespace) -> int:
    cfg = load_recipe(args.recipe, args.overrides)
    evaluate = _lazy("rlkit.trainer.evaluate", "main")
    evaluate(model=args.model, cfg=cfg, split=args.split, k=args.k, json_path=args.json_path)
    return 0


def _report(args: argparse.Namespace) -> int:
    report = importlib.import_module("rlkit.report")
    try:
        if len(args.run_dirs) == 1 and not args.labels:
            paths = report.make_report(args.run_dirs[0], args.out)
        else:
            parent = os.path.dirname(os.path.abspath(args.run_dirs[0]))
            out = args.out or os.path.join(parent, "compare")
            paths = report.compare_runs(args.run_dirs, out, args.labels)
    except (OSError, ValueError) as e:
        raise CommandError(str(e)) from None
    for path in paths:
        print(path)
    return 0


def _bench(args: argparse.Namespace) -> int:
    bench = _lazy("rlkit.bench", "main")
    return bench([args.target, *args.args]) or 0


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. train.steps=5"
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rlkit", description="RL post-training (GRPO-family RLVR) for reasoning LLMs."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="run a recipe", description="Run a YAML recipe.")
    train.add_argument("recipe", help="YAML recipe, e.g. recipes/grpo_arithmetic.yaml")
    _add_overrides(train)
    train.add_argument(
        "--address", help='join a Ray cluster ("auto" or host:port) instead of starting one'
    )
    train.set_defaults(run=_train)

    check = commands.add_parser(
        "check",
        help="validate a recipe and its data; print the resolved recipe",
        description="Validate a recipe (every value, the files and verifier it names, its data) "
        "and print the resolved recipe as YAML, without starting anything. Exit status 0: valid.",
    )
    check.add_argument("recipe", help="YAML recipe, e.g. recipes/grpo_arithmetic.yaml")
    _add_overrides(check)
    check.set_defaults(run=_check)

    evaluate = commands.add_parser("eval", help="held-out accuracy of a checkpoint or model")
    evaluate.add_argument("model", metavar="CHECKPOINT_OR_MODEL")
    _add_overrides(evaluate)
    evaluate.add_argument("--recipe", help="recipe giving the data, prompts and sampling")
    evaluate.add_argument("--split", default="eval", help="data split (default: eval)")
    evaluate.add_argument("--k", type=int, help="samples per problem for pass@k")
    evaluate.add_argument("--json", dest="json_path", metavar="FILE", help="write results here")
    evaluate.set_defaults(run=_eval)

    report = commands.add_parser(
        "report",
        help="plot a run's metrics, or compare runs",
        description="One RUN_DIR: plots into RUN_DIR/report/. Several: their curves compared.",
    )
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", help="output folder for the PNGs")
    report.add_argument("--labels", nargs="+", help="legend names of the compared runs")
    report.set_defaults(run=_report)

    bench = commands.add_parser(
        "bench", help="benchmark rollout throughput (engines and modes side by side)"
    )
    bench.add_argument("target", choices=["rollout"])
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the benchmark")
    bench.set_defaults(run=_bench)
    for sub in (parser, train, check, evaluate, report, bench):
        sub.add_argument(
            "--debug",
            action="store_true",
            # Set only where given, so `rlkit --debug train` and `rlkit train --debug` both work.
            default=False if sub is parser else argparse.SUPPRESS,
            help="show the traceback of an error (also RLKIT_DEBUG=1)",
        )
    return parser


def _cause(error: BaseException) -> BaseException:
    """The error a Ray actor raised, not Ray's wrapper around it (whose text is a traceback)."""
    for _ in range(8):
        cause = getattr(error, "cause", None)
        if not isinstance(cause, BaseException) or cause is error:
            break
        error = cause
    return error


def _one_line(text: str, limit: int = 2000) -> str:
    line = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow options (`train r.yaml --address auto a=1`); argparse leaves those over.
    if extra and hasattr(args, "overrides") and all("=" in a and a[0] != "-" for a in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    debug = args.debug or os.environ.get("RLKIT_DEBUG", "") not in ("", "0")
    try:
        return int(args.run(args))
    except RunInterrupted as e:
        # Where the run stopped and which checkpoint run.resume=true continues from.
        print(f"rlkit {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"rlkit {args.command}: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except RunFailed as e:
        if debug:
            raise
        print(f"rlkit {args.command}: error: {_one_line(str(e))}", file=sys.stderr)
        return ExitCode.FAILURE
    except Exception as e:
        if debug:
            raise
        cause = _cause(e)
        if isinstance(cause, _USER_ERRORS):
            print(f"rlkit {args.command}: error: {_one_line(str(cause))}", file=sys.stderr)
            return ExitCode.USAGE
        text = _one_line(str(cause), limit=500) or "(no message)"
        print(
            f"rlkit {args.command}: error: {type(cause).__name__}: {text} ({_DEBUG_HINT})",
            file=sys.stderr,
        )
        return ExitCode.FAILURE


if __name__ == "__main__":
    sys.exit(main())
