"""The Prefect flow ``leo``: the DVC stages of ``dvc.yaml`` as tasks, in DAG order.

DVC stays the source of truth: each task runs ``dvc repro --single-item <stage>`` in the
repository, so a stage whose deps and params did not change is skipped exactly as a plain
``dvc repro`` would skip it, and ``dvc.lock`` records what ran. The stages are those
``dvc repro`` runs (``dvc dag --dot``; with ``targets``, those targets and their upstream),
topologically sorted: with the default params ``download, prepare, pretrain, embed``, then
``metatrain``, ``evaluate`` (and any other per-run stages) for each run, then ``report``.
With published embeddings, ``targets=["report"]`` runs ``import_published@<name>`` instead
of the first four. Tasks run one at a time (DVC holds a repository lock) and a file
lock in ``.dvc/tmp`` makes concurrent flow runs on one checkout wait for each other.

Flow parameters reach the stages as DVC parameters: before any stage runs, the flow applies
them to ``params.yaml`` (:mod:`pipeline.params_file`: ruamel.yaml's round trip, so comments and
layout stay), validates the result as every stage would (:mod:`leo.settings`) and only then
writes it, atomically. A run that completes leaves the workspace with exactly the params its
``dvc.lock`` and metrics were made with, ready to ``git commit`` and to compare with ``dvc
metrics diff``; a run that fails puts ``params.yaml`` back as it found it, so the next run
starts from the same file.

Run it once in-process with ``python -m pipeline.flow``; serve it as deployment
``leo/full`` with ``python -m pipeline.serve``.
"""

from __future__ import annotations

import contextlib
import fcntl
import graphlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from leo.settings import parse_settings, read_yaml
from leo.utils.atomic import write_text
from leo.utils.errors import LeoInputError
from pipeline.params_file import edited
from pipeline.remote import check_remote, push_outputs, repro_args

REPO = Path(__file__).resolve().parents[1]
PRESET_FAMILIES = ("default", "mini", "tiered")


def _bin(name: str) -> str:
    """``name`` beside this interpreter (the project's venv) if there, else from PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def stage_env(data_dir: str | None = None) -> dict[str, str]:
    """The environment of the DVC subprocesses: this venv first on PATH (stages run
    ``python -m stages.<name>``), unbuffered output, and ``LEO_DATA_DIR`` when given."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    if data_dir:
        env["LEO_DATA_DIR"] = str(Path(data_dir).resolve())
    return env


# -- params.yaml ------------------------------------------------------------------------------


def param_updates(
    params: dict[str, Any],
    *,
    dataset: str | None = None,
    preset: str | None = None,
    embeddings: str | None = None,
    extra: dict[str, Any] | None = None,
    population: int | None = None,
) -> dict[str, Any]:
    """The dotted ``params.yaml`` keys the flow parameters ask for.

    Args:
        params: the current ``params.yaml`` content.
        dataset: ``base.dataset``.
        preset: ``default``, ``mini`` or ``tiered`` (each run gets ``<family>-<K>shot``,
            K its ``num_shots``), or one preset name of ``leo.core.config.PRESETS`` for every run.
        embeddings: ``pipeline`` (from raw images) or the name of a ``published.imports``
            entry; sets ``embeddings.dir`` and ``embeddings.metrics``.
        extra: more ``{"dotted.key": value}`` pairs, as ``dvc exp run --set-param``.
        population: trials of every hyperparameter search (``tune.runs.<run>.population``).

    Raises:
        ValueError: an unknown preset or published entry, or a population without searches.
    """
    from leo.core.config import PRESETS

    updates: dict[str, Any] = {}
    if dataset is not None:
        updates["base.dataset"] = dataset
    if preset is not None:
        runs = params.get("metatrain", {}).get("runs", {})
        for run, spec in runs.items():
            shots = spec.get("num_shots", 1)
            if preset in PRESETS:
                name = preset
            elif f"{preset}-{shots}shot" in PRESETS:
                name = f"{preset}-{shots}shot"
            else:
                raise ValueError(
                    f"unknown preset {preset!r} for run {run!r} ({shots}-shot): use one of "
                    f"{', '.join(PRESET_FAMILIES)} or {', '.join(PRESETS)}"
                )
            updates[f"metatrain.runs.{run}.preset"] = name
    if embeddings is not None:
        if embeddings == "pipeline":
            updates["embeddings.dir"] = "data/embeddings"
            updates["embeddings.metrics"] = "reports/pretrain/metrics.json"
        elif embeddings in (params.get("published", {}).get("imports") or {}):
            updates["embeddings.dir"] = f"data/published/{embeddings}"
            updates["embeddings.metrics"] = f"reports/published/{embeddings}/metrics.json"
        else:
            raise ValueError(
                f"embeddings must be 'pipeline' or an entry of published.imports, "
                f"got {embeddings!r}"
            )
    if population is not None:
        searches = (params.get("tune") or {}).get("runs") or {}
        if not searches:
            raise ValueError("population given but params.yaml has no tune.runs to apply it to")
        for run in searches:
            updates[f"tune.runs.{run}.population"] = population
    updates.update(extra or {})
    return updates


