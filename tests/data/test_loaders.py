import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlkit.data.loaders import DataError, drop_long_prompts, load_samples, load_sft_pairs

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
RECORDS = [
    # verl's nested layout
    {
        "prompt": CHAT,
        "reward_model": {"style": "rule", "ground_truth": "4"},
        "data_source": "openai/gsm8k",
        "extra_info": {"index": 0},
    },
    # flat ground truth, string prompt, optional fields left out, numeric truth
    {"prompt": "What is 3 + 3?", "ground_truth": 6},
]


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_jsonl_round_trip(tmp_path):
    samples = load_samples(write_jsonl(tmp_path / "d.jsonl", RECORDS))
    assert samples == [
        {
            "prompt": CHAT,
            "ground_truth": "4",
            "data_source": "openai/gsm8k",
            "extra_info": {"index": 0},
        },
        {
            "prompt": "What is 3 + 3?",
            "ground_truth": "6",
            "data_source": "custom",
            "extra_info": {},
        },
    ]


def test_parquet_round_trip_in_verl_layout(tmp_path):
    path = tmp_path / "d.parquet"
    table = pa.Table.from_pylist(
        [
            {
                "prompt": CHAT,
                "reward_model": {"style": "rule", "ground_truth": str(i)},
                "data_source": "src",
                "extra_info": {"index": i, "split": "train"},
            }
            for i in range(3)
        ]
    )
    pq.write_table(table, path)
    samples = load_samples(str(path))
    assert [s["ground_truth"] for s in samples] == ["0", "1", "2"]
    assert samples[2] == {
        "prompt": CHAT,
        "ground_truth": "2",
        "data_source": "src",
        "extra_info": {"index": 2, "split": "train"},
    }


def test_dict_ground_truth_is_kept_for_verl_functions(tmp_path):
    record = {"prompt": "p", "reward_model": {"ground_truth": {"target": 5, "numbers": [2, 3]}}}
    assert load_samples(write_jsonl(tmp_path / "d.jsonl", [record]))[0]["ground_truth"] == {
        "target": 5,
        "numbers": [2, 3],
    }


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"ground_truth": "1"}, "field 'prompt' is missing"),
        ({"prompt": "  ", "ground_truth": "1"}, "field 'prompt' is empty"),
        (
            {"prompt": [{"role": "user"}], "ground_truth": "1"},
            r"field 'prompt\[0\]' must be a message",
        ),
        ({"prompt": 5, "ground_truth": "1"}, "field 'prompt' must be a string or a non-empty list"),
        ({"prompt": "p"}, r"field 'reward_model.ground_truth' \(or 'ground_truth'\) is missing"),
        ({"prompt": "p", "reward_model": {"style": "rule"}}, "reward_model.ground_truth"),
        ({"prompt": "p", "ground_truth": True}, "field 'ground_truth' must be"),
        (
            {"prompt": "p", "ground_truth": "1", "data_source": 3},
            "field 'data_source' must be a string",
        ),
        (
            {"prompt": "p", "ground_truth": "1", "extra_info": [1]},
            "field 'extra_info' must be a dict",
        ),
        ("[1, 2]", "record must be a JSON object"),
        ('{"prompt": "p", ', "line 3: invalid JSON"),
    ],
)
def test_malformed_jsonl_names_file_line_and_field(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], RECORDS[1], bad])
    with pytest.raises(DataError, match=message) as info:
        load_samples(path)
    assert f"{path}: line 3" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_malformed_parquet_names_file_row_and_field(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [{"prompt": "a", "ground_truth": "1"}, {"prompt": None, "ground_truth": "2"}]
        ),
        path,
    )
    with pytest.raises(
        DataError, match=r"bad.parquet: row 1 \(0-based\): field 'prompt' is missing"
    ):
        load_samples(str(path))


