"""`eval=nll`: held-out NLL of the reference answers, checked against a direct per-example computation with plain
transformers, through `python -m prefkd.evaluate`'s `run`, and as `final_eval` after training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from prefkd.eval.nll import evaluate_nll, nll_sums, score_set, takes_logits_to_keep
from tests.helpers.shared import shared_dir

RECORDS = [  # prompts of different lengths (padding), a non-ASCII answer, an S-NI-style list of references
    {"prompt": "Name a primary colour.\n", "output": "Red is a primary colour."},
    {"prompt": "Translate 'coffee' into French and Japanese, then say something about it in a sentence.\n",
     "output": "Café — コーヒー. Naïve people think it is ünhealthy ✓"},
    {"prompt": "Give a title.\n", "output": ["First reference title", "A second, longer reference that is not scored"]},
    {"prompt": "Count to five.\n", "output": "one two three four five"},
]


def answer(record: dict) -> str:
    return record["output"][0] if isinstance(record["output"], list) else record["output"]


def write_set(path: Path, records=RECORDS) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def gpt2():
    """A tiny random GPT-2 (2 layers, width 32) with the real GPT-2 tokenizer, in eval mode."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(str(shared_dir() / "tokenizers" / "gpt2"))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=2, n_head=2))
    return model.eval(), tokenizer