# -- DVC --------------------------------------------------------------------------------------


def _dag(repo: Path, target: str | None, env: dict | None) -> tuple[list[str], list[tuple]]:
    """Nodes and edges (upstream, downstream) of ``dvc dag --dot [target]``."""
    cmd = [_bin("dvc"), "dag", "--dot", *([target] if target else [])]
    out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(['dvc', *cmd[1:]])} failed: {out.stderr.strip()}")
    nodes = re.findall(r'^"([^"]+)";$', out.stdout, flags=re.M)
    edges = re.findall(r'^"([^"]+)" -> "([^"]+)";$', out.stdout, flags=re.M)
    return nodes, edges


def pipeline_stages(
    repo: Path, targets: list[str] | None = None, env: dict | None = None
) -> list[str]:
    """The stages ``dvc repro [targets]`` would consider: every stage of ``dvc.yaml`` (no
    targets) or the targets and everything upstream of them, in a topological order (ties in
    the order ``dvc dag`` lists them, which follows ``dvc.yaml``)."""
    nodes: list[str] = []
    edges: set[tuple[str, str]] = set()
    for target in targets or [None]:
        more_nodes, more_edges = _dag(repo, target, env)
        nodes += [n for n in more_nodes if n not in nodes]
        edges.update(more_edges)
    order = {n: i for i, n in enumerate(nodes)}
    sorter = graphlib.TopologicalSorter({n: set() for n in nodes})
    for upstream, downstream in edges:
        sorter.add(downstream, upstream)
    sorter.prepare()
    stages: list[str] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=lambda n: order[n])
        stages += ready
        sorter.done(*ready)
    return stages


