"""Shared helpers of the pipeline tests: a tiny real DVC project in a temporary git repo.

:func:`make_project` copies the project's code, ``dvc.yaml``, ``params.yaml`` and DVC config
into a new directory, turns ``params.yaml`` into tiny params (a 15-character real Omniglot
subset, a 1-epoch WRN-10-1, a few eager LEO steps, a few evaluation episodes) and makes it a
git repository with one commit, ready for ``dvc repro``.

:func:`built_project` is that project after one full ``dvc repro`` (about 50 s on 2 cores),
built once per test session however many pytest-xdist workers ask for it (a file lock in
the session's shared temporary directory), and :func:`copy_built` gives a test module its
own copy of it (git history, DVC cache, ``data/``, ``reports/``), up to date.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
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
    """Environment of the subprocesses: this venv first on PATH, the tiny data dir, one
    OpenMP thread per process (the two pytest workers share two cores: a second thread of a
    stage only spins)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEO_", "PREFECT_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        LEO_DATA_DIR=str(data_dir),
        OMP_NUM_THREADS="1",
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


@dataclass(frozen=True)
class Built:
    """The tiny project after its first full ``dvc repro``: read it, never change it (copy it
    with :func:`copy_built`).

    Attributes:
        root: holds ``project/`` (the git repository) and ``shared/`` (its data directory).
        stages: every stage of its ``dvc.yaml``, in file order.
        repro: the standard output of that ``dvc repro``.
        status: ``dvc status --json`` right after it.
    """

    root: Path
    stages: list[str]
    repro: str
    status: dict

    @property
    def project(self) -> Path:
        return self.root / "project"


def built_project(where: Path) -> Built:
    """The tiny project (:func:`make_project`) after one full ``dvc repro``, under ``where``.

    The first process to ask builds it (in ``where.tmp``, renamed to ``where`` once done);
    others wait on the file lock ``where.lock`` and read it. A failed build is recorded in
    ``where.failed``, so the processes after it fail at once with its message.
    """
    record = where / "build.json"
    with open(f"{where}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        failed = Path(f"{where}.failed")
        if failed.is_file():
            raise AssertionError(f"the shared tiny project failed to build: {failed.read_text()}")
        if not record.is_file():
            try:
                _build(where)
            except BaseException as err:
                failed.write_text(str(err) or type(err).__name__)
                raise
    return Built(where, **json.loads(record.read_text()))


def _build(where: Path) -> None:
    tmp = where.with_name(where.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    project, env = make_project(tmp)
    built = {
        "stages": stage_names(project, env),
        "repro": dvc("repro", cwd=project, env=env, timeout=900).stdout,
        "status": json.loads(dvc("status", "--json", cwd=project, env=env).stdout),
    }
    (tmp / "build.json").write_text(json.dumps(built))
    os.rename(tmp, where)


def _no_dvc_tmp(folder: str, names: list[str]) -> list[str]:
    """``shutil.copytree``'s ignore: DVC's ``.dvc/tmp`` (locks, temporary state)."""
    return ["tmp"] if Path(folder).name == ".dvc" and "tmp" in names else []


def copy_built(built: Built, root: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the built project under ``root/project`` (its data directory in
    ``root/shared``), as :func:`make_project` lays one out; returns (path, env)."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(built.root / "shared", root / "shared")
    shutil.copytree(built.project, root / "project", symlinks=True, ignore=_no_dvc_tmp)
    return root / "project", env_for(root / "shared")
