"""Shared helpers of the pipeline tests: a tiny real DVC project in a temporary git repo.

:func:`make_project` copies the project's code, ``dvc.yaml``, ``params.yaml`` and DVC config
into a new directory, turns ``params.yaml`` into tiny params (a 15-character real Omniglot
subset, a 1-epoch WRN-10-1, a few eager LEO steps, a few evaluation episodes) and makes it a
git repository with one commit, ready for ``dvc repro``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LEO_DATA_DIR") or REPO.parent / "shared" / "data")
OMNIGLOT = SHARED / "omniglot" / "images_background_small1.zip"
BIN = Path(sys.executable).parent
ALPHABETS = {"train": "Korean", "val": "Balinese", "test": "Early_Aramaic"}
COPY = (
    "leo",
    "stages",
    "pipeline",
    "dvc.yaml",
    "params.yaml",
    ".gitignore",
    ".dvcignore",
    ".dvc/config",
    ".dvc/.gitignore",
)
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".dvc/tmp", ".dvc/cache")


def tiny_omniglot(path: Path) -> str:
    """Characters 01-05 of three real alphabets (20 drawings each); returns the zip's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keep = set(ALPHABETS.values())
    with zipfile.ZipFile(OMNIGLOT) as src, zipfile.ZipFile(path, "w") as dst:
        for name in src.namelist():
            parts = name.split("/")
            if len(parts) == 4 and parts[1] in keep and parts[2] <= "character05":
                dst.writestr(name, src.read(name))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_params(params: dict, sha: str) -> dict:
    """The repository's params with every stage made tiny (a few seconds each)."""
    params["download"]["omniglot"]["files"] = [{"name": "tiny.zip", "sha256": sha}]
    params["prepare"]["omniglot"]["split_file"] = "leo/data/splits/tiny.json"
    params["prepare"]["workers"] = 1
    params["pretrain"]["device"] = "cpu"
    params["pretrain"]["omniglot"].update(depth=10, width=1, epochs=1, batch_size=32)
    params["embed"]["device"] = "cpu"
    params["metatrain"]["device"] = "cpu"
    params["metatrain"]["common"] = {
        "num_steps": 4,
        "validate_every": 2,
        "val_batches": 1,
        "val_batch_size": 8,
        "batch_size": 4,
        "outer_lr": 1.0e-3,
        "compile": False,
    }
    params["evaluate"].update(device="cpu", num_episodes=20, batch_size=10)
    params["report"]["dpi"] = 40
    if "tune" in params:  # no hyperparameter search (a Ray cluster): tune@<run> writes {} at once
        params["tune"]["runs"] = {}
    if "compare" in params:  # the method comparison (stages/compare.py), when in the DAG
        params["compare"].update(
            device="cpu",
            train_steps=2,
            validate_every=None,
            ensemble_episodes=10,
            figure_episodes=10,
            figure_iterations=10,
        )
    return params


def env_for(data_dir: Path) -> dict[str, str]:
    """Environment of the subprocesses: this venv first on PATH, the tiny data dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEO_", "PREFECT_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        LEO_DATA_DIR=str(data_dir),
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
        PYTHONDONTWRITEBYTECODE="1",
        DVC_NO_ANALYTICS="1",
    )
    return env


def sh(args: list[str], cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a command; fail with its output if it exits non-zero."""
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        )
    return done


def dvc(*args: str, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``dvc`` (this venv's) in ``cwd``."""
    return sh([str(BIN / "dvc"), *args], cwd, env, timeout)


def git(*args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return sh(["git", *args], cwd, env)


def make_project(root: Path) -> tuple[Path, dict[str, str]]:
    """A tiny copy of the project under ``root/project``, committed; returns (path, env)."""
    project, data_dir = root / "project", root / "shared"
    project.mkdir(parents=True)
    for name in COPY:
        src, dst = REPO / name, project / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=IGNORE)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    split = {"name": "tiny", "splits": {k: [v] for k, v in ALPHABETS.items()}}
    (project / "leo/data/splits/tiny.json").write_text(json.dumps(split))
    sha = tiny_omniglot(data_dir / "omniglot" / "tiny.zip")
    params = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()), sha)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = env_for(data_dir)
    git("init", "-q", "-b", "main", cwd=project, env=env)
    git("add", "-A", cwd=project, env=env)
    git("commit", "-q", "-m", "tiny project", cwd=project, env=env)
    return project, env


def set_param(project: Path, dotted: str, value) -> None:
    """Set one dotted key of the project's params.yaml."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    *parents, leaf = dotted.split(".")
    node = params
    for part in parents:
        node = node[part]
    node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def stage_names(project: Path, env: dict) -> list[str]:
    """Every stage of the project's ``dvc.yaml``, in file order."""
    return dvc("stage", "list", "--name-only", cwd=project, env=env).stdout.split()


def ran_stages(output: str) -> list[str]:
    """Names of the stages ``dvc repro`` ran (``Running stage 'x':`` lines)."""
    return [
        line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")
    ]
