"""A reward function written for verl, used by rlkit unchanged (recipes/custom_verifier.yaml)."""

import re


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    numbers = re.findall(r"-?\d+", solution_str)
    correct = bool(numbers) and numbers[-1] == str(ground_truth).strip()
    # A dict with "score" (and any extra numbers, logged as reward/<name>_mean) is accepted too.
    return {"score": 1.0 if correct else 0.0, "answered": float(bool(numbers))}