def direct(model, tokenizer, record: dict, max_prompt_length: int = 256) -> tuple[float, int]:
    """(Σ −log p over answer + EOS, tokens) with plain transformers: one unpadded sequence, log_softmax by hand."""
    prompt = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"][:max_prompt_length]
    ids = prompt + tokenizer(answer(record), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return score_ids(model, ids, len(prompt)), len(ids) - len(prompt)


def score_ids(model, ids: list[int], start: int) -> float:
    """Σ_{i >= start} −log p(ids[i] | ids[:i]) for one sequence (no padding)."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    return -sum(logp[i - 1, ids[i]].item() for i in range(start, len(ids)))


def test_nll_and_bpb_match_a_direct_computation_with_padding(gpt2, tmp_path):
    model, tokenizer = gpt2
    data = write_set(tmp_path / "mine.jsonl")
    results = evaluate_nll(model, tokenizer, {"mine": data}, tmp_path / "out", batch_size=3, limit=None,
                           max_prompt_length=256, max_length=1024, progress=False, model_name="tiny-gpt2")
    sums, tokens = zip(*(direct(model, tokenizer, r) for r in RECORDS))
    nbytes = sum(len(answer(r).encode("utf-8")) for r in RECORDS)
    s = results["sets"]["mine"]
    assert (s["n"], s["tokens"], s["bytes"], s["truncated"]) == (4, sum(tokens), nbytes, 0)
    assert s["nll"] == pytest.approx(sum(sums) / sum(tokens), rel=1e-5)
    assert s["bpb"] == pytest.approx(sum(sums) / (math.log(2) * nbytes), rel=1e-5)
    assert results["average"]["nll"] == s["nll"] and results["average"]["bpb"] == s["bpb"]
    rows = [json.loads(x) for x in (tmp_path / "out/mine/examples.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in RECORDS]
    for row, record, total, n in zip(rows, RECORDS, sums, tokens):
        assert row["nll_sum"] == pytest.approx(total, rel=1e-5) and row["tokens"] == n
        assert row["bytes"] == len(answer(record).encode("utf-8"))  # non-ASCII: bytes, not characters
    assert rows[1]["bytes"] > len(answer(RECORDS[1]))
    settings = json.loads((tmp_path / "out/settings.json").read_text())
    assert settings["model"] == "tiny-gpt2" and settings["max_length"] == 1024 and settings["batch_size"] == 3


def test_sni_lists_score_their_first_reference(gpt2, tmp_path):
    model, tokenizer = gpt2
    listed = write_set(tmp_path / "listed.jsonl", [RECORDS[2]])
    first = write_set(tmp_path / "first.jsonl", [{**RECORDS[2], "output": answer(RECORDS[2])}])
    results = evaluate_nll(model, tokenizer, {"listed": listed, "first": first}, tmp_path / "out", progress=False)
    assert results["sets"]["listed"] == results["sets"]["first"]
    assert results["sets"]["listed"]["bytes"] == len("First reference title")


def test_an_answer_cut_by_max_length_counts_its_kept_bytes(gpt2, tmp_path):
    model, tokenizer = gpt2
    record = RECORDS[3]
    prompt = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
    prompt_len = len(prompt)
    kept = tokenizer(record["output"], add_special_tokens=False)["input_ids"][:3]
    results = evaluate_nll(model, tokenizer, {"cut": write_set(tmp_path / "cut.jsonl", [record])}, tmp_path / "out",
                           max_prompt_length=prompt_len, max_length=prompt_len + 3, progress=False)
    s = results["sets"]["cut"]
    assert (s["truncated"], s["tokens"], s["bytes"]) == (1, 3, len(tokenizer.decode(kept).encode("utf-8")))
    assert s["bytes"] == len("one two three")  # no EOS scored, only the three kept answer tokens
    assert s["nll"] == pytest.approx(score_ids(model, prompt + kept, prompt_len) / 3, rel=1e-5)


MIXED = [  # very different prompt and answer lengths, not in length order (GPT-2: " word" is one token)
    {"prompt": "Say hi.\n", "output": "Hi."},
    {"prompt": "Read this:" + " word" * 150 + "\nSummarise it.\n", "output": "Words."},
    {"prompt": "Write a long list.\n", "output": "Sure:" + " item" * 120},
    {"prompt": "Context:" + " fact" * 60 + "\nQuestion?\n", "output": "An answer of" + " some" * 40 + " length."},
    {"prompt": "Name a primary colour.\n", "output": "Red is a primary colour."},
]


def examples_of(records):
    from prefkd.eval.sets import EvalExample

    return [EvalExample(prompt=r["prompt"], references=(answer(r),)) for r in records]


def full_logits_sums(model, tokenizer, records, batch_size: int) -> list[float]:
    """The computation before length sorting and logits_to_keep: file-order batches, all (B, T, V) logits."""
    from prefkd.data.dataset import collate
    from prefkd.data.tokenize import tokenize_pair

    tokenized = [tokenize_pair(r["prompt"], answer(r), tokenizer, 256, 1024) for r in records]
    sums = []
    for start in range(0, len(tokenized), batch_size):
        batch = collate([{"input_ids": t.input_ids, "labels": t.labels} for t in tokenized[start:start + batch_size]],
                        tokenizer.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        sums += [torch.nn.functional.cross_entropy(logits[b], batch["labels"][b], reduction="sum").item()
                 for b in range(len(logits))]
    return sums


@pytest.mark.parametrize("batch_size", [2, 5])
def test_sorted_batches_with_kept_logits_equal_the_full_logits_computation_in_file_order(gpt2, batch_size):
    model, tokenizer = gpt2
    rows = score_set(model, tokenizer, examples_of(MIXED), batch_size=batch_size, max_prompt_length=256,
                     max_length=1024)
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in MIXED]
    old = full_logits_sums(model, tokenizer, MIXED, batch_size)
    for row, record, before in zip(rows, MIXED, old):
        total, tokens = direct(model, tokenizer, record)
        assert row["tokens"] == tokens and row["nll_sum"] == pytest.approx(total, rel=1e-5)
        assert row["nll_sum"] == pytest.approx(before, rel=1e-5)


class Plain(torch.nn.Module):
    """A model whose forward takes no ``logits_to_keep``: all logits."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


class Swallows(Plain):
    """Takes any keyword and ignores it: all logits even when ``logits_to_keep`` is passed."""

    def forward(self, input_ids, attention_mask, **kwargs):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


class PassesOn(Plain):
    """A peft-like wrapper: ``get_base_model`` and a forward that passes its keywords on."""

    def get_base_model(self):
        return self.inner

    def forward(self, **kwargs):
        return self.inner(**kwargs)


@pytest.mark.parametrize("wrapper, takes", [(Plain, False), (Swallows, False), (PassesOn, True)])
def test_a_model_without_logits_to_keep_gives_the_same_numbers(gpt2, tmp_path, wrapper, takes):
    model, tokenizer = gpt2
    wrapped = wrapper(model).eval()
    assert takes_logits_to_keep(model) and takes_logits_to_keep(wrapped) == takes
    data = write_set(tmp_path / "mixed.jsonl", MIXED)
    kept = evaluate_nll(model, tokenizer, {"mixed": data}, tmp_path / "kept", batch_size=3, progress=False)
    full = evaluate_nll(wrapped, tokenizer, {"mixed": data}, tmp_path / "full", batch_size=3, progress=False)
    for key in ("nll", "bpb"):
        assert full["sets"]["mixed"][key] == pytest.approx(kept["sets"]["mixed"][key], rel=1e-5)
    kept_rows, full_rows = ([json.loads(x) for x in (tmp_path / d / "mixed/examples.jsonl").read_text().splitlines()]
                            for d in ("kept", "full"))
    assert [r["prompt"] for r in full_rows] == [r["prompt"] for r in kept_rows] == [r["prompt"] for r in MIXED]
    assert [r["nll_sum"] for r in full_rows] == pytest.approx([r["nll_sum"] for r in kept_rows], rel=1e-5)


def test_a_forced_logits_to_keep_that_the_model_ignores_is_sliced(gpt2):
    model, tokenizer = gpt2
    from prefkd.data.dataset import collate
    from prefkd.data.tokenize import tokenize_pair

    tokenized = [tokenize_pair(r["prompt"], answer(r), tokenizer, 256, 1024) for r in MIXED[:3]]
    batch = collate([{"input_ids": t.input_ids, "labels": t.labels} for t in tokenized], tokenizer.pad_token_id)
    args = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert nll_sums(Swallows(model), *args, keep=True) == pytest.approx(nll_sums(model, *args), rel=1e-5)


def test_logits_are_built_only_from_the_first_answer_position(gpt2):
    """One batch with long prompts: the output head sees B × (T − lo) positions, not B × T; batches go longest first."""
    from prefkd.data.tokenize import tokenize_pair

    model, tokenizer = gpt2
    records = [MIXED[1], MIXED[3], MIXED[1], MIXED[0]]  # two of the longest-prompt records in the first batch
    counted, lengths = [], []
    hooks = [model.lm_head.register_forward_hook(lambda m, i, out: counted.append(out.shape[:-1].numel())),
             model.register_forward_pre_hook(lambda m, a, kw: lengths.append(kw["input_ids"].shape[1]),
                                             with_kwargs=True)]
    try:
        score_set(model, tokenizer, examples_of(records), batch_size=2, max_prompt_length=256, max_length=1024)
    finally:
        for h in hooks:
            h.remove()
    tokenized = [tokenize_pair(r["prompt"], answer(r), tokenizer, 256, 1024) for r in records]
    longest = sorted((len(t.input_ids) for t in tokenized), reverse=True)
    assert lengths == [longest[0], longest[2]]  # longest first, padded to its batch's longest
    first = [t for t in tokenized if t.prompt_length > 100]  # the two copies of MIXED[1]
    T, lo = len(first[0].input_ids), first[0].prompt_length - 1
    assert counted[0] == 2 * (T - lo) and counted[0] < 2 * T / 10
    assert sum(counted) < sum(2 * n for n in lengths)


def compose_eval(*overrides):
    from hydra import compose, initialize_config_dir

    from prefkd.utils.config import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("evaluate", overrides=list(overrides))


def test_the_config_defaults(shared):
    from prefkd.eval.sets import resolve_data_path

    e = compose_eval("eval=nll").eval
    assert e.protocol == "nll" and list(e.datasets) == ["dolly", "self_inst", "vicuna", "sinst"]
    assert (e.limit, e.batch_size, e.max_prompt_length, e.max_length) == (None, 8, 256, 1024)
    assert all(resolve_data_path(e.sets[name]).is_file() for name in e.datasets)


def test_the_command_writes_the_result_files(tiny_dir, tmp_path, capsys):
    """`python -m prefkd.evaluate eval=nll model.path=<tiny dir> 'eval.datasets=[dolly,vicuna]' eval.limit=3`."""
    from prefkd.training.evaluation import run
    from prefkd.training.tracking import eval_table

    out = tmp_path / "eval"
    cfg = compose_eval("eval=nll", f"model.path={tiny_dir}", "eval.datasets=[dolly,vicuna]", "eval.limit=3",
                       "eval.batch_size=2", "logger=none", "device=cpu", "progress=false", f"output_dir={out}")
    results = run(cfg, out)
    assert json.loads((out / "results.json").read_text()) == results
    assert results["protocol"] == "nll" and results["model"] == str(tiny_dir) and results["limit"] == 3
    assert list(results["sets"]) == ["dolly", "vicuna"] and results["average"]["sets"] == ["dolly", "vicuna"]
    for name, s in results["sets"].items():
        assert set(s) == {"nll", "bpb", "tokens", "bytes", "n", "truncated"} and s["n"] == 3
        assert 0 < s["nll"] < 2 * math.log(32000) and s["bpb"] > 0  # a random model: about ln V nats per token
        assert len((out / name / "examples.jsonl").read_text().splitlines()) == 3
    assert results["average"]["nll"] == pytest.approx((results["sets"]["dolly"]["nll"]
                                                       + results["sets"]["vicuna"]["nll"]) / 2)
    md = (out / "results.md").read_text()
    assert "| set | nll | bpb | n |" in md and "| dolly |" in md and "| Avg. |" in md and md in capsys.readouterr().out
    csv = (out / "results.csv").read_text().splitlines()
    assert csv[0] == "set,nll,bpb,tokens,bytes,n,truncated" and [r.split(",")[0] for r in csv[1:]] == [
        "dolly", "vicuna", "average"]
    columns, rows, values = eval_table(results)  # what logger=wandb logs
    assert columns == ["set", "n", "nll", "bpb"] and rows[-1][:2] == ["average", 6]
    assert values["eval/vicuna/bpb"] == results["sets"]["vicuna"]["bpb"]


FINAL = ("eval@final_eval=nll", "final_eval.enabled=true", "final_eval.datasets=[vicuna,dolly]",
         "final_eval.limit=2", "final_eval.batch_size=2")


def test_final_eval_nll_after_training(tmp_path, shared):  # the sets of shared/data
    from prefkd.training.pipeline import run
    from tests.helpers.runs import compose_cfg

    summary = run(compose_cfg("loss=sft", "trainer.max_steps=2", *FINAL), tmp_path / "run")
    results = json.loads((tmp_path / "run/eval/results.json").read_text())
    assert results == summary["eval"] and results["protocol"] == "nll"
    assert results["model"] == summary["checkpoints"]["best"] and set(results["sets"]) == {"vicuna", "dolly"}
    assert all(s["n"] == 2 and s["nll"] > 0 for s in results["sets"].values())
    assert (tmp_path / "run/eval/results.md").is_file()


def test_a_missing_set_fails_before_training(tmp_path):
    from prefkd.training.pipeline import run
    from tests.helpers.runs import compose_cfg

    # UnNI is not in shared/: the error names it and the command that fetches it
    with pytest.raises(FileNotFoundError, match=r"unni.*`python -m prefkd.data fetch (dolly )?unni`"):
        run(compose_cfg("loss=sft", *FINAL, "final_eval.datasets=[dolly,unni]"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_missing_set_file_fails_before_the_model_loads(tmp_path, monkeypatch):
    """prefkd.evaluate eval=nll with a set file that is not there: an error naming eval.sets, no model loaded."""
    from hydra import compose, initialize_config_dir

    import prefkd.training.evaluation as evaluation
    from prefkd.utils.config import config_dir

    monkeypatch.setattr(evaluation, "instantiate", lambda *a, **k: pytest.fail("the model was loaded"))
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["eval=nll", "model.path=unused", "logger=none",
                                                         f"eval.sets.dolly={tmp_path}/missing.jsonl",
                                                         "eval.datasets=[dolly]", f"output_dir={tmp_path}/out"])
    with pytest.raises(FileNotFoundError, match=r"eval\.sets\.<name>=PATH"):
        evaluation.run(cfg, tmp_path / "out")
