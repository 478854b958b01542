"""The instruction-set protocol: result files, interface keys, and resuming an interrupted evaluation."""

from __future__ import annotations

import json

import pytest

import prefkd.eval.instruct as instruct
from prefkd.eval.generation import Sampling
from prefkd.eval.instruct import evaluate_instruct, generation_file

SAMPLING = Sampling(max_new_tokens=6)


@pytest.fixture
def sets(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps({"prompt": f"Question {i}: name a colour.", "output": "blue"}) + "\n"
                         for i in range(3)))
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps({"instruction": f"Count to {i}", "input": "", "output": ["1 2", "one two"]}) + "\n"
                         for i in range(2)))
    return {"a": str(a), "b": str(b)}


@pytest.fixture
def count_generate(monkeypatch):
    calls = []
    real = instruct.generate

    def counting(model, tokenizer, prompts, **kw):
        calls.append((kw["desc"], len(prompts)))
        return real(model, tokenizer, prompts, **kw)

    monkeypatch.setattr(instruct, "generate", counting)
    return calls


def run(tiny, sets, out, **kw):
    model, tok = tiny
    kw = {"seeds": [10, 20], "batch_size": 2, "sampling": SAMPLING, "progress": False, "model_name": "tiny", **kw}
    return evaluate_instruct(model, tok, sets, out, **kw)


def test_results_files_and_interface_keys(tiny, sets, tmp_path, count_generate):
    out = tmp_path / "out"
    res = run(tiny, sets, out)
    assert len(count_generate) == 4
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["sets"]["a"]["seeds"]["10"]["rougeL"] == res["sets"]["a"]["seeds"]["10"]["rougeL"]
    for name, n in [("a", 3), ("b", 2)]:
        block = on_disk["sets"][name]
        for seed in ("10", "20"):
            per = block["seeds"][seed]
            assert set(per) >= {"rougeL", "exact_match", "n", "gen_len_mean"} and per["n"] == n
            rows = [json.loads(x) for x in generation_file(out, name, int(seed)).read_text().splitlines()]
            assert len(rows) == n and all({"prompt", "references", "generation"} <= set(r) for r in rows)
            assert all(isinstance(r["references"], list) for r in rows)
        for key in ("rougeL_mean", "rougeL_std", "exact_match_mean", "exact_match_std"):
            assert key in block
        values = [block["seeds"][s]["rougeL"] for s in ("10", "20")]
        assert block["rougeL_mean"] == pytest.approx(sum(values) / 2)
        assert block["rougeL_std"] == pytest.approx(abs(values[0] - values[1]) / 2)
    avg = on_disk["average"]
    assert avg["rougeL_mean"] == pytest.approx(
        (on_disk["sets"]["a"]["rougeL_mean"] + on_disk["sets"]["b"]["rougeL_mean"]) / 2)
    assert "exact_match_mean" in avg and "rougeL_std" in avg
    md = (out / "results.md").read_text()
    assert "| metric | a | b | Avg. |" in md and "±" in md
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert (csv_lines[0] == "set,seed,n,rougeL,exact_match,gen_len_mean"
            and any(x.startswith("a,mean,") for x in csv_lines))


def test_resume_generates_only_missing_pairs(tiny, sets, tmp_path, count_generate):
    out = tmp_path / "out"
    first = run(tiny, sets, out)
    # an interruption after (a, 10): the other files and the results were never written
    for name, seed in [("a", 20), ("b", 10), ("b", 20)]:
        generation_file(out, name, seed).unlink()
    (out / "results.json").unlink()
    kept = generation_file(out, "a", 10)
    mtime = kept.stat().st_mtime_ns
    count_generate.clear()
    second = run(tiny, sets, out)
    assert sorted(d for d, _ in count_generate) == ["a seed 20", "b seed 10", "b seed 20"]
    assert kept.stat().st_mtime_ns == mtime
    assert second["reused_pairs"] == 1 and second["generated_pairs"] == 3
    assert second["sets"] == first["sets"]  # the regenerated pairs reproduce (same seeds)
    count_generate.clear()
    run(tiny, sets, out)
    assert count_generate == []


def test_resume_with_other_limit_regenerates(tiny, sets, tmp_path, count_generate):
    out = tmp_path / "out"
    run(tiny, {"a": sets["a"]}, out, seeds=[10], limit=2)
    run(tiny, {"a": sets["a"]}, out, seeds=[10], limit=3)
    assert [n for _, n in count_generate] == [2, 3]


def test_resume_refuses_other_decoding_settings(tiny, sets, tmp_path):
    out = tmp_path / "out"
    run(tiny, {"a": sets["a"]}, out, seeds=[10])
    with pytest.raises(ValueError, match="other settings.*max_new_tokens"):
        run(tiny, {"a": sets["a"]}, out, seeds=[10], sampling=Sampling(max_new_tokens=7))


def test_broken_set_fails_before_generating(tiny, sets, tmp_path, count_generate):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "output": ["x", ""]}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl line 1"):
        run(tiny, {"a": sets["a"], "bad": str(bad)}, tmp_path / "out")
    assert count_generate == []
