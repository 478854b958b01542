"""On-policy distillation (prefkd.training.on_policy): the student's samples, re-tokenised for the teacher exactly as
the dataset tokenises an output, with the loss's alignments recomputed; reproducible, resumable, and refused where it
cannot apply."""

from __future__ import annotations

import json

import pytest
import torch

from prefkd.align.lexical import LexicalCost
from prefkd.align.mined import FIELD as MINED_FIELD
from prefkd.data.dataset import DistillDataset
from prefkd.training.loader import Collate
from prefkd.training.on_policy import OnPolicySampler, OnPolicySettings, prompt_length
from prefkd.training.pipeline import run
from prefkd.utils.labels import IGNORE_INDEX
from tests.helpers.pairs import real_pair, tiny_pair
from tests.helpers.runs import QUICK_RUN, assert_same_weights, compose_cfg, quick_run, weights

ON = ("trainer.on_policy.fraction=0.5", "trainer.on_policy.max_new_tokens=12")  # seed 42: steps 0, 2, 4 sample


def sampler_for(bundles, precompute=None, max_length=64, **settings):
    """An OnPolicySampler over a DistillDataset of the bundles' records (student "b" gpt2, teacher "a")."""
    t, s, records = bundles
    ds = DistillDataset(records, s.tokenizer, t.tokenizer, max_prompt_length=24, max_length=max_length,
                        precompute=precompute, use_cache=False)
    collate = Collate(ds, s.tokenizer.pad_token_id, t.tokenizer.pad_token_id, lambda split, idx: {}, "train")
    sampler = OnPolicySampler(OnPolicySettings(**{"fraction": 1.0, "max_new_tokens": 12, **settings}), seed=7,
                              dataset=ds, collate=collate, device=torch.device("cpu"))
    return sampler, ds, collate([(i, ds[i]) for i in range(len(ds))])


def response_ids(batch: dict, row: int, side: str = "") -> list[int]:
    """The response ids of one row of a collated batch (its labels past the prompt; EOS included when learnt)."""
    labels = batch[f"{side}labels"][row]
    return [int(x) for x in labels[prompt_length(labels) - 1:] if x != IGNORE_INDEX]


# ---------------------------------------------------------------------------------------------- the sampled batch
def test_sampled_batches_are_reproducible_and_leave_the_training_rng_alone():
    sampler, _, batch = sampler_for(tiny_pair())
    model = tiny_pair()[1].model.eval()
    before = torch.get_rng_state()
    a, cost = sampler.sample_batch(model, batch, step=3, process=0, micro=0)
    assert torch.equal(torch.get_rng_state(), before)  # fork_rng: dropout's RNG is untouched
    torch.manual_seed(123)  # whatever ran before does not change the sample
    b, _ = sampler.sample_batch(model, batch, step=3, process=0, micro=0)
    c, _ = sampler.sample_batch(model, batch, step=4, process=0, micro=0)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], c["input_ids"]) or not torch.equal(a["labels"], c["labels"])
    assert not torch.equal(a["input_ids"], batch["input_ids"])  # the responses were replaced
    assert cost.rows == 4 and cost.tokens > 0 and cost.seconds > 0
    assert torch.equal(a["example_index"], batch["example_index"])


def test_the_coin_follows_fraction_and_every():
    sampler, _, _ = sampler_for(tiny_pair(), fraction=0.5, every=2)
    picked = [sampler.wants(s) for s in range(400)]
    assert not any(picked[1::2])  # every=2: odd steps never sample
    assert 70 < sum(picked[0::2]) < 130  # λ = 0.5 of the 200 eligible steps
    assert picked == [sampler.wants(s) for s in range(400)]  # a function of (seed, step) only
    off, _, _ = sampler_for(tiny_pair(), fraction=0.0)
    assert not any(off.wants(s) for s in range(50))


