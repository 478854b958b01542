"""Config resolution shared by every entry point: the ``config/`` folder, the ``${repo_dir:}`` and ``${shared_dir:}``
resolvers and secrets from the environment or ``.env`` (never from a config, never logged)."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf


def config_dir() -> str:
    """The config/ folder: PREFKD_CONFIG_DIR, else the repository's (found from an editable install)."""
    if os.environ.get("PREFKD_CONFIG_DIR"):
        return os.environ["PREFKD_CONFIG_DIR"]
    for parent in Path(__file__).resolve().parents:
        if (parent / "config" / "train.yaml").is_file():
            return str(parent / "config")
    raise FileNotFoundError("prefkd's config/ folder was not found: install with `pip install -e .` from a clone, "
                            "or set PREFKD_CONFIG_DIR to the folder holding train.yaml.")


def shared_dir() -> str:
    """The folder of prefkd's files that do not ship with the code (``data/instruct``, ``data/preference``,
    ``tokenizers``): ``PREFKD_SHARED``, else ``~/.cache/prefkd``."""
    return os.environ.get("PREFKD_SHARED") or str(Path("~/.cache/prefkd").expanduser())


def missing_shared_file(path: str | Path) -> str:
    """For a ``path`` under :func:`shared_dir` that does not exist: the clause saying how to point prefkd at it (else
    ""), for the error of whatever failed to read it."""
    local = Path(path).expanduser()
    if local.exists() or not local.is_relative_to(shared_dir()):
        return ""
    return (f"it is one of the files under {shared_dir()} (the configs' ${{shared_dir:}}): set PREFKD_SHARED to the "
            "folder holding data/ and tokenizers/")


# ${repo_dir:} in configs: the repository root (the folder holding config/).
OmegaConf.register_new_resolver("repo_dir", lambda: str(Path(config_dir()).parent), replace=True)
# ${shared_dir:} in configs: the evaluation sets, the demo data and the real tokenizers (see shared_dir).
OmegaConf.register_new_resolver("shared_dir", shared_dir, replace=True)


def load_env() -> None:
    """Secrets come from the environment or a .env file (never from the config)."""
    from dotenv import load_dotenv

    load_dotenv(Path.cwd() / ".env", override=False)
    if os.environ.get("HUGGINGFACE_TOKEN") and not os.environ.get("HF_TOKEN"):
        os.environ["HF_TOKEN"] = os.environ["HUGGINGFACE_TOKEN"]
