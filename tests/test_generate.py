"""`python -m prefkd.generate` (issue 16, sequence-level KD): a model's answers to a dataset's prompts as a training
JSONL, in order, reproducible from the seed, resumable to the byte (after a limit or a kill), refusing other settings
on resume and bad input before any model loads; the file trains with `dataset=jsonl`, alone or mixed with the
original answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from prefkd.eval.generation import Sampling, generate
from prefkd.generate import GenerateError, run, side_file
from prefkd.utils.config import config_dir
from tests.helpers.runs import compose_cfg, quick_run

N_TRAIN, BATCH, MAX_NEW = 10, 4, 6
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """The tiny teacher of `model=tiny_same` (config/teacher/tiny_a.yaml: LLaMA on tokenizer "a", seed 1), saved."""
    from prefkd.models.tiny import build_tiny

    directory = tmp_path_factory.mktemp("teacher")
    bundle = build_tiny("a", "llama", hidden_size=64, num_layers=2, num_heads=4, seed=1)
    bundle.model.save_pretrained(directory)
    bundle.tokenizer.save_pretrained(directory)
    return directory


def compose_gen(teacher: Path, out: Path | None, *overrides: str):
    """The generate config: the embedded data (10 train prompts) unless another dataset=, 4 prompts a batch, 6 new
    tokens, on the CPU."""
    embedded = [] if any(o.startswith("dataset=") for o in overrides) else [
        f"dataset.source.n_train={N_TRAIN}", "dataset.source.n_dev=4", "dataset.source.n_test=4"]
    base = [f"model.path={teacher}", "device=cpu", "progress=false", "num_threads=1", *embedded,
            f"batch_size={BATCH}", f"sampling.max_new_tokens={MAX_NEW}", *([f"out={out}"] if out else [])]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="generate", overrides=[*base, *overrides])


def generate_file(teacher: Path, out: Path, *overrides: str) -> dict:
    """prefkd.generate.run, restoring torch's thread count (num_threads sets it process-wide)."""
    threads = torch.get_num_threads()
    try:
        return run(compose_gen(teacher, out, *overrides))
    finally:
        torch.set_num_threads(threads)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: checks that must come first raise before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("prefkd.models.loading.load_model", refuse)


def test_lines_answer_the_prompts_in_order_reproducibly(teacher_dir, tmp_path):
    out = tmp_path / "new" / "dir" / "gen.jsonl"  # its folder is created
    result = generate_file(teacher_dir, out)
    records = instantiate(compose_gen(teacher_dir, None).dataset.source).train
    rows = lines(out)
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in records]  # every prompt, in order
    assert [r["index"] for r in rows] == list(range(N_TRAIN))
    assert [r["reference"] for r in rows] == [r["output"] for r in records]
    assert all(set(r) == {"prompt", "output", "reference", "index", "num_tokens", "truncated"} for r in rows)
    assert all(r["output"] == r["output"].strip() != "" and 0 < r["num_tokens"] <= MAX_NEW for r in rows)
    assert all(r["truncated"] == (r["num_tokens"] == MAX_NEW) for r in rows)
    # The answers are prefkd.eval.generation's, batch by batch with the same seeds.
    from prefkd.models.loading import load_model

    bundle = load_model(str(teacher_dir), device="cpu")
    gens = generate(bundle.model, bundle.tokenizer, [r["prompt"] for r in records], batch_size=BATCH, seed=0,
                    sampling=Sampling(max_new_tokens=MAX_NEW), progress=False)
    assert [r["output"] for r in rows] == gens.texts
    # The side file: the settings and the progress; the same seed gives the same bytes, another seed other answers.
    side = json.loads(side_file(out).read_text())
    assert side == result and side["settings"]["sampling.max_new_tokens"] == MAX_NEW
    assert side["progress"] == {"items": N_TRAIN, "lines": N_TRAIN, "bytes": out.stat().st_size, "empty": 0,
                                "truncated": sum(r["truncated"] for r in rows)}
    again = tmp_path / "again.jsonl"
    generate_file(teacher_dir, again)
    assert again.read_bytes() == out.read_bytes()
    other = tmp_path / "other.jsonl"
    generate_file(teacher_dir, other, "seed=1")
    assert [r["output"] for r in lines(other)] != [r["output"] for r in rows]