def test_blank_lines_are_skipped_and_line_numbers_stay_true(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(RECORDS[1]) + "\n\n" + json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(DataError, match="line 3"):
        load_samples(str(path))


def test_non_utf8_line_is_named_and_a_bom_is_fine(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps(RECORDS[1]).encode()
    path.write_bytes(
        b"\xef\xbb\xbf" + good + b"\n" + good + b"\n" + good[:12] + b"\xff\xfe" + good[12:]
    )
    with pytest.raises(DataError) as info:
        load_samples(str(path))
    assert str(info.value) == f"{path}: line 3: not UTF-8 text: byte 0xff at column 13"
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n")
    assert load_samples(str(path))[0]["ground_truth"] == "6"


@pytest.mark.parametrize("truth", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_ground_truth_is_an_error_not_an_answer(tmp_path, truth):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"prompt": "p", "ground_truth": 1}\n{"prompt": "p", "ground_truth": ' + truth + "}\n"
    )
    with pytest.raises(
        DataError, match=r"line 2: field 'ground_truth' is -?(nan|inf), not an answer"
    ):
        load_samples(str(path))
    table = pa.Table.from_pylist(
        [
            {
                "prompt": "p",
                "reward_model": {"ground_truth": float(truth.lower().replace("inity", ""))},
            }
        ]
    )
    pq.write_table(table, tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"row 0 \(0-based\): field 'reward_model.ground_truth'"):
        load_samples(str(tmp_path / "d.parquet"))


def test_null_ground_truth_in_parquet_is_missing(tmp_path):
    table = pa.Table.from_pylist(
        [{"prompt": "p", "ground_truth": "1"}, {"prompt": "p", "ground_truth": None}]
    )
    pq.write_table(table, tmp_path / "d.parquet")
    with pytest.raises(
        DataError,
        match=r"row 1 \(0-based\): field 'reward_model.ground_truth' \(or 'ground_truth'\) is missing",
    ):
        load_samples(str(tmp_path / "d.parquet"))


def test_empty_truncated_and_fake_parquet(tmp_path):
    pq.write_table(
        pa.Table.from_pylist([{"prompt": "p", "ground_truth": "1"}] * 20), tmp_path / "ok.parquet"
    )
    data = (tmp_path / "ok.parquet").read_bytes()
    for name, content in [
        ("empty", b""),
        ("truncated", data[: len(data) // 2]),
        ("fake", b"PAR1 not really"),
    ]:
        path = tmp_path / f"{name}.parquet"
        path.write_bytes(content)
        with pytest.raises(DataError) as info:
            load_samples(str(path))
        assert str(info.value).startswith(f"{path}: not a readable parquet file: ")
        assert "\n" not in str(info.value)


def test_files_without_records(tmp_path):
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    pq.write_table(
        pa.Table.from_pylist([{"prompt": "p", "ground_truth": "1"}]).slice(0, 0),
        tmp_path / "none.parquet",
    )
    for name in ("blank.jsonl", "none.parquet"):
        with pytest.raises(DataError, match="the file holds no records"):
            load_samples(str(tmp_path / name))
        with pytest.raises(DataError, match="the file holds no records"):
            load_sft_pairs(str(tmp_path / name))


def test_deeply_nested_json_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "p", "ground_truth": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(DataError, match="line 1: invalid JSON: nested too deeply"):
        load_samples(str(path))


def test_unsupported_and_missing_files(tmp_path):
    (tmp_path / "d.csv").write_text("prompt\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_samples(str(tmp_path / "d.csv"))
    with pytest.raises(DataError, match="no such file"):
        load_samples(str(tmp_path / "missing.jsonl"))


def test_sft_pairs_from_prompt_response_and_messages(tmp_path):
    records = [
        {"prompt": "What is 2 + 2?", "response": "4"},
        {"messages": [*CHAT, {"role": "assistant", "content": "4"}]},
    ]
    pairs = load_sft_pairs(write_jsonl(tmp_path / "sft.jsonl", records))
    assert pairs == [
        {"prompt": "What is 2 + 2?", "response": "4"},
        {"prompt": CHAT, "response": "4"},
    ]
    path = tmp_path / "sft.parquet"
    pq.write_table(pa.Table.from_pylist([records[0]]), path)
    assert load_sft_pairs(str(path)) == pairs[:1]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt": "p"}, "field 'response' is missing"),
        ({"prompt": "p", "response": 4}, "field 'response' must be a string"),
        ({"messages": CHAT}, "field .messages. must end with an assistant message"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "field .messages. must end"),
        ({"response": "r"}, "field 'prompt' is missing"),
    ],
)
def test_malformed_sft_records(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "response": "r"}, bad])
    with pytest.raises(DataError, match=f"line 2: {message}"):
        load_sft_pairs(path)


def test_drop_long_prompts_counts_and_never_truncates():
    samples = [{"prompt": "x" * n, "ground_truth": "1"} for n in [1, 5, 10, 11, 50]]
    kept, dropped = drop_long_prompts(samples, lambda s: len(s["prompt"]), max_tokens=10)
    assert dropped == 2
    assert [s["prompt"] for s in kept] == ["x", "x" * 5, "x" * 10]
