"""One pipeline state on several machines: ``dvc pull`` what a stage reads, ``dvc push`` what
it writes, through a DVC remote.

A GPU worker of the work pool and a CPU machine each run the flow ``leo`` on their own clone
of the repository; git carries the code, ``params.yaml`` and ``dvc.lock``, and a DVC remote
(``.dvc/config``; docs/distributed.md for S3, GCS and SSH) carries the data. With the flow's
``pull``, before each stage:

1. ``dvc repro --single-item --allow-missing --dry <stage>`` says whether DVC would run it;
   a stage that is unchanged but for data missing here is skipped without fetching anything,
   so a machine downloads only what the stages it runs read;
2. for a stage that will run, its dependencies that are cached outputs of other stages
   (``data/embeddings/train.parquet`` for ``metatrain@1shot``, say) are pulled, those files
   only (``dvc pull --allow-missing <paths>``);
3. the stage runs with ``--allow-missing``. If an input is in neither the workspace nor the
   remote, the stage runs as ``dvc repro <stage>`` instead, which rebuilds what it lacks.

With ``push``, after a stage ran, its cached outputs go to the remote (``dvc push <stage>``).
:func:`check_remote` runs before anything else: a remote that is not configured or cannot
be reached stops the flow in one line, with nothing run or written.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from leo.utils.errors import LeoInputError

Log = Callable[[str], None]

# Asks a remote whether its cache folder exists, through DVC's file system for it; prints
# "<Error>: <first line>" and exits 1 when that fails. Run in a subprocess to bound the wait.
_PROBE = """
import sys
from dvc.repo import Repo
try:
    with Repo(sys.argv[1]) as repo:
        odb = repo.cloud.get_remote_odb(sys.argv[2])
        odb.fs.exists(odb.path)
except Exception as err:
    lines = str(err).strip().splitlines() or [""]
    print(f"{type(err).__name__}: {lines[0]}")
    sys.exit(1)
"""


def _dvc(dvc: str, args: list[str], root: Path, env: dict | None, timeout: float = 3600):
    return subprocess.run(
        [dvc, *args], cwd=root, env=env, capture_output=True, text=True, timeout=timeout
    )


def _last_error(done: subprocess.CompletedProcess) -> str:
    """DVC's last ``ERROR:`` line (else its last line) of a failed command, one line."""
    lines = [ln.strip() for ln in (done.stderr + "\n" + done.stdout).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return (errors or lines or [f"exit code {done.returncode}"])[-1]


def _remotes(root: Path) -> tuple[dict[str, str], str | None]:
    """``{name: url}`` of the DVC remotes (every config level; local paths absolute) and the
    default remote's name."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        config = repo.config
        remotes = {name: str(spec["url"]) for name, spec in config["remote"].items()}
        return remotes, config["core"].get("remote")


def _local_path(url: str) -> Path | None:
    """The directory of a local remote's URL, None for any other kind (s3://, ssh://, ...)."""
    if url.startswith("file://"):
        return Path(url.removeprefix("file://"))
    return None if "://" in url else Path(url)


def check_remote(
    root: Path,
    remote: str | None,
    *,
    pull: bool,
    push: bool,
    env: dict | None = None,
    timeout: float = 120,
) -> str:
    """The name of the remote the flow will use, once it is known to be reachable.

    A local directory must exist (for ``push`` alone its parent is enough: DVC creates it);
    any other remote must answer whether its cache folder exists within ``timeout`` seconds
    (DVC's own file system for it, so its plugin, credentials and network are all tried).

    Raises:
        LeoInputError: no such remote, none configured, or not reachable (one line).
    """
    remotes, default = _remotes(root)
    name = remote or default
    if name is None:
        raise LeoInputError(
            "flow parameters: pull/push need a DVC remote and none is configured "
            "(dvc remote add -d <name> <url>)"
        )
    if name not in remotes:
        known = ", ".join(remotes) or "none"
        raise LeoInputError(f"flow parameters: remote: {name!r} is not a DVC remote ({known})")
    url = remotes[name]
    path = _local_path(url)
    if path is not None:
        reachable = path.is_dir() or (push and not pull and path.parent.is_dir())
        if not reachable:
            raise LeoInputError(
                f"flow parameters: remote {name!r} ({url}) is unreachable: no such directory"
            )
        return name
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, str(root), name],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise LeoInputError(
            f"flow parameters: remote {name!r} ({url}) is unreachable: no answer in {timeout:g} s"
        ) from None
    if done.returncode != 0:
        raise LeoInputError(
            f"flow parameters: remote {name!r} ({url}) is unreachable: {_last_error(done)}"
        )
    return name


