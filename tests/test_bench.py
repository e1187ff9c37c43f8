"""`rlkit bench rollout` on a tiny model: every row measured, same work, JSON as documented."""

import json

import pytest
import torch

from rlkit.bench import format_table, main, rollout
from rlkit.config.schema import KVCompressionConfig
from rlkit.models.tiny import save_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(str(tmp_path_factory.mktemp("bench") / "m"), "llama", seed=3)


def test_rows_json_and_ratios(model_dir, tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = [
        "--model", model_dir, "--batch", "3", "--prompt-len", "20", "--max-new-tokens", "24",
        "--repeats", "2", "--modes", "dense,sparse", "--engines", "native,native-plain,native-torch,hf",
        "--budget", "12", "--window", "4", "--interval", "4", "--threads", "1",
        "--json", str(out),
    ]  # fmt: skip
    rows = rollout(argv)
    assert [(r["engine"], r["mode"]) for r in rows] == [
        ("native", "dense"),
        ("native", "sparse"),
        ("native-plain", "dense"),
        ("native-plain", "sparse"),
        ("native-torch", "dense"),
        ("native-torch", "sparse"),
        ("hf", "dense"),
    ]
    for r in rows:
        assert r["tokens"] == 3 * 24  # ignore_eos: every row does the same work
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
        assert r["prefill_s"] > 0 and r["ms_per_step"] >= 0 and r["peak_mem_bytes"] > 0
    assert rows[0]["ratio_vs_native_dense"] == 1.0
    assert rows[6]["ratio_vs_native_dense"] == pytest.approx(
        rows[6]["tokens_per_s"] / rows[0]["tokens_per_s"]
    )
    # The compressed cache holds at most budget + interval entries per sequence, not 44.
    assert rows[1]["kv_bytes_peak"] < rows[0]["kv_bytes_peak"]
    saved = json.loads(out.read_text())
    for row in saved:
        assert {"engine", "mode", "tokens_per_s", "kv_bytes_peak", "ratio_vs_native_dense"} <= set(
            row
        )
    table = capsys.readouterr().out
    assert "vs native dense" in table and "sparse" in table


def test_bad_choices_name_the_valid_ones(model_dir):
    with pytest.raises(SystemExit, match="valid: dense, sparse, spec"):
        rollout(["--model", model_dir, "--modes", "dense,speculative"])
    with pytest.raises(SystemExit, match="valid: mtp, sam, sam\\+mtp"):
        rollout(["--model", model_dir, "--modes", "spec", "--drafter", "eagle"])
    with pytest.raises(
        SystemExit,
        match="valid: native, native-plain, native-onednn, native-torch, native-eager, hf, vllm",
    ):
        rollout(["--model", model_dir, "--engines", "trt"])
    assert main([]) == 2


def test_table_formats_missing_values():
    text = format_table([{"engine": "native", "mode": "dense", "tokens_per_s": 10.0}])
    assert "native" in text and "-" in text


def test_spec_rows_per_drafter_on_task_prompts(model_dir, capsys):
    argv = [
        "--model", model_dir, "--batch", "2", "--max-new-tokens", "12", "--repeats", "1",
        "--modes", "dense,spec", "--drafter", "sam,sam+mtp", "--engines", "native",
        "--task", "arithmetic", "--task-args", '{"steps": true}', "--sam-min-match", "2",
        "--temperature", "0", "--threads", "1",
    ]  # fmt: skip
    rows = rollout(argv)
    assert [(r["mode"], r["drafter"]) for r in rows] == [
        ("dense", None),
        ("spec", "sam"),
        ("spec", "sam+mtp"),
    ]
    for r in rows[1:]:
        assert r["tokens"] == 2 * 12
        assert r["accept_len_mean"] >= 1.0 and r["drafted_per_step"] >= 0 and r["draft_ms"] >= 0
    out = capsys.readouterr().out
    assert "acc len" in out and "mtp=untrained" in out


def test_tail_draft_length_reaches_the_engine_and_bad_settings_stop_first(
    model_dir, tmp_path, monkeypatch
):
    from rlkit.rollout import engine as engine_module

    seen = []
    real = engine_module.Engine.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        seen.append(self.speculative)

    monkeypatch.setattr(engine_module.Engine, "__init__", spy)
    out = tmp_path / "rows.json"
    argv = [
        "--model", model_dir, "--batch", "4", "--max-new-tokens", "12", "--repeats", "1",
        "--modes", "spec", "--drafter", "sam", "--engines", "native", "--task", "arithmetic",
        "--sam-min-match", "1", "--temperature", "0", "--threads", "1",
    ]  # fmt: skip
    rollout([*argv, "--tail-rows", "4", "--tail-draft-tokens", "5", "--json", str(out)])
    spec = [s for s in seen if s is not None]
    assert spec and all(s.draft_tokens(4) == 5 and s.draft_tokens(5) == 3 for s in spec)
    (row,) = json.loads(out.read_text())
    assert row["settings"]["tail_rows"] == 4 and row["settings"]["tail_draft_tokens"] == 5
    with pytest.raises(SystemExit, match="--tail-draft-tokens must be >= num_draft_tokens"):
        rollout([*argv, "--num-draft-tokens", "3", "--tail-rows", "2", "--tail-draft-tokens", "2"])
    with pytest.raises(SystemExit, match="--mtp-draft argmax needs an MTP drafter"):
        rollout([*argv, "--mtp-draft", "argmax"])
    # Draft chains: more than the drafter makes, and off the CUDA-graph step, fail up front.
    with pytest.raises(SystemExit, match=r"--draft-chains \(3\) is more than drafter 'sam'"):
        rollout([*argv, "--draft-chains", "3"])
    with pytest.raises(SystemExit, match="CUDA-graph verify step: a GPU"):
        rollout([*argv, "--draft-chains", "2", "--device", "cpu"])
    # The MTP drafter's argmax drafts in a sampling run.
    seen.clear()
    mtp = [a if a != "sam" else "mtp" for a in argv]
    rollout([*mtp, "--mtp-draft", "argmax", "--temperature", "1", "--json", str(out)])
    assert {s.mtp_draft for s in seen if s is not None} == {"argmax"}
    (row,) = json.loads(out.read_text())
    assert row["settings"]["mtp_draft"] == "argmax" and row["accept_len_mean"] >= 1.0


def test_stop_at_eos_rows_count_what_was_generated(model_dir):
    from argparse import Namespace

    from rlkit.bench import _params

    ns = Namespace(temperature=0.0, top_p=1.0, top_k=0)
    assert _params(Namespace(**vars(ns), stop_at_eos=True), 8, 0).ignore_eos is False
    assert _params(Namespace(**vars(ns), stop_at_eos=False), 8, 0).ignore_eos is True
    argv = [
        "--model", model_dir, "--batch", "2", "--max-new-tokens", "12", "--repeats", "2",
        "--modes", "dense,spec", "--drafter", "sam", "--engines", "native", "--stop-at-eos",
        "--task", "arithmetic", "--sam-min-match", "2", "--temperature", "0", "--threads", "1",
    ]  # fmt: skip
    rows = rollout(argv)
    # Greedy speculative decoding is lossless: the same tokens, so the same count, EOS or not.
    assert rows[0]["tokens"] == rows[1]["tokens"] <= 2 * 2 * 12  # both timed runs
    for r in rows:
        assert r["ms_per_step"] is None
        # throughput over both timed runs
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / sum(r["seconds_all"]))
    with pytest.raises(SystemExit, match="--stop-at-eos: the hf engine"):
        rollout(["--model", model_dir, "--engines", "native,hf", "--stop-at-eos"])