@pytest.mark.parametrize("num_samples", [1, 2])
def test_resuming_after_a_limit_or_a_kill_gives_the_uninterrupted_file(teacher_dir, tmp_path, num_samples):
    common = (f"num_samples={num_samples}",)
    full = tmp_path / "full.jsonl"
    generate_file(teacher_dir, full, *common)
    expected = full.read_bytes().splitlines(keepends=True)
    assert len(expected) == N_TRAIN * num_samples
    if num_samples == 2:  # the samples of a prompt follow each other, and differ
        rows = lines(full)
        assert [(r["index"], r["sample"]) for r in rows[:4]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert sum(rows[i]["output"] != rows[i + 1]["output"] for i in range(0, len(rows), 2)) >= N_TRAIN - 1

    out = tmp_path / "out.jsonl"
    generate_file(teacher_dir, out, *common, "limit=3")  # stops inside a batch
    assert out.read_bytes().splitlines(keepends=True) == expected[:3 * num_samples]
    generate_file(teacher_dir, out, *common, "limit=2")  # a smaller limit: nothing to do, nothing cut
    assert len(lines(out)) == 3 * num_samples
    # A kill after the next batch reached the file but before the side file recorded it, then mid-line in the one
    # after: the rerun cuts both off and goes on from the last recorded batch.
    with open(out, "ab") as f:
        f.writelines(expected[3 * num_samples:6 * num_samples])
        f.write(expected[6 * num_samples][:25])
    generate_file(teacher_dir, out, *common, "limit=7")
    assert out.read_bytes().splitlines(keepends=True) == expected[:7 * num_samples]
    generate_file(teacher_dir, out, *common)
    assert out.read_bytes() == full.read_bytes()
    assert json.loads(side_file(out).read_text())["progress"] == json.loads(side_file(full).read_text())["progress"]


def test_empty_answers_are_left_out_counted_and_resumed_over(teacher_dir, tmp_path, monkeypatch):
    """An empty answer has no line (a training record needs an output) but counts as done: a resumed file with
    empty answers is still the uninterrupted one."""
    import prefkd.generate as gen_module
    from prefkd.eval.generation import Generations

    real = gen_module.generate_batches

    def blank_every_third(*args, batch_size, **kwargs):  # answers 0, 3, 6, 9 come back empty
        for b, gens in real(*args, batch_size=batch_size, **kwargs):
            texts = ["" if (b * batch_size + j) % 3 == 0 else t for j, t in enumerate(gens.texts)]
            yield b, Generations(texts=texts, num_tokens=gens.num_tokens)

    monkeypatch.setattr(gen_module, "generate_batches", blank_every_third)
    full = tmp_path / "full.jsonl"
    result = generate_file(teacher_dir, full)
    assert [r["index"] for r in lines(full)] == [1, 2, 4, 5, 7, 8]
    assert result["progress"]["empty"] == 4 and result["progress"]["items"] == N_TRAIN
    out = tmp_path / "out.jsonl"
    assert generate_file(teacher_dir, out, "limit=5")["progress"]["empty"] == 2
    generate_file(teacher_dir, out)
    assert out.read_bytes() == full.read_bytes()
    assert json.loads(side_file(out).read_text())["progress"]["empty"] == 4


def test_other_settings_on_resume_are_refused_naming_the_key(teacher_dir, tmp_path, monkeypatch):
    out = tmp_path / "gen.jsonl"
    generate_file(teacher_dir, out, "limit=2")
    before = out.read_bytes()
    monkeypatch.setattr("prefkd.models.loading.load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(GenerateError, match=r"sampling\.temperature=1\.0 there, 0\.7 now") as e:
        generate_file(teacher_dir, out, "sampling.temperature=0.7")
    assert "another out=" in str(e.value) and f"delete {out}" in str(e.value)
    with pytest.raises(GenerateError, match=r"seed=0 there, 3 now"):
        generate_file(teacher_dir, out, "seed=3")
    with pytest.raises(GenerateError, match=r"dataset\.source\.n_train=10 there, 12 now.*prompts_sha256"):
        generate_file(teacher_dir, out, "dataset.source.n_train=12")
    assert out.read_bytes() == before  # untouched
    # A file cut shorter than its side file records, or one without a side file, is refused too.
    out.write_bytes(before[:-10])
    with pytest.raises(GenerateError, match="was cut or edited"):
        generate_file(teacher_dir, out)
    side_file(out).unlink()
    with pytest.raises(GenerateError, match="has no side file gen.jsonl.config.json"):
        generate_file(teacher_dir, out)


def test_bad_input_fails_before_the_model_loads(teacher_dir, tmp_path, no_model):
    with pytest.raises(GenerateError, match="out= is required"):
        generate_file(teacher_dir, None)
    with pytest.raises(GenerateError, match="model.path= is required"):
        run(compose_gen(teacher_dir, tmp_path / "a.jsonl", "model.path=null"))
    with pytest.raises(ValueError, match="limit=0: expects an integer ≥ 1 or null"):
        generate_file(teacher_dir, tmp_path / "a.jsonl", "limit=0")
    with pytest.raises(ValueError, match="split='valid': expects one of train, dev, test"):
        generate_file(teacher_dir, tmp_path / "a.jsonl", "split=valid")
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"prompt": "P", "output": "O"}) + "\n")
    with pytest.raises(GenerateError, match=r"split='test': dataset jsonl\(train.jsonl\) has no test records.*"
                                            r"dataset.source.test=FILE.jsonl"):
        generate_file(teacher_dir, tmp_path / "a.jsonl", "dataset=jsonl", f"dataset.source.train={train}",
                      "split=test")
    with pytest.raises(GenerateError, match="preference pairs"):
        generate_file(teacher_dir, tmp_path / "a.jsonl", "dataset=hh")
    assert not (tmp_path / "a.jsonl").exists()


