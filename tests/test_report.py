import json

import pytest

from rlkit.report import _timeline, compare_runs, make_report, read_metrics


def write_run(run_dir, rows):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(run_dir)


def synthetic_rows(stages=("judge", "generate"), steps=6, scale=1.0):
    rows = []
    for stage in stages:
        for step in range(1, steps + 1):
            row = {
                "stage": stage,
                "step": step,
                "reward/mean": scale * step / steps,
                "reward/std": 0.1,
                "response/length_mean": 40.0 - step,
                "response/truncated_frac": 0.05,
                "actor/kl": 0.001 * step,
                "actor/entropy": 1.0 - 0.05 * step,
                "actor/clip_frac": 0.02,
                "actor/grad_norm": 0.5,
                "timing/generate": 1.5,
                "timing/reward": 0.2,
                "timing/update": 0.8,
                "timing/step": 2.6,
                "throughput/rollout_tokens_per_s": 900.0,
                "throughput/learner_tokens_per_s": 3000.0,
                "sparse/kv_bytes": 1e6,
            }
            if step % 3 == 0:
                row["eval/accuracy"] = 0.1 * step * scale
            rows.append(row)
    return rows


def test_report_writes_every_figure(tmp_path):
    run = write_run(tmp_path / "run", synthetic_rows())
    paths = make_report(run)
    names = {p.split("/")[-1] for p in paths}
    expected = {"reward.png", "accuracy.png", "response_length.png", "kl.png", "entropy.png"}
    expected |= {"actor.png", "timings.png", "throughput.png", "sparse.png"}
    assert names == expected
    for path in paths:
        assert path.startswith(f"{run}/report/")
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_missing_series_are_skipped(tmp_path):
    run = write_run(tmp_path / "run", [{"step": 1, "reward/mean": 0.0}, {"step": 2, "note": "x"}])
    assert [p.split("/")[-1] for p in make_report(run, str(tmp_path / "out"))] == ["reward.png"]


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, \n{"step": 3}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: malformed JSON line"):
        read_metrics(str(path))
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=rf"{path}:2: expected a JSON object"):
        read_metrics(str(path))


def test_half_written_last_line_of_a_live_run_is_ignored(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "rew')
    assert [r["step"] for r in read_metrics(str(path))] == [1, 2]


def test_timeline_continues_restarted_stages_and_drops_rewritten_steps():
    rows = [
        {"stage": "sft", "step": 1},
        {"stage": "sft", "step": 2},
        {"stage": "rlvr", "step": 1},
        {"stage": "rlvr", "step": 2},
        {"stage": "rlvr", "step": 3, "v": "old"},
        {"stage": "rlvr", "step": 4, "v": "old"},
        # resumed from the step-2 checkpoint of the rlvr stage
        {"stage": "rlvr", "step": 3, "v": "new"},
    ]
    points = _timeline(rows)
    assert [(x, stage) for x, stage, _ in points] == [
        (1, "sft"),
        (2, "sft"),
        (3, "rlvr"),
        (4, "rlvr"),
        (5, "rlvr"),
    ]
    assert points[-1][2]["v"] == "new"


def test_compare_runs_draws_one_png_per_curve(tmp_path):
    dense = write_run(tmp_path / "dense", synthetic_rows(stages=("rlvr",)))
    sparse = write_run(tmp_path / "sparse", synthetic_rows(stages=("rlvr",), scale=0.9))
    paths = compare_runs([dense, sparse], str(tmp_path / "cmp"), labels=["dense", "sparse"])
    names = [p.split("/")[-1] for p in paths]
    assert names == ["accuracy.png", "reward.png", "response_length.png", "rollout_throughput.png"]
    assert all((tmp_path / "cmp" / n).stat().st_size > 0 for n in names)
    with pytest.raises(ValueError, match="1 labels for 2 runs"):
        compare_runs([dense, sparse], str(tmp_path / "cmp"), labels=["dense"])


def test_judge_metrics_get_their_figure_and_comparison(tmp_path):
    rows = synthetic_rows()
    for row in rows:
        if row["stage"] == "judge":
            row.update({"judge/accuracy": 0.5, "judge/parse_fail_frac": 0.1})
        if "eval/accuracy" in row:
            row["eval/judge_accuracy"] = 0.6
    run = write_run(tmp_path / "run", rows)
    names = {p.split("/")[-1] for p in make_report(run)}
    assert "judge.png" in names
    other = write_run(tmp_path / "other", rows)
    compared = compare_runs([run, other], str(tmp_path / "cmp"))
    assert "judge_accuracy.png" in {p.split("/")[-1] for p in compared}


def test_speculative_metrics_get_their_figures_and_comparison(tmp_path):
    """MTP-RL runs: accepted length over training per run (frozen / plain / advantage)."""
    runs = []
    for name, slope in (("frozen", 0.0), ("plain", 0.02), ("advantage", 0.04)):
        rows = synthetic_rows(stages=("rlvr",))
        for row in rows:
            row.update(
                {
                    "spec/accept_len_mean": 2.0 + slope * row["step"],
                    "spec/accept_rate": 0.5,
                    "spec/draft_ms": 3.0,
                    "mtp/loss": 1.0,
                    "timing/rollout": 4.0,
                }
            )
        runs.append(write_run(tmp_path / name, rows))
    names = {p.split("/")[-1] for p in make_report(runs[0])}
    assert {"speculative.png", "mtp.png"} <= names
    compared = {p.split("/")[-1] for p in compare_runs(runs, str(tmp_path / "cmp"))}
    assert {"accept_len.png", "rollout_seconds.png"} <= compared