@pytest.mark.parametrize("pair", [("qwen1.5", "gpt2"), ("mistral", "tinyllama")], ids=["qwen-gpt2", "mistral-llama"])
def test_teacher_tokens_are_the_dataset_tokenisation_of_the_sampled_strings(pair):
    """Each sampled response, decoded, is tokenised for the teacher as the dataset tokenises that output (prompt,
    response, EOS when it ended); the student keeps its own sampled ids; the precompute hook's field is the one the
    dataset computes for the same tokens."""
    bundles = real_pair(pair)
    t, s, records = bundles
    hook = LexicalCost(t.tokenizer, s.tokenizer, include_prompt=False)
    sampler, ds, batch = sampler_for(bundles, precompute=hook, max_new_tokens=10, max_length=48)
    new, _ = sampler.sample_batch(s.model.eval(), batch, step=0, process=0, micro=0)
    checked = 0
    for row in range(len(records)):
        n = int(new["attention_mask"][row].sum())
        p = prompt_length(new["labels"][row])
        assert new["labels"][row, : p - 1].eq(IGNORE_INDEX).all()  # labels on the response only
        assert torch.equal(new["input_ids"][row, :p], ds[row]["input_ids"][:p])  # the dataset's prompt
        sampled = response_ids(new, row)
        ended = sampled[-1:] == [s.tokenizer.eos_token_id] and len(sampled) <= 10
        text = s.tokenizer.decode(sampled[:-1] if ended else sampled, skip_special_tokens=False,
                                  clean_up_tokenization_spaces=False)
        if not text.strip():
            continue  # the dataset refuses a blank output; its teacher side is checked by the empty-sample test
        want = DistillDataset([{"prompt": records[row]["prompt"], "output": text}], s.tokenizer, t.tokenizer,
                              max_prompt_length=24, max_length=48, precompute=hook, use_cache=False)[0]
        m = int(new["teacher_attention_mask"][row].sum())
        got_ids, got_labels = new["teacher_input_ids"][row, :m], new["teacher_labels"][row, :m]
        if ended:
            assert torch.equal(got_ids, want["teacher_input_ids"]) and torch.equal(got_labels, want["teacher_labels"])
        else:  # cut by max_new_tokens: the same tokens, and no EOS learnt
            full = torch.cat([want["teacher_input_ids"], want["teacher_labels"][-1:]])
            eos = t.tokenizer.eos_token_id
            assert torch.equal(torch.cat([got_ids, got_labels[-1:]]), full[:-1] if full[-1] == eos else full[:m + 1])
            assert got_labels[-1] != eos
        assert new["input_ids"][row, :n].tolist()[p:] == sampled[:n - p]  # the student keeps its own ids
        if ended:
            k = want["lex_cost"].shape
            assert torch.equal(new["lex_cost"][row, : k[0], : k[1]], want["lex_cost"])
        checked += 1
    assert checked >= 2


class ScriptedModel(torch.nn.Module):
    """generate() returns the prompts followed by fixed new tokens (one row per prompt): the edge cases at will."""

    def __init__(self, rows: list[list[int]]):
        super().__init__()
        self.rows, self.generation_config = rows, None
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask, **kwargs):
        assert kwargs["max_new_tokens"] == max(len(r) for r in self.rows) and kwargs["use_cache"]
        return torch.cat([input_ids, torch.tensor(self.rows, dtype=torch.long)], dim=1)


