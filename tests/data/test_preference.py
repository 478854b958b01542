"""Preference records (docs/methods.md §10): HH splitting on the real HH data, the prompt/chosen/rejected format with
weights, reverse really swaps, and clear errors for empty or equal responses."""

from __future__ import annotations

import json

import pytest

from prefkd.data.preference import HH_SEP, PreferencePair, load_pairs, pairs_as_records, to_pair
from prefkd.data.records import DataError


def test_real_hh_pairs_split_at_the_last_assistant_turn(shared):
    path = shared / "data/preference/hh_harmless_test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()[:200]]
    pairs = load_pairs(path, limit=200, skip_invalid=True)
    assert 190 <= len(pairs) <= 200
    for pair in pairs:
        assert pair.prompt.endswith(HH_SEP) and pair.prompt.startswith("\n\nHuman:")
        assert pair.chosen.strip() and pair.rejected.strip() and pair.chosen != pair.rejected
    row = next(r for r in rows if r["chosen"].count(HH_SEP) == 1 and r["rejected"].count(HH_SEP) == 1)
    pair = to_pair(row, "row")
    assert pair.prompt + pair.chosen == row["chosen"] and pair.prompt + pair.rejected == row["rejected"]
    assert HH_SEP not in pair.chosen


def test_reverse_really_swaps_responses_and_weights(tmp_path):
    rec = {"prompt": "Q:", "chosen": " good", "rejected": " bad", "chosen_weight": [1, 2], "rejected_weight": [3]}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    (fwd,), (rev,) = load_pairs(path), load_pairs(path, reverse=True)
    assert fwd == PreferencePair("Q:", " good", " bad", (1.0, 2.0), (3.0,))
    assert rev == PreferencePair("Q:", " bad", " good", (3.0,), (1.0, 2.0))
    assert rev.reversed() == fwd
    assert pairs_as_records([fwd]) == [{**rec, "chosen_weight": [1.0, 2.0], "rejected_weight": [3.0]}]


@pytest.mark.parametrize("rec,match", [
    ({"prompt": "Q:", "chosen": " same", "rejected": " same"}, "identical"),
    ({"prompt": "Q:", "chosen": "  ", "rejected": " no"}, "chosen.* empty"),
    ({"prompt": "Q:", "chosen": " yes", "rejected": ""}, "rejected.* empty"),
    ({"prompt": "Q:", "chosen": " yes"}, "rejected"),
    ({"chosen": "no turns", "rejected": "none"}, "Assistant"),
    ({"prompt": "Q:", "chosen": " a", "rejected": " b", "chosen_weight": "high"}, "chosen_weight"),
])
def test_bad_pairs_name_the_file_line_and_fix(tmp_path, rec, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "Q:", "chosen": " ok", "rejected": " no"}) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(DataError, match=match) as err:
        load_pairs(path)
    assert "bad.jsonl" in str(err.value) and ("record 2" in str(err.value) or "line 2" in str(err.value))


def test_skip_invalid_drops_only_empty_or_equal_pairs(tmp_path):
    recs = [{"prompt": "Q:", "chosen": " a", "rejected": " b"}, {"prompt": "Q:", "chosen": " s", "rejected": " s"}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(DataError, match="skip_invalid"):
        load_pairs(path)
    assert load_pairs(path, skip_invalid=True) == [PreferencePair("Q:", " a", " b")]


def test_a_datasets_folder_loads_like_a_hub_id(tmp_path):
    """load_hub_pairs goes through datasets.load_dataset (a hub id such as Anthropic/hh-rlhf, or a local folder)."""
    from prefkd.data.preference import load_hub_pairs, preference_splits

    folder = tmp_path / "hh"
    folder.mkdir()
    rows = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: yes {i}", "rejected": f"\n\nHuman: q{i}\n\nAssistant: no"}
            for i in range(6)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load_hub_pairs(str(folder), split="train", reverse=True, limit=4)
    assert [p.chosen for p in pairs] == [" no"] * 4 and pairs[1].rejected == " yes 1"
    splits = preference_splits(str(folder / "train.jsonl"), dev_size=2)
    assert len(splits.train) == 4 and len(splits.dev) == 2 and splits.train[0]["prompt"].endswith("Assistant:")
    with pytest.raises(DataError, match="could not load preference data"):
        load_hub_pairs(str(tmp_path / "missing-dataset"), split="train")