def would_run(root: Path, stage: str, dvc: str = "dvc", env: dict | None = None) -> bool:
    """Whether ``dvc repro --single-item --allow-missing <stage>`` would run the stage (a dry
    run that fails, for a missing input, counts as running)."""
    args = ["repro", "--single-item", "--allow-missing", "--dry", stage]
    done = _dvc(dvc, args, root, env, timeout=600)
    return done.returncode != 0 or f"Running stage '{stage}'" in done.stdout


def stage_inputs(root: Path, stage: str) -> list[str]:
    """The dependencies of ``stage`` that are (inside) cached outputs of other stages, as
    paths relative to ``root``: what the stage reads that DVC can pull."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:  # a target with its dvc.yaml: DVC resolves it from the cwd
        (target,) = repo.stage.collect(f"{Path(repo.root_dir) / 'dvc.yaml'}:{stage}")
        own = {out.fs_path for out in target.outs}
        cached = [
            out.fs_path
            for other in repo.index.stages
            for out in other.outs
            if out.use_cache and out.fs_path not in own
        ]
        inputs = [
            dep.fs_path
            for dep in target.deps
            if any(dep.fs_path == o or dep.fs_path.startswith(o + os.sep) for o in cached)
        ]
        return [os.path.relpath(p, repo.root_dir) for p in inputs]


def pull_inputs(
    root: Path, stage: str, remote: str, dvc: str = "dvc", env: dict | None = None
) -> tuple[list[str], list[str]]:
    """Pull the inputs of ``stage`` (:func:`stage_inputs`) from ``remote``.

    Returns:
        ``(inputs, missing)``: the inputs, and those still absent afterwards (in neither the
        workspace nor the remote).

    Raises:
        RuntimeError: ``dvc pull`` failed.
    """
    inputs = stage_inputs(root, stage)
    if inputs:
        done = _dvc(dvc, ["pull", "--allow-missing", "--remote", remote, *inputs], root, env)
        if done.returncode != 0:
            raise RuntimeError(f"dvc pull for {stage} failed: {_last_error(done)}")
    return inputs, [p for p in inputs if not (root / p).exists()]


def push_outputs(
    root: Path, stage: str, remote: str, dvc: str = "dvc", env: dict | None = None
) -> str:
    """``dvc push --remote <remote> <stage>``; returns DVC's summary line.

    Raises:
        RuntimeError: the push failed.
    """
    done = _dvc(dvc, ["push", "--remote", remote, stage], root, env)
    if done.returncode != 0:
        raise RuntimeError(f"dvc push {stage} failed: {_last_error(done)}")
    lines = [ln.strip() for ln in done.stdout.splitlines() if ln.strip()]
    return lines[-1] if lines else "pushed"


def repro_args(
    root: Path, stage: str, *, pull: str | None, force: bool, log: Log, dvc: str = "dvc",
    env: dict | None = None,
) -> list[str]:  # fmt: skip
    """The ``dvc repro`` arguments for ``stage``, after pulling its inputs from ``pull`` (a
    remote name; None: no pull)."""
    if pull is None:
        return ["repro", "--single-item", *(["--force"] if force else []), stage]
    if not force and not would_run(root, stage, dvc, env):
        log(f"{stage}: unchanged (missing data is not pulled for a stage that does not run)")
        return ["repro", "--single-item", "--allow-missing", stage]
    inputs, missing = pull_inputs(root, stage, pull, dvc, env)
    log(f"{stage}: pulled its inputs from {pull!r}: {', '.join(inputs) or 'none'}")
    if missing:
        log(f"{stage}: not in remote {pull!r}: {', '.join(missing)}; rebuilding them")
        return ["repro", stage]
    return ["repro", "--single-item", "--allow-missing", *(["--force"] if force else []), stage]