def test_generated_answers_train_alone_and_mixed_with_the_original_ones(teacher_dir, tmp_path):
    """SeqKD: `dataset=jsonl` on the teacher's answers, here mixed with the original answers (a list of files)."""
    gen = tmp_path / "gen.jsonl"
    generate_file(teacher_dir, gen, "limit=8")
    originals = instantiate(compose_gen(teacher_dir, None).dataset.source).train[:8]
    orig = tmp_path / "orig.jsonl"
    orig.write_text("".join(json.dumps({"prompt": r["prompt"], "output": r["output"]}) + "\n" for r in originals))
    data = ("dataset=jsonl", f"dataset.source.dev={orig}", "trainer.batch_size=4", "trainer.max_steps=2",
            "trainer.eval_every=1000", "trainer.dev_limit=4", "trainer.num_threads=1", "loss=sft")
    alone = compose_cfg(*data, f"dataset.source.train={gen}")
    assert [r["output"] for r in instantiate(alone.dataset.source).train] == [r["output"] for r in lines(gen)]
    mixed = compose_cfg(*data, f"dataset.source.train=[{gen},{orig}]")
    splits = instantiate(mixed.dataset.source)
    assert splits.source == "jsonl(gen.jsonl+orig.jsonl)" and len(splits.train) == 16
    assert [r["output"] for r in splits.train[8:]] == [r["output"] for r in originals]
    summary = quick_run(mixed, tmp_path / "run")
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["last_train_loss"]))


def test_the_command(teacher_dir, tmp_path):
    """`python -m prefkd.generate` from another directory: the file and its side file, nothing else written there;
    without out= it fails saying so."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "prefkd.generate", f"model.path={teacher_dir}", "device=cpu", "limit=2",
           "batch_size=2", f"sampling.max_new_tokens={MAX_NEW}", "dataset.source.n_train=4"]
    res = subprocess.run([*cmd, "out=gen.jsonl"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "generated: gen.jsonl (2 lines, 0 empty answers left out" in res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.jsonl", "gen.jsonl.config.json"]
    assert len(lines(tmp_path / "gen.jsonl")) == 2
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "out= is required" in res.stderr


def test_conversations_are_answered_in_the_models_template_and_written_as_chat_records(teacher_dir, tmp_path):
    """dataset=messages: each prompt is the history rendered by the generating model's template (tokenizer "a" has
    none: prefkd's ChatML), and each line keeps the history as `messages`, so the file trains as chat records."""
    from prefkd.data.chat import render_prompt
    from prefkd.data.records import to_instruction_record
    from prefkd.models.loading import load_model

    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Count to {i}."},
                                                      {"role": "assistant", "content": "1 2"}]}) + "\n"
                             for i in range(3, 7)))
    out = tmp_path / "gen.jsonl"
    generate_file(teacher_dir, out, "dataset=messages", f"dataset.source.train={chats}")
    rows = lines(out)
    assert [r["messages"] for r in rows] == [[{"role": "user", "content": f"Count to {i}."}] for i in range(3, 7)]
    assert all("prompt" not in r and r["reference"] == "1 2" for r in rows)
    assert all(to_instruction_record(r, "line") for r in rows)  # chat records: messages + output
    bundle = load_model(str(teacher_dir), device="cpu")
    gens = generate(bundle.model, bundle.tokenizer, [render_prompt(r["messages"], bundle.tokenizer) for r in rows],
                    batch_size=BATCH, seed=0, sampling=Sampling(max_new_tokens=MAX_NEW), progress=False)
    assert [r["output"] for r in rows] == gens.texts
