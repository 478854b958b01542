"""Config resolution shared by every entry point: the ``config/`` folder, the ``${repo_dir:}``, ``${shared_dir:}`` and
``${data_file:}`` resolvers and secrets from the environment or ``.env`` (never from a config, never logged)."""

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


def data_dir() -> str:
    """Where ``python -m prefkd.data fetch`` writes the data sets (``instruct/``, ``preference/``) and where the
    configs' ``${data_file:}`` looks first: ``PREFKD_DATA``, else ``~/.cache/prefkd/data``."""
    return str(Path(os.environ.get("PREFKD_DATA") or "~/.cache/prefkd/data").expanduser())


def data_locations(rel: str | Path) -> list[Path]:
    """The places a data file ``rel`` (e.g. ``instruct/dolly_test.jsonl``) is looked for, in order:
    ``$PREFKD_DATA/rel`` (what ``prefkd.data fetch`` wrote), then ``$PREFKD_SHARED/data/rel``."""
    return [Path(data_dir()) / rel, Path(shared_dir()).expanduser() / "data" / rel]


def data_file(rel: str) -> str:
    """``${data_file:instruct/dolly_test.jsonl}`` in configs: the first of :func:`data_locations` that exists, else
    the ``$PREFKD_DATA`` one (so that a missing file's error names where ``prefkd.data fetch`` puts it)."""
    places = data_locations(rel)
    return str(next((p for p in places if p.exists()), places[0]))


def data_relpath(path: str | Path) -> str | None:
    """``path`` relative to ``$PREFKD_DATA`` or ``$PREFKD_SHARED/data`` (``"instruct/dolly_test.jsonl"``), or None
    when it lies under neither."""
    local = Path(path).expanduser()
    for root in (Path(data_dir()), Path(shared_dir()).expanduser() / "data"):
        if local.is_relative_to(root):
            return local.relative_to(root).as_posix()
    return None


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
# ${shared_dir:} in configs: the real tokenizers of the test pairs (see shared_dir).
OmegaConf.register_new_resolver("shared_dir", shared_dir, replace=True)
# ${data_file:instruct/dolly_test.jsonl} in configs: the evaluation sets and the demo data (see data_file).
OmegaConf.register_new_resolver("data_file", data_file, replace=True)


def load_env() -> None:
    """Secrets come from the environment or a .env file (never from the config)."""
    from dotenv import load_dotenv

    load_dotenv(Path.cwd() / ".env", override=False)
    if os.environ.get("HUGGINGFACE_TOKEN") and not os.environ.get("HF_TOKEN"):
        os.environ["HF_TOKEN"] = os.environ["HUGGINGFACE_TOKEN"]
