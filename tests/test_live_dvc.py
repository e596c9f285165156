"""DVCLive training logs in the real DVC pipeline: ``dvc exp run`` up to ``compare@1shot`` in a
copy of the tiny project after its first ``dvc repro`` (the session's shared build), then what
``dvc exp show`` and ``dvc plots show`` read from the logs, and a forced rerun that must leave
every checkpoint and plot file byte-identical."""

from __future__ import annotations

import json

import pytest
import yaml
from pipeline_helpers import OMNIGLOT, copy_built, dvc

LOGS = {
    "pretrain": "reports/pretrain",
    "metatrain": "reports/metatrain/1shot",
    "maml": "reports/compare/1shot/maml",
}
needs_data = pytest.mark.skipif(not OMNIGLOT.is_file(), reason="real Omniglot data not available")
pytestmark = [needs_data, pytest.mark.slow]  # about half a minute of real DVC runs


@pytest.fixture(scope="module")
def run(built, tmp_path_factory) -> dict:
    """One experiment up to compare@1shot, its exp show and plots show, then a forced rerun."""
    project, env = copy_built(built, tmp_path_factory.mktemp("live"))
    r: dict = {"project": project}
    dvc("exp", "run", "compare@1shot", cwd=project, env=env, timeout=600)
    r["exp_show"] = json.loads(dvc("exp", "show", "--json", cwd=project, env=env).stdout)
    r["plots"] = json.loads(dvc("plots", "show", "--json", cwd=project, env=env).stdout)
    r["lock1"] = yaml.safe_load((project / "dvc.lock").read_text())
    r["files"] = sorted(
        str(p.relative_to(project)) for p in (project / "reports").rglob("*") if p.is_file()
    )
    dvc("repro", "-f", "-s", "pretrain", "metatrain@1shot", cwd=project, env=env, timeout=600)
    r["lock2"] = yaml.safe_load((project / "dvc.lock").read_text())
    r["status"] = json.loads(
        dvc("status", "--json", "embed", "compare@1shot", cwd=project, env=env).stdout
    )
    return r


def _experiment(exp_show: list) -> dict:
    """The data of the one experiment ``dvc exp show --json`` lists."""
    revs = [rev for row in exp_show for e in row.get("experiments") or [] for rev in e["revs"]]
    assert len(revs) == 1, revs
    return revs[0]["data"]


def test_exp_show_lists_the_experiment_s_params_and_every_log_s_metrics(run):
    data = _experiment(run["exp_show"])
    params = data["params"]["params.yaml"]["data"]
    assert params["metatrain"]["common"]["num_steps"] == 4
    metrics = {k: v["data"] for k, v in data["metrics"].items() if "data" in v}
    pretrain = metrics["reports/pretrain/metrics.json"]
    assert 0.0 <= pretrain["backbone_heldout_accuracy"] <= 1.0 and pretrain["step"] == 1
    assert pretrain["heldout_acc"] == pretrain["backbone_heldout_accuracy"]  # one epoch: best
    meta = metrics["reports/metatrain/1shot/metrics.json"]
    assert (meta["step"], meta["steps"], meta["num_shots"]) == (4, 4, 1)
    assert meta["best_val_accuracy"] >= meta["val_accuracy"] >= 0.0 and "wall_seconds" in meta
    maml = metrics["reports/compare/1shot/maml/metrics.json"]
    assert maml["step"] == 2 and "inner_lr" in maml and "best_val_accuracy" in maml


def test_dvclive_writes_only_its_logs_no_dvc_yaml_and_no_timestamps(run):
    project = run["project"]
    assert sorted(p.relative_to(project).as_posix() for p in project.rglob("dvc.yaml")) == [
        "dvc.yaml"
    ]
    assert not (project / "dvclive").exists()
    for log in LOGS.values():
        assert f"{log}/metrics.json" in run["files"]
        tsvs = sorted((project / log / "plots/metrics").glob("*.tsv"))
        assert tsvs
        for tsv in tsvs:
            header, *rows = tsv.read_text().splitlines()
            assert header == f"step\t{tsv.stem}" and rows  # no timestamp column
    rows = (project / LOGS["metatrain"] / "plots/metrics/val_accuracy.tsv").read_text()
    assert [line.split("\t")[0] for line in rows.splitlines()[1:]] == ["2", "4"]


def test_plots_show_draws_the_curves_from_the_dvclive_files(run):
    plots = run["plots"]["data"]
    tsv = run["project"] / LOGS["metatrain"] / "plots/metrics/val_accuracy.tsv"
    logged = [tuple(line.split("\t")) for line in tsv.read_text().splitlines()[1:]]
    content = plots["LEO meta-training and meta-validation accuracy"][0]["content"]
    drawn = [
        (v["step"], v["val_accuracy"])
        for v in content["data"]["values"]
        if "val_accuracy" in v and "1shot/" in v["filename::field"]
    ]
    assert drawn == logged
    for name in (
        "Backbone pre-training accuracy",
        "MAML meta-validation accuracy (trained by compare)",
    ):
        assert plots[name][0]["content"]["data"]["values"], name
    stage_plot = plots[f"{LOGS['maml']}/plots/metrics/val_accuracy.tsv"][0]["content"]
    assert stage_plot["encoding"]["x"]["field"] == "step"


def _outs(lock: dict, stage: str) -> dict[str, str]:
    return {o["path"]: o["md5"] for o in lock["stages"][stage]["outs"]}


def test_a_forced_rerun_gives_identical_checkpoints_and_logs_so_nothing_downstream_reruns(run):
    for stage in ("pretrain", "metatrain@1shot"):
        before, after = _outs(run["lock1"], stage), _outs(run["lock2"], stage)
        for path, md5 in before.items():
            if not path.endswith("metrics.json"):  # the summaries hold wall times
                assert after[path] == md5, path
    assert run["status"] == {}  # embed and compare@1shot are up to date


def test_the_stages_leave_no_resume_state_behind(run):
    project = run["project"]
    assert not (project / "tmp/metatrain/1shot").exists()
    assert not (project / "tmp/pretrain/resume.pt").exists()
