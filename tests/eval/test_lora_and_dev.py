"""LoRA adapters are evaluated on their base (not merged); dev ROUGE-L works on a training model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prefkd.eval.dev_rouge import dev_rouge
from prefkd.eval.generation import Sampling, generate
from prefkd.eval.metrics import score_corpus
from prefkd.models.loading import adapter_base, load_model

REPO = Path(__file__).resolve().parents[2]
DEV = [{"prompt": "Name a colour.", "output": "blue"},
       {"instruction": "Say hello", "input": "", "output": ["hello", "hi there"]},
       {"prompt": "Count to three.", "output": "one two three"}]


def make_peft(tiny_dir, lora_dropout=0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")  # random B: the adapter changes the outputs
    return get_peft_model(base, config)


@pytest.fixture(scope="module")
def adapter_dir(tiny_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter")
    make_peft(tiny_dir).save_pretrained(path)
    return path


def test_adapter_is_applied_not_merged(tiny_dir, adapter_dir):
    from peft import PeftModel

    assert adapter_base(str(adapter_dir)) == str(tiny_dir)
    bundle = load_model(adapter=str(adapter_dir), device="cpu")  # the base comes from adapter_config.json
    assert isinstance(bundle.model, PeftModel) and not bundle.model.training
    q_proj = bundle.model.base_model.model.model.layers[0].self_attn.q_proj
    assert hasattr(q_proj, "lora_A") and "default" in q_proj.lora_A  # still a LoRA layer: not merged
    ids = torch.tensor([[1, 450, 4996, 17354, 1701]])
    reference = make_peft(tiny_dir)
    reference.load_adapter(str(adapter_dir), adapter_name="saved")
    reference.set_adapter("saved")
    reference.eval()
    base = load_model(str(tiny_dir), device="cpu").model
    with torch.no_grad():
        got = bundle.model(input_ids=ids).logits
        assert torch.allclose(got, reference(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(got, base(input_ids=ids).logits, atol=1e-3)


def test_run_eval_lora_script(tiny_dir, adapter_dir, tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in DEV))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUTPUT_DIR": str(out), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["bash", str(REPO / "run_eval/run_eval_lora.sh"), str(adapter_dir), "2",
                           f"eval.datasets=[{data}]", "eval.seeds=[10]", "eval.max_new_tokens=4", "progress=false",
                           "device=cpu"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["adapter"] == str(adapter_dir) and results["model"] == str(tiny_dir)
    assert results["sets"]["mine"]["seeds"]["10"]["n"] == 3 and (out / "mine" / "seed10.jsonl").is_file()


def test_dev_rouge_on_a_training_peft_model(tiny_dir, tiny_tokenizer):
    model = make_peft(tiny_dir, lora_dropout=0.5)
    model.train()
    modes = []
    dropout = model.base_model.model.model.layers[0].self_attn.q_proj.lora_dropout["default"]
    hook = dropout.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    torch.manual_seed(7)
    expected_rng = torch.rand(2)
    torch.manual_seed(7)
    score = dev_rouge(model, tiny_tokenizer, DEV, batch_size=2, max_new_tokens=5, seed=3)
    hook.remove()
    assert torch.equal(torch.rand(2), expected_rng)  # the training RNG stream is untouched
    assert model.training and modes and not any(modes)  # generated in eval mode, handed back in train mode
    assert 0.0 <= score <= 100.0
    assert dev_rouge(model, tiny_tokenizer, DEV, batch_size=2, max_new_tokens=5, seed=3) == score
    # it is the mean over 3 sampled passes (seeds 3, 4, 5) with no_repeat_ngram_size 0
    model.eval()
    sampling = Sampling(no_repeat_ngram_size=0, max_new_tokens=5)
    refs = [["blue"], ["hello", "hi there"], ["one two three"]]
    prompts = [DEV[0]["prompt"], "Below is an instruction that describes a task. Write a response that appropriately "
               "completes the request.\n\n### Instruction:\nSay hello\n\n### Response:\n", DEV[2]["prompt"]]
    by_hand = [score_corpus(generate(model, tiny_tokenizer, prompts, sampling=sampling, batch_size=2, seed=s,
                                     progress=False).texts, refs)["rougeL"] for s in (3, 4, 5)]
    assert score == pytest.approx(sum(by_hand) / 3)
