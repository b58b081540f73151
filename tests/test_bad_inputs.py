"""Every bad input file fails with the file, the row (where there is one) and the reason, never a bare
library error; under ``on_invalid: drop`` the row-level cases are dropped, counted and reported."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from pathlib import Path

import pandas as pd
import pytest
from kedro.io import DatasetError

from rpo_pipeline.datasets import PreferenceFileDataset
from rpo_pipeline.preference_data import PreferenceDataError, ingest, read_preference_files

PAIRS = [{"prompt": f"prompt {i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(40)]


def jsonl(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def load(path: Path | str, on_invalid: str = "raise"):
    return ingest(read_preference_files(str(path)), on_invalid=on_invalid)


def fails(path: Path | str, on_invalid: str = "raise") -> str:
    with pytest.raises(PreferenceDataError) as e:
        load(path, on_invalid)
    return str(e.value)


# ---- file-level problems: the same error under either policy -------------------------------------
def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _truncated(compress, data: bytes) -> bytes:
    packed = compress(data)
    return packed[: len(packed) // 2]


def _bad_crc(data: bytes) -> bytes:
    packed = bytearray(gzip.compress(data))
    packed[-8] ^= 0xFF  # the CRC32 in the gzip trailer
    return bytes(packed)


FILE_CASES = [
    ("empty.jsonl", b"", r"empty.jsonl: the file is empty$"),
    ("blank.jsonl", b"\n   \n\n", r"blank.jsonl: the file is empty$"),
    ("empty.jsonl.gz", gzip.compress(b""), r"empty.jsonl.gz: the file is empty$"),
    ("header_only.csv", b"prompt,chosen,rejected\n", r"header_only.csv: the file has no rows"),
    ("empty_array.json", b"[]", r"empty_array.json: the file has no rows"),
    ("latin1.csv", b"prompt,chosen,rejected\np,a,b\ncaf\xe9,a,b\n",
     r"latin1.csv: line 3: not valid UTF-8 at byte offset 32 \(b'\\xe9,a,'\)"),
    ("latin1.json", b'[{"prompt": "p", "chosen": "a", "rejected": "b"},\n {"prompt": "caf\xe9"}]',
     r"latin1.json: line 2: not valid UTF-8 at byte offset 66"),
    ("truncated.jsonl.gz", _truncated(gzip.compress, jsonl(PAIRS * 20)),
     r"truncated.jsonl.gz: the gzip data is truncated or corrupt \(the stream ends before its end marker\); "
     r"it broke off after \d+ decompressed bytes \(\d+ complete lines\)"),
    ("bad_crc.jsonl.gz", _bad_crc(jsonl(PAIRS)),
     r"bad_crc.jsonl.gz: the gzip data is truncated or corrupt \(.*incorrect data check\)"),
    ("not_gzip.jsonl.gz", b"this was never gzip",
     r"not_gzip.jsonl.gz: the gzip data is truncated or corrupt"),
    ("truncated.jsonl.bz2", _truncated(bz2.compress, jsonl(PAIRS * 20)),
     r"truncated.jsonl.bz2: the bz2 data is truncated or corrupt"),
    ("truncated.jsonl.xz", _truncated(lzma.compress, jsonl(PAIRS * 20)),
     r"truncated.jsonl.xz: the xz data is truncated or corrupt"),
    ("cut.json", json.dumps(PAIRS).encode()[:-30],
     r"cut.json: line 1, column \d+: invalid JSON \(.*\) \(the file ends in the middle of a value: truncated\?\)"),
    ("not_objects.json", b'[{"prompt": "p", "chosen": "a", "rejected": "b"}, 3]',
     r"not_objects.json: row 2: expected a JSON object, got int"),
    ("broken.parquet", b"PAR1 this is not parquet", r"broken.parquet: not a readable Parquet file \(ArrowInvalid"),
    ("bad_quotes.csv", b'prompt,chosen,rejected\n"p,a,b\n',
     r"bad_quotes.csv: not valid CSV \(.*\)"),
    ("data.txt", b"hello", r"data.txt: unsupported file type 'txt'; use jsonl, json, parquet or csv"),
    ("sharegpt.json", json.dumps([{
        "conversations": [{"from": "human", "value": "Hi"}],
        "chosen": {"from": "gpt", "value": "Hello!"}, "rejected": {"from": "gpt", "value": "Go away."}}]).encode(),
     r"sharegpt.json: looks like ShareGPT / LLaMA-Factory pairs \(`conversations`, `chosen`, `rejected` as "
     r"\{from, value\} messages\)\. Convert .* Supported formats: pairs \(prompt, chosen, rejected.*scored"),
    ("oasst.jsonl", jsonl([{"message_tree_id": "t1", "tree_state": "ready_for_export", "prompt": {
        "text": "How?", "role": "prompter", "replies": [{"text": "Like so.", "role": "assistant", "rank": 0}]}}]),
     r"oasst.jsonl: looks like OpenAssistant message trees .* Supported formats: pairs"),
    ("chat.jsonl", jsonl([{"messages": [{"role": "user", "content": "hi"}]}]),
     r"chat.jsonl: looks like chat transcripts \(`messages`\) without preferences"),
    ("imdb.jsonl", jsonl([{"text": "A fine film.", "label": 1}]),  # format text: too short
     r"imdb.jsonl: row 1: text has 3 words; the prompt takes \d"),
    ("unknown_columns.jsonl", jsonl([{"question": "q", "answer": "a"}]),
     r"unknown_columns.jsonl: cannot detect the preference format from the columns \['answer', 'question'\]; "
     r"supported formats: pairs"),
]


@pytest.mark.parametrize(("name", "data", "expected"), FILE_CASES, ids=[c[0] for c in FILE_CASES])
@pytest.mark.parametrize("on_invalid", ["raise", "drop"])
def test_bad_file_fails_with_file_and_reason(tmp_path, name, data, expected, on_invalid):
    path = _write(tmp_path, name, data)
    message = fails(path, on_invalid)
    assert message.startswith(str(path)), message
    assert __import__("re").search(expected, message), message


def test_every_line_unreadable_names_the_first_bad_row(tmp_path):
    path = _write(tmp_path, "all_bad.jsonl", b"{not json}\n[1, 2]\n")
    assert "all_bad.jsonl: row 1: invalid JSON" in fails(path, "drop")


def test_glob_matching_no_file(tmp_path):
    assert "no file matches this glob (the folder" in fails(tmp_path / "nowhere" / "*.jsonl")
    assert f"{tmp_path}/*.jsonl: no file matches this glob (the folder {tmp_path} exists" in \
        fails(tmp_path / "*.jsonl")
    assert "no such file" in fails(tmp_path / "missing.jsonl")
    assert "is a folder; give a file or a glob such as" in fails(tmp_path)


def test_files_of_different_formats_under_one_glob(tmp_path):
    _write(tmp_path, "a_pairs.jsonl", jsonl(PAIRS[:3]))
    _write(tmp_path, "b_scored.jsonl", jsonl([{"prompt": "q", "responses": ["x", "y"], "scores": [1.0, 0.0]}]))
    _write(tmp_path, "c_scored_pairs.jsonl", jsonl([{**PAIRS[5], "score_chosen": 2.0, "score_rejected": 1.0}]))
    message = fails(tmp_path / "*.jsonl")
    assert message.startswith("files of different formats under one path:")
    for part in ("a_pairs.jsonl: pairs;", "b_scored.jsonl: scored;", "c_scored_pairs.jsonl: pairs with scores"):
        assert part in message, message
    # an explicit format names the file that lacks its columns
    with pytest.raises(PreferenceDataError, match=r"b_scored.jsonl: format 'pairs' needs the columns "
                                                  r"\['prompt', 'chosen', 'rejected'\]; missing \['chosen', "):
        ingest(read_preference_files(str(tmp_path / "*.jsonl")), fmt="pairs")
    # one format across files is fine, rows from every file
    for p in tmp_path.glob("[bc]_*"):
        p.unlink()
    _write(tmp_path, "d_pairs.jsonl", jsonl(PAIRS[3:6]))
    assert load(tmp_path / "*.jsonl").counts == {"rows_in": 6, "rows_out": 6, "rows_dropped": 0}


# ---- row-level problems: raise names file and row; drop counts and reports them ------------------
ROW_CASES = [
    (b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n',
     r"row 3: not valid UTF-8 at byte offset \d+ \(b'\\xe9\", '\); save the file as UTF-8"),
    (b'{"prompt": "p", "chosen": "a", "rejec\n', r"row 3: the line is cut off in the middle of its JSON"),
    (b'{"prompt": "p", "chosen": "a" "rejected": "b"}\n', r"row 3: invalid JSON \(Expecting ',' delimiter"),
    (b'["prompt", "chosen"]\n', r"row 3: expected a JSON object, got list"),
    (b'{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": NaN, "score_rejected": 0}\n',
     r"row 3: 'score_chosen' is missing or NaN"),
    (b'{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": Infinity, "score_rejected": 0}\n',
     r"row 3: 'score_chosen' is infinite"),
    (b'{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 1, "score_rejected": -1e999}\n',
     r"row 3: 'score_rejected' is infinite"),
]


@pytest.mark.parametrize(("bad_line", "expected"), ROW_CASES, ids=[c[1][7:40] for c in ROW_CASES])
def test_bad_row_raises_with_file_row_reason_or_is_dropped_and_counted(tmp_path, bad_line, expected):
    scored = "score_chosen" in bad_line.decode("utf-8", "replace")
    good = [{**r, "score_chosen": 1.0, "score_rejected": 0.0} if scored else r for r in PAIRS[:4]]
    path = _write(tmp_path, "rows.jsonl", jsonl(good[:2]) + bad_line + jsonl(good[2:]))
    message = fails(path)
    assert message.startswith(f"{path}: row 3: ") and __import__("re").search(expected, message), message

    result = load(path, "drop")
    assert result.counts == {"rows_in": 5, "rows_out": 4, "rows_dropped": 1}
    dropped = result.dropped.iloc[0]
    assert (dropped["source_file"], dropped["source_row"]) == (str(path), 3)
    assert __import__("re").search(expected.removeprefix("row 3: "), dropped["reason"])


def test_a_file_cut_off_mid_line_keeps_every_complete_row(tmp_path):
    path = _write(tmp_path, "cut.jsonl", jsonl(PAIRS) + b'{"prompt": "p", "chos')
    assert "row 41: the line is cut off in the middle of its JSON (Unterminated string) at the end of " \
           "the file: truncated?" in fails(path)
    result = load(path, "drop")
    assert result.counts == {"rows_in": 41, "rows_out": 40, "rows_dropped": 1}


def test_mixed_row_problems_are_all_reported(tmp_path):
    lines = (jsonl(PAIRS[:3]) + b'{"prompt": "\xff"}\n' + b"{oops}\n"
             + jsonl([{**PAIRS[3], "chosen": PAIRS[3]["rejected"]}]) + jsonl(PAIRS[:1]))
    result = load(_write(tmp_path, "mixed.jsonl", lines), "drop")
    assert result.counts == {"rows_in": 7, "rows_out": 3, "rows_dropped": 4}
    reasons = result.dropped.set_index("source_row")["reason"].to_dict()
    assert set(reasons) == {4, 5, 6, 7}
    assert "not valid UTF-8" in reasons[4] and "invalid JSON" in reasons[5]
    assert "identical" in reasons[6] and reasons[7] == "duplicate of row 1"


def test_compressed_files_read_like_plain_ones(tmp_path):
    data = jsonl(PAIRS)
    for name, packed in [("a.jsonl.gz", gzip.compress(data)), ("b.jsonl.bz2", bz2.compress(data)),
                         ("c.jsonl.xz", lzma.compress(data)), ("d.jsonl.gz", gzip.compress(data[:500])
                                                                 + gzip.compress(data[500:]))]:
        frame = read_preference_files(str(_write(tmp_path / name[0], name, packed)))
        assert len(frame) == len(PAIRS) and frame["prompt"].tolist() == [r["prompt"] for r in PAIRS], name


def test_through_the_kedro_dataset_the_message_is_kept(tmp_path):
    """The catalog entry wraps the error in Kedro's DatasetError; file, row and reason survive."""
    path = _write(tmp_path, "t.jsonl.gz", _truncated(gzip.compress, jsonl(PAIRS * 20)))
    with pytest.raises(DatasetError, match=r"t.jsonl.gz: the gzip data is truncated or corrupt"):
        PreferenceFileDataset(filepath=str(path)).load()
    ok = PreferenceFileDataset(filepath=str(_write(tmp_path, "ok.jsonl", jsonl(PAIRS)))).load()
    assert isinstance(ok, pd.DataFrame) and len(ok) == len(PAIRS)
