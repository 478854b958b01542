"""A `messages` run (issue 19): conversations in a JSONL file, a chat teacher whose tokenizer has its own template
(Qwen1.5's ChatML, answers ended by <|im_end|>) and a student without one (GPT-2: prefkd's ChatML, ended by EOS),
trained with a cross-tokenizer loss, on-policy steps included (the sampled answers end as the data's do)."""

from __future__ import annotations

import json

from prefkd.data.embedded import embedded_splits
from prefkd.training.pipeline import run
from tests.helpers.runs import compose_cfg
from tests.test_real_pairs import ON_POLICY


def conversations(n: int) -> list[dict]:
    """n conversations from the embedded tasks: a system turn, then one or two user/assistant exchanges."""
    records = embedded_splits(seed=0, n_train=2 * n, n_dev=1, n_test=1).train
    out = []
    for i in range(n):
        a, b = records[2 * i], records[2 * i + 1]
        turns = [{"role": "system", "content": "You are concise."},
                 {"role": "user", "content": a["instruction"]}, {"role": "assistant", "content": a["output"]}]
        if i % 2:
            turns += [{"role": "user", "content": b["instruction"]}, {"role": "assistant", "content": b["output"]}]
        out.append({"messages": turns})
    return out


def test_a_messages_dataset_trains_a_chat_pair(tmp_path, shared):  # the real tokenizers
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in conversations(20)))
    cfg = compose_cfg("model=tiny_qwen_gpt2", "loss=dskd_cma", "dataset=messages", f"dataset.source.train={path}",
                      "dataset.source.train_on=all", "dataset.source.dev_size=4", "dataset.max_prompt_length=256",
                      "dataset.max_length=384", "trainer.max_steps=3", "trainer.num_threads=1", *ON_POLICY)
    summary = run(cfg, tmp_path / "run")
    assert summary["steps"] == 3 and summary["nonfinite_steps"] == 0 and summary["dev_loss_final"] is not None
    assert summary["on_policy"]["sampled_steps"] == 2