@contextlib.contextmanager
def repo_lock(repo: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<repo>/.dvc/tmp/leo-flow.lock`` (waits for other flows)."""
    path = repo / ".dvc" / "tmp" / "leo-flow.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@task(name="dvc-stage", task_run_name="dvc repro {stage}")
def run_stage(
    stage: str,
    repo: str,
    env: dict[str, str],
    force: bool = False,
    pull: str | None = None,
    push: str | None = None,
) -> str:
    """Run one DVC stage (:func:`repro_stage`), streaming its output to the run's logger."""
    return repro_stage(stage, repo, env, get_run_logger(), force, pull, push)


def repro_stage(
    stage: str,
    repo: str,
    env: dict[str, str],
    logger: Any,
    force: bool = False,
    pull: str | None = None,
    push: str | None = None,
) -> str:
    """Run one DVC stage (``dvc repro --single-item``), streaming its output to ``logger``.

    With ``pull`` (a DVC remote), first pull what the stage reads if it is going to run;
    with ``push``, push its outputs after it ran (:mod:`pipeline.remote`).

    Returns:
        ``"skipped"`` when DVC found the stage unchanged, else ``"ran"``.

    Raises:
        RuntimeError: DVC or the stage failed (the task fails, and with it the flow).
    """
    dvc = _bin("dvc")
    args = repro_args(Path(repo), stage, pull=pull, force=force, log=logger.info, dvc=dvc, env=env)
    cmd = [dvc, *args]
    logger.info("$ dvc %s", " ".join(cmd[1:]))
    skipped = False
    tail: list[str] = []
    with subprocess.Popen(
        cmd,
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n").split("\r")[-1].rstrip()
            if not line:
                continue
            skipped |= "didn't change, skipping" in line
            tail = (tail + [line])[-5:]
            logger.info(line)
    if proc.returncode != 0:
        raise RuntimeError(
            f"dvc repro {stage} failed (exit {proc.returncode}): " + " | ".join(tail[-3:])
        )
    if push is not None and (not skipped or pull is None):  # pulled-from stages lack data
        logger.info("%s: dvc push: %s", stage, push_outputs(Path(repo), stage, push, dvc, env))
    return "skipped" if skipped else "ran"


def prepare_params(root: Path, updates: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """``params.yaml`` with the flow's ``updates``, validated before anything is written.

    Returns:
        (the file's current text, the edited text, ``{key: (old, new)}`` of what changes).

    Raises:
        LeoInputError: the edited params are invalid (one line naming the key); the file is
            left untouched.
    """
    path = root / "params.yaml"
    original = path.read_text()
    try:
        new_text, changed, doc = edited(original, updates, str(path))
    except KeyError as err:
        raise LeoInputError(str(err.args[0])) from None
    parse_settings(doc, f"{path} (with the flow's parameters)")
    return original, new_text, changed


@task(name="set-params")
def set_params(repo: str, text: str, changed: dict[str, Any]) -> dict[str, list[Any]]:
    """Write the flow's (validated) parameters into ``params.yaml``; returns what changed."""
    logger = get_run_logger()
    write_text(Path(repo) / "params.yaml", text)
    for key, (old, new) in changed.items():
        logger.info("params.yaml: %s: %r -> %r", key, old, new)
    return {k: list(v) for k, v in changed.items()}


@task(name="publish-metrics")
def publish_metrics(repo: str) -> dict[str, Any]:
    """Read ``reports/metrics.json`` and publish it as a table and a Markdown artifact."""
    from leo.report import summary_markdown, summary_rows

    report = json.loads((Path(repo) / "reports" / "metrics.json").read_text())
    rows = summary_rows(report)
    create_table_artifact(
        key="leo-metrics", table=rows, description="LEO meta-test accuracy per run"
    )
    create_markdown_artifact(
        key="leo-report", markdown=summary_markdown(report), description="LEO pipeline metrics"
    )
    get_run_logger().info("metrics: %s", json.dumps(report))
    return report


@flow(name="leo", log_prints=True)
def leo_flow(
    dataset: str | None = None,
    preset: str | None = None,
    embeddings: str | None = None,
    params: dict[str, Any] | None = None,
    data_dir: str | None = None,
    targets: list[str] | None = None,
    force: bool = False,
    repo: str | None = None,
    pull: bool = False,
    push: bool = False,
    remote: str | None = None,
    population: int | None = None,
) -> dict[str, Any]:
    """Reproduce the LEO pipeline up to ``reports/metrics.json`` with DVC, one stage per task.

    Args:
        dataset: ``base.dataset`` (omniglot, miniImageNet, tieredImageNet); None keeps it.
        preset: LEO hyperparameters for every run: ``default``, ``mini``, ``tiered`` (the
            published ones for each run's shots) or a full preset name; None keeps them.
        embeddings: ``pipeline`` or a ``published.imports`` entry; None keeps the setting.
        params: more ``params.yaml`` values by dotted key, e.g.
            ``{"metatrain.common.num_steps": 500}``.
        data_dir: where ``download`` finds ``<dataset>/<file>`` (``LEO_DATA_DIR``).
        targets: stages to reproduce with everything upstream, as ``dvc repro TARGET...``
            (e.g. ``["report"]``); None: every stage, as ``dvc repro``.
        force: rerun every stage even if DVC finds it unchanged.
        repo: the DVC project (default: the checkout holding this file).
        pull: before each stage that is going to run, ``dvc pull`` the outputs of other
            stages it reads (a machine sharing the pipeline with others, docs/distributed.md).
        push: after each stage that ran, ``dvc push`` its outputs.
        remote: the DVC remote of ``pull``/``push`` (default: the default remote); checked
            to be reachable before anything runs.
        population: trials of the hyperparameter searches (``tune.runs.<run>.population``
            of every ``tune@<run>``, at least 2); None keeps them.

    Returns:
        The report's metrics (``reports/metrics.json``), or ``{}`` when ``targets`` leave
        out the report stage.
    """
    root = Path(repo).resolve() if repo else REPO
    logger = get_run_logger()
    env = stage_env(data_dir)
    with repo_lock(root):
        current = read_yaml(root / "params.yaml")
        try:
            updates = param_updates(
                current,
                dataset=dataset,
                preset=preset,
                embeddings=embeddings,
                extra=params,
                population=population,
            )
        except ValueError as err:
            raise LeoInputError(f"flow parameters: {err}") from None
        sync = None
        if pull or push:  # an unreachable remote stops the run before anything is written
            sync = check_remote(root, remote, pull=pull, push=push, env=env)
        original, new_text, changed = prepare_params(root, updates)
        if changed:
            set_params(str(root), new_text, changed)
        try:
            remotes = (sync if pull else None, sync if push else None)
            return _run_stages(root, targets, env, force, logger, remotes)
        except BaseException:
            if changed:  # leave params.yaml as this run found it
                write_text(root / "params.yaml", original)
                logger.error("the run failed: params.yaml restored to what it was before it")
            raise


def _run_stages(
    root: Path, targets, env, force: bool, logger, remotes=(None, None)
) -> dict[str, Any]:
    """Every stage ``dvc repro [targets]`` would consider, one task each, then the metrics
    (``remotes``: the remote to pull from and the one to push to, or None)."""
    stages = pipeline_stages(root, targets, env=env)
    logger.info("stages: %s", ", ".join(stages))
    status = {}
    for stage in stages:
        retries = 2 if stage == "download" else 0
        status[stage] = run_stage.with_options(retries=retries, retry_delay_seconds=10)(
            stage, str(root), env, force, *remotes
        )
    logger.info("ran: %s", ", ".join(s for s, v in status.items() if v == "ran") or "none")
    if "report" not in stages:
        logger.info("the report stage was not among the targets: no metrics to publish")
        return {}
    return publish_metrics(str(root))


if __name__ == "__main__":
    leo_flow()