def test_empty_padding_and_cut_samples():
    """An immediate EOS (empty: learn to stop or not), padding only (empty too), a sample cut by max_new_tokens (no EOS
    label on either side), one ended midway; then the MinED alignment and the lexical cost of each, and a loss."""
    from prefkd.losses.mined import MinEDLoss

    t, s, records = tiny_pair()
    eos, pad = s.tokenizer.eos_token_id, s.tokenizer.pad_token_id
    word = s.tokenizer.encode(" the answer", add_special_tokens=False)
    rows = [[eos, pad, pad, pad], [pad, pad, pad, pad], (word * 4)[:4], [*word[:2], eos, pad][:4]]
    loss = MinEDLoss()
    loss.setup(s.tokenizer, t.tokenizer)
    sampler, ds, batch = sampler_for((t, s, records), precompute=loss.precompute, max_new_tokens=4)
    new, cost = sampler.sample_batch(ScriptedModel(rows), batch, step=0, process=0, micro=0)
    t_eos = t.tokenizer.eos_token_id
    assert response_ids(new, 0) == [eos] and response_ids(new, 0, "teacher_") == [t_eos]
    assert response_ids(new, 1) == [eos] and response_ids(new, 1, "teacher_") == [t_eos]
    assert response_ids(new, 2) == (word * 4)[:4]  # no EOS: the response did not end
    assert response_ids(new, 2, "teacher_")[-1] != t_eos
    assert t.tokenizer.decode(response_ids(new, 2, "teacher_")) == s.tokenizer.decode((word * 4)[:4])
    assert response_ids(new, 3) == [*word[:2], eos] and response_ids(new, 3, "teacher_")[-1] == t_eos
    assert cost.fallback_rows == 0 and cost.tokens == 0 + 0 + 4 + 2
    assert new[MINED_FIELD].shape == new["labels"].shape  # the alignment of the new tokens, not the dataset's
    with torch.no_grad():
        s_logits = s.model(input_ids=new["input_ids"], attention_mask=new["attention_mask"]).logits
        t_logits = t.model(input_ids=new["teacher_input_ids"], attention_mask=new["teacher_attention_mask"]).logits
    from prefkd.losses.base import LossInputs, ModelOutputs

    out = loss(LossInputs(batch=new, student=ModelOutputs(s_logits.requires_grad_(True)),
                          teacher=ModelOutputs(t_logits)))
    assert torch.isfinite(out.loss)


def test_max_length_cuts_a_sample_and_drops_its_eos():
    t, s, records = tiny_pair()
    eos = s.tokenizer.eos_token_id
    number = s.tokenizer.encode(" 1234", add_special_tokens=False)  # 5 student tokens, 2 teacher tokens
    sampler, ds, batch = sampler_for((t, s, records), max_new_tokens=40, max_length=32)  # prompts: 24 tokens
    rows = [(number * 6)[:30] + [eos] * 10] * len(records)
    new, _ = sampler.sample_batch(ScriptedModel(rows), batch, step=0, process=0, micro=0)
    for row in range(len(records)):
        assert int(new["attention_mask"][row].sum()) == 31
        kept = response_ids(new, row)
        assert kept[-1] != eos and len(kept) < 30
        # the teacher reads the string of the tokens the student kept, not of all 30 sampled
        teacher_text = t.tokenizer.decode(response_ids(new, row, "teacher_"))
        assert teacher_text.strip() == s.tokenizer.decode(kept).strip()


def test_a_sample_the_teacher_cannot_tokenise_keeps_its_dataset_response(monkeypatch):
    t, s, records = tiny_pair()
    sampler, ds, batch = sampler_for((t, s, records), max_new_tokens=3)
    word = s.tokenizer.encode(" the", add_special_tokens=False)[0]
    monkeypatch.setattr(sampler.tokenizer, "decode", lambda ids, **kw: "")
    new, cost = sampler.sample_batch(ScriptedModel([[word] * 3] * len(records)), batch, step=0, process=0, micro=0)
    assert cost.fallback_rows == len(records)
    assert all(torch.equal(new[k], batch[k]) for k in ("input_ids", "labels", "teacher_input_ids"))


# ---------------------------------------------------------------------------------------------- training runs
def test_fraction_zero_is_the_off_policy_run_bit_for_bit(tmp_path):
    common = ("loss=kd", "trainer.max_steps=4", "dataset.source.n_train=32", "trainer.dev_limit=4")
    off = run(compose_cfg(*common), tmp_path / "off")
    zero = run(compose_cfg(*common, "trainer.on_policy.fraction=0", "trainer.on_policy.temperature=0.3"),
               tmp_path / "zero")
    assert_same_weights(weights(tmp_path / "off"), weights(tmp_path / "zero"))
    assert off["last_train_loss"] == zero["last_train_loss"] and "on_policy" not in zero