def test_interleaved_rows_time_repeat_i_of_every_row_first(model_dir, monkeypatch, capsys):
    import rlkit.bench as bench

    order = []
    real = bench._repeat

    def spy(runner, args, timed, i):
        order.append((runner.mode, i))
        real(runner, args, timed, i)

    monkeypatch.setattr(bench, "_repeat", spy)
    argv = [
        "--model", model_dir, "--batch", "2", "--max-new-tokens", "10", "--repeats", "3",
        "--modes", "dense,spec", "--drafter", "sam", "--engines", "native", "--task",
        "arithmetic", "--sam-min-match", "2", "--temperature", "0", "--threads", "1",
    ]  # fmt: skip
    rows = rollout([*argv, "--interleave"])
    assert order == [(m, i) for i in range(3) for m in ("dense", "spec")]
    assert [r["mode"] for r in rows] == ["dense", "spec"]
    for r in rows:
        assert len(r["seconds_all"]) == 3 and r["tokens"] == 2 * 10
        assert r["peak_mem_bytes"] is None
    assert rows[1]["accept_len_mean"] >= 1.0
    out = capsys.readouterr()
    assert "interleaved" in out.err and "interleave=True" in out.out
    # Without the flag: one row's repeats, then the other's.
    order.clear()
    rows = rollout(argv)
    assert order == [(m, i) for m in ("dense", "spec") for i in range(3)]
    assert all(r["peak_mem_bytes"] > 0 for r in rows)


