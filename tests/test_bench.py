"""`python -m prefkd.bench` on tiny shapes: the fused losses derived from config/loss, the shape presets (checked
against the real models' config.json on the meta device), the fused comparison on both pairs, and the peers (TRL's
losses when trl is importable, the eager references of the cross-tokenizer losses) agreeing with the losses. No
timed assertions: the figures are measured by the bench itself (docs/performance.md)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from prefkd import bench
from prefkd.bench.peers import PEERS, TRL_PEERS, trl_functions
from prefkd.models.tiny import shrunk_config
from tests.helpers.shared import shared_dir

TINY = "batch=2,max_length=40,max_prompt_length=20,student_hidden=32,teacher_hidden=48,student_layers=1," \
       "teacher_layers=1,student_heads=2,teacher_heads=2"
QUICK = dict(device="cpu", warmup=0, repeats=1, precompute_examples=0, sinkhorn=False)


def test_fused_losses_are_derived_from_the_loss_configs():
    fused = bench.fused_losses()
    assert set(fused) == set(bench.loss_configs())  # every loss takes a fused head, the preference losses too
    assert all(bench.make_loss(name, []).fused_head for name in fused)


def test_shape_presets_and_overrides():
    shape, pair = bench.parse_shape("gpt2_from_qwen,student_layers=2,batch=3")
    assert pair == "qwen_gpt2"
    assert (shape["student_hidden"], shape["student_layers"], shape["batch"], shape["max_length"]) == (768, 2, 3, 128)
    assert bench.parse_shape("batch=2") == ({**bench.DEFAULT_SHAPE, "batch": 2}, None)
    with pytest.raises(SystemExit, match="unknown preset"):
        bench.parse_shape("gpt3")
    with pytest.raises(SystemExit, match="unknown key"):
        bench.parse_shape("width=3")
    with pytest.raises(SystemExit, match="the qwen_gpt2 pair"):
        bench.main(["--shape", "gpt2_from_qwen", "--pair", "mistral_tinyllama"])
    with pytest.raises(SystemExit, match="unknown nope"):
        bench.main(["--peers", "uld,nope"])


REAL_SIZES = {  # parameters of the real models (the bench's presets build them with random weights)
    "gpt2": 124.4e6, "qwen1.5": 1.837e9, "tinyllama": 1.100e9, "mistral": 7.242e9}


@pytest.mark.parametrize("preset", list(bench.PRESETS))
def test_presets_build_the_real_geometries(preset):
    """The random models of a preset (built on the meta device: no memory) have the real models' widths, heads (GQA
    included), MLP sizes and vocabularies; at the real depth, the real parameter count."""
    root = shared_dir() / "tokenizers"
    shape, pair = bench.parse_shape(preset)
    for role, name in zip(("teacher", "student"), bench.PAIRS[pair]):
        real = AutoConfig.from_pretrained(str(root / name))
        config = shrunk_config(root / name / "config.json", shape[f"{role}_hidden"], shape[f"{role}_layers"],
                               shape[f"{role}_heads"], shape[f"{role}_intermediate"])
        keys = ("n_embd", "n_head", "n_inner", "vocab_size") if real.model_type == "gpt2" else \
            ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size")
        want = {k: getattr(real, k) for k in keys}
        if real.model_type == "gpt2":
            want["n_inner"] = want["n_inner"] or 4 * real.n_embd  # GPT-2's null: 4 × width
        assert {k: getattr(config, k) for k in keys} == want
        depth = "n_layer" if real.model_type == "gpt2" else "num_hidden_layers"
        setattr(config, depth, getattr(real, depth))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(REAL_SIZES[name], rel=0.01)


@pytest.mark.slow
def test_tiny_run_fused_comparison_and_peers(tmp_path, capsys, shared):  # real tokenizers, HH pairs
    """Main table, the fused comparison of every fused loss (kd on the same-vocabulary pair, the others on the
    cross-tokenizer pair, the preference losses on HH pairs) and every peer, on a tiny shape of the Mistral →
    TinyLLaMA pair (32k vocabularies)."""
    fused = bench.fused_losses()
    result = bench.run(["sft", "minedit"], bench.parse_shape(TINY)[0], "mistral_tinyllama", fused=fused,
                       peers=list(PEERS), loss_overrides=["loss.chunk_size=8"], **QUICK)
    main = result["losses"]
    assert main["minedit"]["fused"] and main["minedit"]["ratio_vs_sft"] > 0
    for name in fused:
        r = result["fused_head"]["losses"][name]
        assert r["pair"] == ("tinyllama -> tinyllama" if name in bench.SAME_VOCABULARY else "mistral -> tinyllama")
        assert 0 < r["peak_btv_fused"] < r["peak_btv_unfused"], name  # chunks of 8 rows of 31 response tokens
    trl = trl_functions()
    for name, r in result["peers"].items():
        if name in TRL_PEERS and isinstance(trl[name], str):
            assert "trl" in r["skipped"].lower()
            continue
        assert "skipped" not in r, (name, r)
        assert r["agree"], (name, r)
        assert r["value_rel_diff"] <= 1e-4 and r["grad_rel_diff"] <= 1e-3
        assert r["peak_btv_ours"] > 0 and r["ms_peer"] > 0
    assert "uld peer" in capsys.readouterr().out


def test_trl_rows_are_skipped_with_the_reason_without_trl(monkeypatch):
    for name in [m for m in sys.modules if m == "trl" or m.startswith("trl.")] or ["trl"]:
        monkeypatch.setitem(sys.modules, name, None)  # import trl... -> ImportError
    found = trl_functions()
    assert all("prefkd[peers]" in found[n] for n in TRL_PEERS)


def test_cli_writes_json(tmp_path, shared):  # real tokenizers
    out = tmp_path / "bench.json"
    bench.main(["--losses", "", "--fused", "sft", "--shape", TINY, "--pair", "mistral_tinyllama", "--warmup", "0",
                "--repeats", "1", "--precompute-examples", "0", "--no-sinkhorn", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["losses"] == {} and set(result["fused_head"]["losses"]) == {"sft"}