def test_a_stopped_run_resumes_to_the_same_weights(tmp_path):
    common = ("model=tiny", "loss=minedit", "trainer.max_steps=6", "trainer.eval_every=1000",
              "dataset.source.n_train=48", "trainer.dev_limit=4", "trainer.batch_size=4", "trainer.num_threads=1",
              *ON)
    straight = quick_run(compose_cfg(*common), tmp_path / "straight")
    first = quick_run(compose_cfg(*common, "trainer.stop_at_step=3"), tmp_path / "resumed")
    assert first["on_policy"]["sampled_steps"] == 2 and not first["finished"]  # steps 0 and 2
    second = quick_run(compose_cfg(*common), tmp_path / "resumed")
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "resumed"))
    assert straight["on_policy"]["sampled_steps"] == second["on_policy"]["sampled_steps"] == 3
    assert straight["last_train_loss"] == second["last_train_loss"]
    # the samples changed training: the off-policy run ends elsewhere
    quick_run(compose_cfg(*common[:-2], "trainer.on_policy.fraction=0"), tmp_path / "off")
    assert weights(tmp_path / "off").keys() == weights(tmp_path / "straight").keys()
    assert any(not torch.equal(a, b) for a, b in zip(weights(tmp_path / "off").values(),
                                                     weights(tmp_path / "straight").values()))


LOSSES = [("tiny", "kd"), ("tiny", "uld"), ("tiny", "minedit"), ("tiny", "dskd_cma"), ("tiny", "multilevel_ot"),
          ("tiny", "mcw_kd"), ("tiny", "mcw_kd_dual"), ("tiny_same", "kd"), ("tiny_same", "dskd")]


@pytest.mark.parametrize("model,loss", LOSSES, ids=[f"{m}-{loss}" for m, loss in LOSSES])
def test_every_token_level_loss_trains_on_samples(model, loss, tmp_path):
    summary = quick_run(compose_cfg(f"model={model}", f"loss={loss}", *QUICK_RUN, *ON, "trainer.log_every=1"),
                        tmp_path / "run")
    op = summary["on_policy"]
    assert summary["steps"] == 8 and summary["nonfinite_steps"] == 0
    assert op["sampled_steps"] == 4 and op["dataset_steps"] == 4 and op["generate_tok_s"] > 0
    assert op["step_time_ratio"] > 0
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in logged if "train/loss" in m]
    assert all("perf/generate_s" in m and "perf/generate_tok_s" in m for m in train)
    assert sum(m["perf/generate_s"] > 0 for m in train) == 4  # log_every=1: the four sampled steps


REFUSED = [("loss=sft", "teacher=none", "no teacher"), ("loss=dpo", "dataset=hh", "preference pairs"),
           ("loss=kd", "trainer.on_policy.top_p=0", "trainer.on_policy.top_p"),
           ("loss=kd", "trainer.on_policy.every=0", "trainer.on_policy.every"),
           ("loss=kd", "+trainer.on_policy.lambda=0.5", "trainer.on_policy.lambda"),
           ("loss=kd", "trainer.on_policy.max_new_tokens=abc", "trainer.on_policy.max_new_tokens='abc'")]


@pytest.mark.parametrize("loss,extra,message", REFUSED, ids=["sft", "dpo", "top_p", "every", "unknown-key", "type"])
def test_what_cannot_train_on_samples_is_refused_before_any_model_loads(loss, extra, message, tmp_path, monkeypatch):
    import prefkd.training.pipeline as pipeline

    monkeypatch.setattr(pipeline, "instantiate", _no_models(pipeline.instantiate))
    with pytest.raises(ValueError, match=message):
        run(compose_cfg(loss, extra, "trainer.on_policy.fraction=0.5"), tmp_path / "run")


def test_a_teacher_cache_is_refused():
    from prefkd.losses.kd import KDLoss
    from prefkd.training.on_policy import check_on_policy

    with pytest.raises(ValueError, match="drop trainer.teacher_cache"):
        check_on_policy(OnPolicySettings(fraction=0.5), KDLoss(), "prefkd.losses.kd.KDLoss", teacher_cache=object())
    check_on_policy(OnPolicySettings(fraction=0.0), KDLoss(), "prefkd.losses.kd.KDLoss", teacher_cache=object())


def _no_models(instantiate):
    def guarded(node, *args, **kwargs):
        if "model" in str(node.get("_target_", "")) or "student" in str(node.get("_target_", "")):
            raise AssertionError(f"a model loaded before the check: {node._target_}")
        return instantiate(node, *args, **kwargs)

    return guarded
