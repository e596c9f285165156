"""The Prefect flow for real: a local Prefect server (SQLite), the served deployment
``leo/full``, ``prefect deployment run`` over a copy of the tiny project after its first
``dvc repro`` (the session's shared build): invalid parameters, a run that fails at a stage,
then a plain run that completes the whole DAG as tasks; and the flow's params editing and DAG
ordering on their own."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time

import httpx
import pytest
import yaml
from pipeline_helpers import BIN, REPO, copy_built, dvc, stage_names

from leo.utils.errors import LeoInputError
from pipeline.flow import param_updates, pipeline_stages, prepare_params
from pipeline.params_file import edited

REPORT_STAGES = [
    "check",
    "download",
    "prepare",
    "pretrain",
    "embed",
    "tune@1shot",
    "tune@5shot",
    "metatrain@1shot",
    "metatrain@5shot",
    "evaluate@1shot",
    "evaluate@5shot",
    "report",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, proc: subprocess.Popen | None = None):
    """Poll ``check()`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with {proc.returncode}")
        try:
            value = check()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def stop(proc: subprocess.Popen) -> None:
    """SIGINT the process group, then SIGKILL it if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def served(built, tmp_path_factory):
    """A Prefect server and ``python -m pipeline.serve`` in a copy of the built tiny project;
    yields a dict."""
    root = tmp_path_factory.mktemp("prefect")
    project, env = copy_built(built, root)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **env,
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",  # serve picks a run up within 1 s, not 10
    }
    logs = {name: (root / f"{name}.log").open("w") for name in ("server", "serve")}
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        cwd=root,
        env={k: v for k, v in env.items() if k != "PREFECT_API_URL"},
        stdout=logs["server"],
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    procs = [server]
    try:
        wait_for(
            lambda: httpx.get(f"{api}/health", timeout=5).status_code == 200,
            180,
            "the Prefect server",
            server,
        )
        serve = subprocess.Popen(
            [str(BIN / "python"), "-m", "pipeline.serve"],
            cwd=project,
            env=env,
            stdout=logs["serve"],
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(serve)
        wait_for(
            lambda: httpx.get(f"{api}/deployments/name/leo/full", timeout=5).status_code == 200,
            180,
            "the deployment leo/full",
            serve,
        )
        yield {"project": project, "env": env, "api": api, "root": root}
    finally:
        for proc in reversed(procs):
            stop(proc)
        for f in logs.values():
            f.close()


def deployment_run(served, *params: str) -> tuple[subprocess.CompletedProcess, dict]:
    """``prefect deployment run leo/full --watch``; returns (process, the flow run)."""
    done = subprocess.run(
        [str(BIN / "prefect"), "deployment", "run", "leo/full", *params, "--watch"]
        + ["--watch-interval", "1"],
        cwd=served["root"],
        env=served["env"],
        capture_output=True,
        text=True,
        timeout=540,
    )
    uuid = next(
        line.split("UUID:")[1].strip() for line in done.stdout.splitlines() if "UUID:" in line
    )
    flow_run = httpx.get(f"{served['api']}/flow_runs/{uuid}", timeout=10).json()
    return done, flow_run


def task_run_names(served, flow_run_id: str) -> list[str]:
    body = {"flow_runs": {"id": {"any_": [flow_run_id]}}, "sort": "EXPECTED_START_TIME_ASC"}
    runs = httpx.post(f"{served['api']}/task_runs/filter", json=body, timeout=10).json()
    return [r["name"] for r in runs]


@pytest.fixture(scope="module")
def runs(served) -> dict:
    """Three deployment runs, one after the other: invalid flow parameters, a run that fails
    at its download stage, then a plain run (every stage up to date but the two the failed
    run changed); for each, the process, the flow run, its task names and params.yaml after."""
    params = served["project"] / "params.yaml"
    # Valid params, but the archive does not have this checksum: download fails at run time.
    files = json.dumps([{"name": "tiny.zip", "sha256": "0" * 64}])
    asks = {
        "invalid": ("--params", '{"params": {"evaluate.num_episodes": 0}}'),
        "failed": ("--params", '{"params": {"download.omniglot.files": ' + files + "}}"),
        "plain": (),
    }
    out: dict = {"params_before": params.read_bytes()}
    for name, args in asks.items():
        done, flow_run = deployment_run(served, *args)
        names = task_run_names(served, flow_run["id"])
        out[name] = {"done": done, "flow_run": flow_run, "names": names}
        out[name]["params_after"] = params.read_bytes()
    return out


@pytest.mark.slow
def test_deployment_run_completes_the_whole_dag_with_metrics(served, runs):
    done, flow_run, names = (runs["plain"][k] for k in ("done", "flow_run", "names"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert flow_run["state"]["type"] == "COMPLETED"
    stages = [n.removeprefix("dvc repro ") for n in names if n.startswith("dvc repro ")]
    project = served["project"]
    assert stages == pipeline_stages(project, env=served["env"])  # as `dvc repro`: every stage
    assert sorted(stages) == sorted(stage_names(project, served["env"]))
    assert [s for s in stages if s in REPORT_STAGES] == REPORT_STAGES
    assert names[-1].startswith("publish-metrics")
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics["1shot"]["test_episodes"] == 20 and metrics["5shot"]["num_shots"] == 5
    status = json.loads(dvc("status", "--json", cwd=project, env=served["env"]).stdout)
    assert status == {}  # DVC recorded every stage the flow ran
    body = {"artifacts": {"key": {"any_": ["leo-metrics", "leo-report"]}}}
    arts = httpx.post(f"{served['api']}/artifacts/filter", json=body, timeout=10).json()
    assert {a["key"] for a in arts} == {"leo-metrics", "leo-report"}
    table = next(a for a in arts if a["key"] == "leo-metrics")
    rows = json.loads(table["data"]) if isinstance(table["data"], str) else table["data"]
    assert [r["run"] for r in rows] == ["1shot", "5shot"]


@pytest.mark.slow
def test_invalid_flow_parameters_fail_before_anything_runs_or_is_written(runs):
    done, flow_run, names = (runs["invalid"][k] for k in ("done", "flow_run", "names"))
    assert done.returncode == 1
    assert flow_run["state"]["type"] == "FAILED"
    assert (
        "evaluate.num_episodes: must be greater than or equal to 1" in flow_run["state"]["message"]
    )
    assert runs["invalid"]["params_after"] == runs["params_before"]
    assert names == []  # no stage ran


@pytest.mark.slow
def test_a_failed_run_restores_params_and_the_next_plain_run_completes(runs):
    done, flow_run, names = (runs["failed"][k] for k in ("done", "flow_run", "names"))
    assert done.returncode == 1 and flow_run["state"]["type"] == "FAILED"
    assert "set-params" in " ".join(names) and "dvc repro download" in names
    assert "publish-metrics" not in " ".join(names)  # nothing after the failed stage ran
    assert not any(n.endswith("report") for n in names)
    assert runs["failed"]["params_after"] == runs["params_before"]  # as the run found it
    plain = runs["plain"]
    assert plain["done"].returncode == 0 and plain["flow_run"]["state"]["type"] == "COMPLETED"
    assert plain["params_after"] == runs["params_before"]


# -- without a server -------------------------------------------------------------------------


def test_param_updates_map_flow_parameters_to_dotted_keys():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["published"]["imports"] = {"mini": {}}
    updates = param_updates(
        params, dataset="miniImageNet", preset="mini", embeddings="mini", extra={"report.dpi": 80}
    )
    assert updates == {
        "base.dataset": "miniImageNet",
        "metatrain.runs.1shot.preset": "mini-1shot",
        "metatrain.runs.5shot.preset": "mini-5shot",
        "embeddings.dir": "data/published/mini",
        "embeddings.metrics": "reports/published/mini/metrics.json",
        "report.dpi": 80,
    }
    assert param_updates(params, preset="tiered-5shot")["metatrain.runs.1shot.preset"] == (
        "tiered-5shot"
    )
    assert param_updates(params) == {}
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        param_updates(params, preset="huge")
    with pytest.raises(ValueError, match="embeddings must be 'pipeline'"):
        param_updates(params, embeddings="tiered")


def test_params_edits_keep_comments_and_touch_only_the_changed_lines():
    text = (REPO / "params.yaml").read_text()
    updates = {
        "base.dataset": "omniglot",  # already so: not a change
        "metatrain.common.num_steps": 7,
        "metatrain.runs.5shot.preset": "mini-5shot",  # inside a flow mapping
        "embeddings.dir": "data/published/a,b",  # needs quotes
    }
    new, changed, doc = edited(text, updates)
    assert list(changed) == list(updates)[1:]
    params = yaml.safe_load(new)
    assert params == doc
    assert params["metatrain"]["common"]["num_steps"] == 7
    assert params["metatrain"]["runs"]["5shot"] == {"preset": "mini-5shot", "num_shots": 5}
    assert params["embeddings"]["dir"] == "data/published/a,b"
    diff = [(a, b) for a, b in zip(text.splitlines(), new.splitlines(), strict=True) if a != b]
    assert len(diff) == 3  # three lines changed, comments kept
    assert all(a.split("#")[1:] == b.split("#")[1:] for a, b in diff)
    assert edited(text, {"metatrain.common.num_steps": 4000})[0] is text  # nothing to change
    with pytest.raises(KeyError, match="no section 'metatrain.nope'"):
        edited(text, {"metatrain.nope.x": 1})
    new, _, doc = edited(text, {"metatrain.runs.1shot.outer_lr": 1.0e-4})  # a new key
    assert doc["metatrain"]["runs"]["1shot"]["outer_lr"] == 1.0e-4
    assert "# outer steps" in new and "validate_every: null" in new


def test_flow_parameters_are_validated_before_params_yaml_is_written(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    before = (tmp_path / "params.yaml").read_bytes()
    for updates, message in [
        ({"evaluate.num_episodes": 0}, "evaluate.num_episodes: must be greater than"),
        ({"metatrain.device": "gpu"}, "metatrain.device: must be auto, cpu, cuda"),
        ({"metatrain.common.num_stepz": 3}, "metatrain.common.num_stepz: unknown key"),
        ({"nope.x": 1}, "no section 'nope'"),
    ]:
        with pytest.raises(LeoInputError, match=re.escape(message)):
            prepare_params(tmp_path, updates)
    assert (tmp_path / "params.yaml").read_bytes() == before
    original, new, changed = prepare_params(tmp_path, {"report.dpi": 80})
    assert original.encode() == before and changed == {"report.dpi": (120, 80)}


def test_pipeline_stages_follow_the_dag():
    assert pipeline_stages(REPO, ["report"]) == REPORT_STAGES
    assert pipeline_stages(REPO, ["evaluate@5shot"]) == [
        "check",
        "download",
        "prepare",
        "pretrain",
        "embed",
        "tune@5shot",
        "metatrain@5shot",
        "evaluate@5shot",
    ]
    every = pipeline_stages(REPO)  # what `dvc repro` runs
    assert [s for s in every if s in REPORT_STAGES] == REPORT_STAGES
    assert len(every) == len(set(every)) >= len(REPORT_STAGES)
    with pytest.raises(RuntimeError, match="dvc dag --dot nope failed"):
        pipeline_stages(REPO, ["nope"])