def test_kv_memory_sizes_each_mode_and_the_rows_say_how_many(model_dir, capsys):
    """--kv-memory-gb: the dense row admits what that many GiB hold at its full length, the
    sparse row what they hold at budget + interval entries: more, and it decodes them."""
    from rlkit.config.schema import KVCompressionConfig
    from rlkit.models import load_model
    from rlkit.rollout import Engine

    model, tok = load_model(model_dir)
    probe = Engine(model, tok, dtype=torch.float32)
    cfg = KVCompressionConfig(policy="snapkv", budget=12, window=4, interval=4)
    dense_per, sparse_per = probe.slot_bytes(44, None), probe.slot_bytes(44, cfg)
    gb = 3 * dense_per / 2**30
    argv = [
        "--model", model_dir, "--batch", "6", "--prompt-len", "20", "--max-new-tokens", "24",
        "--repeats", "1", "--modes", "dense,sparse", "--engines", "native", "--dtype", "float32",
        "--budget", "12", "--window", "4", "--interval", "4", "--threads", "1",
        "--kv-memory-gb", repr(gb),
    ]  # fmt: skip
    rows = rollout(argv)
    assert [r["mode"] for r in rows] == ["dense", "sparse"]
    assert rows[0]["seqs_admitted"] == 3  # 6 sequences in two waves
    assert rows[1]["seqs_admitted"] == min(6, 3 * dense_per // sparse_per) == 6
    assert all(r["tokens"] == 6 * 24 for r in rows)
    out = capsys.readouterr().out
    assert "seqs" in out and "kv_memory_gb=" in out


def test_sparse_memory_wall_driver_on_cpu(model_dir, tmp_path, monkeypatch):
    """benchmarks/sparse_memory_wall.py (the GPU script's driver) end to end at tiny sizes,
    with the fill compaction: the equal-memory row admits what the budget holds for the
    compressed cache, and the JSON has the keys the issue asks for."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "sparse_memory_wall.py"
    spec = importlib.util.spec_from_file_location("sparse_memory_wall", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "wall.json"
    argv = [
        "--model", model_dir, "--device", "cpu", "--dtype", "float32", "--batch", "2",
        "--prompt-len", "8", "--new-tokens", "40", "--budget", "16", "--window", "4",
        "--interval", "8", "--copy-gb", "0.01", "--threads", "1", "--json", str(out),
        "--also-interval", "4", "--compaction", "fill", "--rounds", "3",
    ]  # fmt: skip
    from rlkit.rollout.kv_cache import CompressedKVCache

    fills = []
    fill = CompressedKVCache._fill
    monkeypatch.setattr(
        CompressedKVCache, "_fill", lambda self, *a: (fills.append(1), fill(self, *a))[1]
    )
    res = mod.main(argv)
    saved = json.loads(out.read_text())
    for key in ("device", "equal_batch_speedup", "equal_batch_kv_fraction",
                "equal_memory_sequences_ratio", "equal_memory_speedup"):  # fmt: skip
        assert key in saved
    assert saved["device"] == "cpu" and saved["settings"]["compaction"] == "fill"
    mem_rows = res["rows"]["equal_memory"]
    # --compaction reaches the engine's cache: it filled (auto would not, on the CPU).
    assert fills
    # Three rounds, each row at its median one: the figures are a round's rows' ratios.
    assert len(res["rounds"]) == 3
    ratios = sorted(r["equal_memory_speedup"] for r in res["rounds"])
    assert ratios[0] <= res["equal_memory_speedup"] <= ratios[-1]
    assert res["floors"]["dense"]["ms_per_step"] in [r["dense_ms_per_step"] for r in res["rounds"]]
    assert mem_rows[0]["seqs_admitted"] == res["equal_memory_sequences_expected"] > 2
    assert res["equal_memory_sequences_ratio"] == mem_rows[0]["seqs_admitted"] / 2
    assert [r["seqs_admitted"] for r in res["rows"]["equal_batch"]] == [2, 2]
    assert 0 < res["equal_batch_kv_fraction"] < 1
    assert res["floors"]["dense"]["floor_ms_per_step"] > 0
    # The row at the other interval holds a smaller row a sequence: no fewer sequences.
    other = saved["equal_memory_other_interval"]
    assert other["interval"] == 4 and other["row"]["kv_bytes_peak"] > 0
    assert other["sequences_ratio"] >= res["equal_memory_sequences_ratio"]
    # Mean entries follow the cache: dense grows with every token; sparse stays under
    # budget + interval.
    cfg = KVCompressionConfig(policy="snapkv", budget=16, window=4, interval=8)
    assert mod.mean_entries(8, 40, None) == pytest.approx(8 + 20)
    assert 16 < mod.mean_entries(8, 400, cfg) <= 24


def _load_benchmark(name):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sparse_rl_long_summary_and_recipe(tmp_path, monkeypatch):
    """benchmarks/gpu/sparse_rl_long.sh's CPU parts: the recipe loads sparse and dense (the
    script's override), and the summary reads two run directories into the issue's figures."""
    from rlkit.config import load_recipe

    root = __import__("pathlib").Path(__file__).parents[1]
    monkeypatch.chdir(root)
    sparse_cfg = load_recipe("recipes/sparse_rl_long.yaml")
    dense_cfg = load_recipe("recipes/sparse_rl_long.yaml", ["rollout.kv_compression.policy=none"])
    kv = sparse_cfg.rollout.kv_compression
    assert kv.policy == "snapkv" and dense_cfg.rollout.kv_compression.policy == "none"
    # A 600-token sequence keeps at most budget + interval entries: >= 40% removed.
    assert 1 - (kv.budget + kv.interval) / 600 >= 0.4
    assert sparse_cfg.rollout.max_new_tokens >= 1024 and sparse_cfg.data.task == "arithmetic_set"
    # The counting recipe: its shortest right answer (120 numbers, >= 4 tokens each) is 480
    # tokens with the 52-token prompt; a cache of budget + interval removes >= 40% of it.
    counting = load_recipe("recipes/sparse_rl_counting.yaml")
    ckv = counting.rollout.kv_compression
    assert counting.data.task == "counting" and ckv.policy == "snapkv"
    assert counting.data.task_args["length"][0] >= 120
    assert 1 - (ckv.budget + ckv.interval) / (52 + 4 * 120) >= 0.4

    def write(name, rows, acc):
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        summary = {
            "eval_before": {"eval/accuracy": 0.0, "eval/reward_mean": 0.1},
            "eval_after": {"eval/accuracy": acc, "eval/reward_mean": 3 * acc},
        }
        (d / "summary.json").write_text(json.dumps(summary))
        return str(d)

    sparse = write(
        "s",
        [
            {"timing/rollout": 4.0, "response/length_mean": 600.0, "rollout/kv_retained_frac": 0.5,
             "rollout/kv_retained_frac_max": 0.6},
            {"timing/rollout": 2.0, "response/length_mean": 500.0, "rollout/kv_retained_frac": 0.4,
             "rollout/kv_retained_frac_max": 0.7},
            {"eval/accuracy": 0.1},  # an eval row: not a step
        ],
        0.05,
    )  # fmt: skip
    dense = write(
        "d",
        [{"timing/rollout": 9.0, "response/length_mean": 560.0}] * 2,
        0.07,
    )
    mod = _load_benchmark("sparse_rl_long_summary")
    out = mod.main([sparse, dense, "--json", str(tmp_path / "o.json")])
    assert out["sparse"]["steps"] == 2 and out["sparse"]["mean_response_tokens"] == 550
    assert out["rollout_time_ratio_dense_over_sparse"] == pytest.approx(18 / 6)
    assert out["kv_removed_frac_mean"] == pytest.approx(0.55)
    assert out["sparse"]["kv_retained_frac_max"] == 0.7
    assert out["accuracy_gap_points"] == pytest.approx(-2.0)
    assert all(out["acceptance"].values())
    assert json.loads((tmp_path / "o.json").read_text())["dense"]["rollout_seconds"] == 18
    # A partial-credit task compares eval/reward_mean: 15% vs 21%, 6 points apart.
    out = mod.main([sparse, dense, "--metric", "eval/reward_mean"])
    assert out["accuracy_gap_points"] == pytest.approx(-6.0) and out["sparse"]["eval_before"] == 0.1
    assert not out["acceptance"]["accuracy_within_3_points"]
    with pytest.raises(ValueError, match="--metric must be an eval/ key"):
        mod.main([sparse, dense, "--metric", "reward_mean"])


def test_group_repeats_each_prompt_as_an_rl_step_does(model_dir, monkeypatch):
    import rlkit.bench as bench

    seen = {}

    def spy(plan, args, model_dir, prompts):
        seen["prompts"] = prompts
        return []

    monkeypatch.setattr(bench, "_measure_plan", spy)
    argv = ["--model", model_dir, "--batch", "6", "--engines", "native", "--task", "arithmetic"]
    rollout([*argv, "--group", "3"])
    p = seen["prompts"]
    assert len(p) == 6 and p[0] == p[1] == p[2] and p[3] == p[4] == p[5] and p[0] != p[3]
    rollout(argv)  # default: one sample a prompt
    assert len({tuple(x) for x in seen["prompts"]}) == 6
    with pytest.raises(SystemExit, match="--group 4 must be >= 1 and divide --batch 6"):
        rollout([*argv, "--group", "4"])


def test_spec_summary_at_a_fixed_policy_and_the_rl_runs_length_flag(model_dir, tmp_path):
    """benchmarks/spec_summary.py: `bench` reads an interleaved bench's rows (the phase's
    seconds are the repeats' means); `gpu` flags a speculative RL run whose responses drifted
    away from dense's lengths (its rollout seconds are then not the same work)."""
    rows = tmp_path / "rows.json"
    argv = [
        "--model", model_dir, "--batch", "4", "--group", "2", "--max-new-tokens", "12",
        "--repeats", "2", "--modes", "dense,spec", "--drafter", "sam", "--engines", "native",
        "--task", "arithmetic", "--sam-min-match", "1", "--temperature", "1", "--threads", "1",
        "--stop-at-eos", "--json", str(rows),
    ]  # fmt: skip
    mod = _load_benchmark("spec_summary")
    rollout(argv)
    with pytest.raises(SystemExit, match="--interleave"):
        mod.main(["bench", str(rows), "--out", str(tmp_path / "s.json")])
    rollout([*argv, "--interleave"])
    mod.main(["bench", str(rows), "--out", str(tmp_path / "s.json")])
    out = json.loads((tmp_path / "s.json").read_text())
    (rec,) = out["records"]
    dense, spec = json.loads(rows.read_text())
    assert rec["rollout_seconds_dense"] == pytest.approx(sum(dense["seconds_all"]) / 2)
    assert rec["rollout_seconds_spec"] == pytest.approx(sum(spec["seconds_all"]) / 2)
    assert rec["reduction"] == pytest.approx(
        1 - rec["rollout_seconds_spec"] / rec["rollout_seconds_dense"]
    )
    assert rec["group"] == 2 and rec["drafter"] == "sam" and rec["repeats"] == 2
    assert out["best"]["drafter"] == "sam"

    def run(name, lengths, spec=None):
        d = tmp_path / name
        d.mkdir()
        steps = [
            {"timing/rollout": 2.0, "response/length_mean": n, "response/length_max": 2 * n}
            for n in lengths
        ]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
        (d / "config.yaml").write_text(
            "rollout:\n  speculative: {drafter: sam, num_draft_tokens: 3}\n" if spec else "{}\n"
        )
        return str(d)

    dense_dir = run("dense", [100, 500, 500])
    same, short = run("same", [100, 480, 520], True), run("short", [100, 200, 300], True)
    out = mod.main(
        ["gpu", "--dense", dense_dir, "--spec", same, short, "--out", str(tmp_path / "g.json"),
         "--device", "test"]
    )  # fmt: skip
    out = json.loads((tmp_path / "g.json").read_text())
    a, b = out["records"]
    assert not a["lengths_differ"] and b["lengths_differ"]
    assert b["response_length_mean_spec"] == 250 and b["response_length_max_dense"] == 1000


def test_warm_up_on_a_gpu_is_a_whole_run():
    """A timed GPU run must not pay for the CUDA graphs its tail captures or for kernels its
    cache's capacity selects: where rows retire at different steps, and for a native dense
    row (its cache sized by the run's tokens), the warm-up runs as long as a timed run; a
    compressed row's to its first compression (`warmup_tokens`); on the CPU a few tokens."""
    import argparse

    import rlkit.bench as bench

    class Runner:
        warmup_tokens = 8

        def __init__(self, drafter, engine="native", mode="sparse"):
            self.calls = []
            self.drafter = drafter
            self.engine, self.mode = engine, mode

        def generate(self, n, seed):
            self.calls.append(n)
            return 0.01, n

    for device, eos, drafter, kind, first in (
        ("cuda", True, None, ("native", "sparse"), 300),
        ("cuda:1", False, "sam", ("native", "spec"), 300),
        ("cuda", False, None, ("native", "dense"), 300),  # the capacity picks the kernels
        ("cuda", False, None, ("native", "sparse"), 8),  # sized by budget: one shape
        ("cuda", False, None, ("hf", "dense"), 8),
        ("cpu", True, "sam", ("native", "spec"), 8),
        ("cpu", False, None, ("native", "dense"), 8),
    ):
        r = Runner(drafter, *kind)
        ns = argparse.Namespace(max_new_tokens=300, repeats=2, device=device, stop_at_eos=eos)
        bench._warm(r, ns)
        assert r.calls == [first, 1, 1], (device, eos, drafter, kind)


def test_step_timeline_by_kind_and_rows(model_dir, capsys):
    """--step-times: each native row's steps by kind and running sequences; a speculative row
    with a tail draft length shows both kinds, and the counts are the steps the run took."""
    argv = [
        "--model", model_dir, "--batch", "4", "--max-new-tokens", "12", "--repeats", "1",
        "--modes", "dense,spec", "--drafter", "sam", "--engines", "native", "--task",
        "arithmetic", "--sam-min-match", "1", "--num-draft-tokens", "2", "--tail-rows", "2",
        "--tail-draft-tokens", "3", "--temperature", "0", "--threads", "1", "--step-times",
    ]  # fmt: skip
    dense, spec = rollout(argv)
    plain = dense["step_ms"]["plain"]
    # Every row runs to the cap together: 11 steps after the prefill's token, at 4 rows.
    assert set(plain) == {4} and plain[4][0] == 11 and plain[4][1] > 0
    kinds = spec["step_ms"]
    assert set(kinds) <= {"spec k2", "spec k3"} and "spec k2" in kinds
    assert all(rows > 2 for rows in kinds["spec k2"])
    assert all(rows <= 2 for rows in kinds.get("spec k3", {}))
    out = capsys.readouterr().out
    assert "native dense\n  plain: 3-4 rows" in out and "spec k2:" in out
    # Without the flag: no timeline.
    assert rollout(argv[:-1])[0]["step_ms"] is None
