"""Prompt sets from JSONL and parquet files with verl's columns.

RL records: `prompt` (a string, or a list of `{"role", "content"}` messages), the ground truth
as `reward_model.ground_truth` (verl's nested column) or a flat `ground_truth`, and optional
`data_source` (default "custom") and `extra_info` (a dict). A string or number ground truth
becomes a string; a dict or list (verl's countdown stores one) is kept as it is, for a verl
`compute_score` that expects it.

SFT records: `prompt` and `response` strings, or `messages` ending with an assistant message.

A malformed record raises `DataError` naming the file, the JSONL line (1-based) or the parquet
row (0-based), and the field; so do bytes that are not UTF-8, a file that is not readable
parquet, a file without records, and a ground truth that is null or a non-finite number.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from typing import Any


class DataError(ValueError):
    pass


def load_samples(path: str) -> list[dict]:
    return _non_empty([_sample(record, where) for record, where in _records(path)], path)


def load_sft_pairs(path: str) -> list[dict]:
    """`{"prompt": str | messages, "response": str}` per record."""
    return _non_empty([_sft_pair(record, where) for record, where in _records(path)], path)


def _non_empty(items: list[dict], path: str) -> list[dict]:
    if not items:
        raise DataError(f"{path}: the file holds no records")
    return items


def drop_long_prompts(
    samples: list[dict], count_tokens: Callable[[dict], int], max_tokens: int
) -> tuple[list[dict], int]:
    """Samples whose prompt fits in `max_tokens`, and how many were dropped; never truncates."""
    kept = [s for s in samples if count_tokens(s) <= max_tokens]
    return kept, len(samples) - len(kept)


def _records(path: str) -> Iterator[tuple[Any, str]]:
    """(record, "FILE: line N" or "FILE: row N (0-based)") for each record of the file."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    if path.endswith(".jsonl"):
        yield from _jsonl_records(path)
    elif path.endswith(".parquet"):
        for row, record in enumerate(_parquet_rows(path)):
            yield record, f"{path}: row {row} (0-based)"
    else:
        raise DataError(f"{path}: unsupported file type; expected .jsonl or .parquet")


def _parquet_rows(path: str) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as e:
        # An empty, truncated or non-parquet file; Arrow's text can span lines.
        reason = " ".join(str(e).split())[:300]
        raise DataError(f"{path}: not a readable parquet file: {reason}") from None


def _jsonl_records(path: str) -> Iterator[tuple[Any, str]]:
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}: line {line_no}"
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                problem = f"not UTF-8 text: byte 0x{raw[e.start]:02x} at column {e.start + 1}"
                raise DataError(f"{where}: {problem}") from None
            if not line.strip():
                continue
            try:
                yield json.loads(line), where
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
            except RecursionError:
                raise DataError(f"{where}: invalid JSON: nested too deeply") from None


def _sample(record: Any, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: record must be a JSON object, got {type(record).__name__}")
    data_source = record.get("data_source")
    if data_source is None:
        data_source = "custom"
    elif not isinstance(data_source, str):
        raise DataError(
            f"{where}: field 'data_source' must be a string, got {type(data_source).__name__}"
        )
    extra_info = record.get("extra_info")
    if extra_info is None:
        extra_info = {}
    elif not isinstance(extra_info, dict):
        raise DataError(
            f"{where}: field 'extra_info' must be a dict, got {type(extra_info).__name__}"
        )
    return {
        "prompt": _prompt(record, "prompt", where),
        "ground_truth": _ground_truth(record, where),
        "data_source": data_source,
        "extra_info": extra_info,
    }


def _prompt(record: dict, field: str, where: str) -> str | list[dict[str, str]]:
    if field not in record or record[field] is None:
        raise DataError(f"{where}: field {field!r} is missing")
    prompt = record[field]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: field {field!r} is empty")
        return prompt
    return _messages(prompt, field, where)


def _messages(messages: Any, field: str, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"{where}: field {field!r} must be a string or a non-empty list of messages"
        )
    for i, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("role"), str)
            or not isinstance(message.get("content"), str)
        ):
            raise DataError(
                f"{where}: field '{field}[{i}]' must be a message with string 'role' and 'content'"
            )
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _ground_truth(record: dict, where: str) -> Any:
    reward_model = record.get("reward_model")
    if isinstance(reward_model, dict) and reward_model.get("ground_truth") is not None:
        field, truth = "reward_model.ground_truth", reward_model["ground_truth"]
    elif record.get("ground_truth") is not None:
        field, truth = "ground_truth", record["ground_truth"]
    else:
        raise DataError(
            f"{where}: field 'reward_model.ground_truth' (or 'ground_truth') is missing"
        )
    if isinstance(truth, bool):
        raise DataError(
            f"{where}: field {field!r} must be a string, number, dict or list, got bool"
        )
    if isinstance(truth, float) and not math.isfinite(truth):
        raise DataError(f"{where}: field {field!r} is {truth}, not an answer")
    if isinstance(truth, (int, float)):
        return str(truth)
    if not isinstance(truth, (str, dict, list)):
        raise DataError(
            f"{where}: field {field!r} must be a string, number, dict or list, got {type(truth).__name__}"
        )
    return truth


def _sft_pair(record: Any, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: record must be a JSON object, got {type(record).__name__}")
    if record.get("messages") is not None:
        messages = _messages(record["messages"], "messages", where)
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise DataError(
                f"{where}: field 'messages' must end with an assistant message after a prompt"
            )
        return {"prompt": messages[:-1], "response": messages[-1]["content"]}
    prompt = _prompt(record, "prompt", where)
    response = record.get("response")
    if response is None:
        raise DataError(f"{where}: field 'response' is missing (or give 'messages')")
    if not isinstance(response, str):
        raise DataError(
            f"{where}: field 'response' must be a string, got {type(response).__name__}"
        )
    return {"prompt": prompt, "response": response}
