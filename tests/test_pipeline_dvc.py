"""The DVC pipeline for real: ``dvc repro`` of a tiny copy of the project, what reruns after a
LEO or a backbone param change, ``dvc metrics diff`` between commits, one-line param errors,
and every stage forced to rerun writing the same bytes.

The first ``dvc repro`` is the session's shared build (``built``, tests/conftest.py); each
scenario goes on in its own copy of it."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import yaml
from pipeline_helpers import (
    BIN,
    OMNIGLOT,
    REPO,
    copy_built,
    dvc,
    git,
    ran_stages,
    set_param,
)

DATA_STAGES = ["check", "download", "prepare", "pretrain", "embed"]
LEO_STAGES = ["metatrain@1shot", "metatrain@5shot", "evaluate@1shot", "evaluate@5shot", "report"]
needs_data = pytest.mark.skipif(not OMNIGLOT.is_file(), reason="real Omniglot data not available")
slow = pytest.mark.slow  # real DVC runs: about 2.5 minutes of them after the shared build


@pytest.fixture(scope="module")
def leo_change(built, tmp_path_factory) -> dict:
    """The shared build committed, a LEO hyperparameter changed, ``dvc repro``, committed,
    ``dvc metrics diff`` between the two commits."""
    project, env = copy_built(built, tmp_path_factory.mktemp("leo"))
    git("add", "-A", cwd=project, env=env)
    git("commit", "-q", "-m", "tiny run", cwd=project, env=env)
    set_param(project, "metatrain.common.num_steps", 6)
    h: dict = {"status": json.loads(dvc("status", "--json", cwd=project, env=env).stdout)}
    h["repro"] = dvc("repro", cwd=project, env=env, timeout=600).stdout
    git("add", "-A", cwd=project, env=env)
    git("commit", "-q", "-m", "more LEO steps", cwd=project, env=env)
    h["diff"] = json.loads(dvc("metrics", "diff", "HEAD~1", "--json", cwd=project, env=env).stdout)
    h["diff_text"] = dvc("metrics", "diff", "HEAD~1", cwd=project, env=env).stdout
    return h


@pytest.fixture(scope="module")
def backbone_change(built, tmp_path_factory) -> dict:
    """A backbone hyperparameter of the shared build changed, ``dvc repro`` twice."""
    project, env = copy_built(built, tmp_path_factory.mktemp("backbone"))
    set_param(project, "pretrain.omniglot.epochs", 2)
    h: dict = {"status": json.loads(dvc("status", "--json", cwd=project, env=env).stdout)}
    h["repro"] = dvc("repro", cwd=project, env=env, timeout=600).stdout
    h["repro_again"] = dvc("repro", cwd=project, env=env).stdout
    return h


@pytest.fixture(scope="module")
def bad_params(built, tmp_path_factory) -> dict:
    """``dvc repro`` of the shared build with a misspelt key, then with a bad device."""
    project, env = copy_built(built, tmp_path_factory.mktemp("bad"))
    h: dict = {"project": project}
    good = (project / "params.yaml").read_text()
    h["metrics_before_bad"] = (project / "reports/metrics.json").read_text()
    set_param(project, "metatrain.common.num_stepz", 7)
    h["bad"] = subprocess.run(
        [str(BIN / "dvc"), "repro"], cwd=project, env=env, capture_output=True, text=True
    )
    h["metrics_after_bad"] = (project / "reports/metrics.json").read_text()
    (project / "params.yaml").write_text(good)

    # A key no stage depends on (a device) is still validated: the check stage reads it all.
    set_param(project, "metatrain.device", "gpu")
    h["bad_device"] = subprocess.run(
        [str(BIN / "dvc"), "repro"], cwd=project, env=env, capture_output=True, text=True
    )
    (project / "params.yaml").write_text(good)
    return h


@pytest.fixture(scope="module")
def forced(built, tmp_path_factory) -> dict:
    """Every stage of an up-to-date copy of the shared build rerun from the same inputs
    (``dvc repro --force``): its outputs and ``dvc.lock`` before and after."""
    project, env = copy_built(built, tmp_path_factory.mktemp("forced"))
    f: dict = {"outs_before": snapshot(project)}
    f["lock_before"] = yaml.safe_load((project / "dvc.lock").read_text())
    f["forced"] = dvc("repro", "--force", cwd=project, env=env, timeout=600).stdout
    f["outs_after"] = snapshot(project)
    f["lock_after"] = yaml.safe_load((project / "dvc.lock").read_text())
    return f


def _without_timings(value):
    """A JSON value without the wall-clock entries (keys naming seconds)."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def snapshot(project) -> dict[str, object]:
    """Every file of every stage's outputs: sha256, or for JSON the value without timings."""
    out = {}
    for root in ("data", "reports"):
        for path in sorted((project / root).rglob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            rel = str(path.relative_to(project))
            if path.suffix == ".json":
                out[rel] = _without_timings(json.loads(path.read_text()))
            elif path.suffix == ".md" and "compare" in rel:
                out[rel] = [line for line in path.read_text().splitlines() if " s" not in line]
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@needs_data
@slow
def test_repro_runs_every_stage_in_dag_order_and_writes_the_report(built):
    ran = ran_stages(built.repro)
    assert sorted(ran) == sorted(built.stages)
    assert set(DATA_STAGES + LEO_STAGES) <= set(ran)
    assert ran[:5] == DATA_STAGES
    for run in ("1shot", "5shot"):
        assert ran.index(f"metatrain@{run}") < ran.index(f"evaluate@{run}") < ran.index("report")
    assert built.status == {}  # everything up to date afterwards
    m = json.loads((built.project / "reports/metrics.json").read_text())
    assert set(m) == {"backbone", "1shot", "5shot", "wall_seconds"}
    assert 0.0 <= m["backbone"]["heldout_accuracy"] <= 1.0
    for run, shots in (("1shot", 1), ("5shot", 5)):
        assert m[run]["num_shots"] == shots and m[run]["steps"] == 4
        assert m[run]["test_episodes"] == 20 and 0.0 <= m[run]["test_accuracy"] <= 1.0
        assert m[run]["test_ci95"] > 0.0
    plots = built.project / "reports/plots"
    assert sorted(p.name for p in plots.iterdir()) == ["accuracy.png", "loss.png", "step_sizes.png"]


@needs_data
@slow
def test_leo_param_change_reruns_only_metatrain_onward(built, leo_change):
    downstream = set(built.stages) - set(DATA_STAGES)  # every stage after embed
    assert {"metatrain@1shot", "metatrain@5shot"} <= set(leo_change["status"])
    assert set(leo_change["status"]) <= downstream | {"check"}
    ran = ran_stages(leo_change["repro"])
    assert sorted(ran) == sorted(downstream | {"check"}) and set(LEO_STAGES) <= set(ran)
    for stage in DATA_STAGES[1:]:  # check revalidates params.yaml; its output is unchanged
        assert f"Stage '{stage}' didn't change, skipping" in leo_change["repro"]


@needs_data
@slow
def test_metrics_diff_between_commits_shows_the_changed_metric(leo_change):
    diff = leo_change["diff"]["reports/metrics.json"]
    assert diff["1shot.steps"] == {"old": 4, "new": 6, "diff": 2}
    assert diff["5shot.steps"] == {"old": 4, "new": 6, "diff": 2}
    assert "backbone.heldout_accuracy" not in diff  # the backbone did not change
    assert "1shot.steps" in leo_change["diff_text"]


@needs_data
@slow
def test_backbone_param_change_reruns_pretrain_onward(built, backbone_change):
    assert set(backbone_change["status"]) == {"check", "pretrain"}
    ran = ran_stages(backbone_change["repro"])
    assert sorted(ran) == sorted(set(built.stages) - {"download", "prepare"})
    assert ran[:3] == ["check", "pretrain", "embed"]
    assert ran_stages(backbone_change["repro_again"]) == []  # and then nothing is left to do


@needs_data
@slow
def test_malformed_param_key_fails_in_one_line_before_writing(bad_params):
    bad = bad_params["bad"]
    assert bad.returncode != 0
    lines = [x for x in bad.stderr.splitlines() if x.startswith("error: ")]
    assert lines == ["error: params.yaml: metatrain.common.num_stepz: unknown key"]
    assert bad_params["metrics_after_bad"] == bad_params["metrics_before_bad"]
    leftovers = [p for p in bad_params["project"].rglob("*.tmp") if ".dvc" not in p.parts]
    assert leftovers == []


@needs_data
@slow
def test_a_bad_device_no_stage_depends_on_still_stops_dvc_repro(bad_params):
    bad = bad_params["bad_device"]
    assert bad.returncode != 0
    lines = [x for x in bad.stderr.splitlines() if x.startswith("error: ")]
    assert lines == [
        "error: params.yaml: metatrain.device: must be auto, cpu, cuda or cuda:<index> (got 'gpu')"
    ]


@needs_data
@slow
def test_every_stage_rerun_from_the_same_inputs_writes_the_same_bytes(built, forced):
    assert len(ran_stages(forced["forced"])) == len(built.stages)
    before, after = forced["outs_before"], forced["outs_after"]
    assert sorted(before) == sorted(after)
    assert {k for k in before if before[k] != after[k]} == set()
    cached = {  # every cached output's md5 in dvc.lock: the same
        (stage, out["path"]): out["md5"]
        for lock in (forced["lock_before"],)
        for stage, entry in lock["stages"].items()
        for out in entry.get("outs", [])
        if out["path"].startswith("data/")
    }
    for (stage, path), md5 in cached.items():
        outs = {o["path"]: o["md5"] for o in forced["lock_after"]["stages"][stage]["outs"]}
        assert outs[path] == md5, (stage, path)


def test_dvc_yaml_declares_the_dag_and_templated_sources():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    names = list(stages)
    mine = ["check", "download", "prepare", "pretrain", "embed", "import_published", "metatrain"]
    assert [n for n in names if n in mine + ["evaluate", "report"]] == [*mine, "evaluate", "report"]
    mt = stages["metatrain"]["do"]
    assert stages["metatrain"]["foreach"] == "${metatrain.runs}"
    assert stages["import_published"]["foreach"] == "${published.imports}"
    assert "${embeddings.dir}/train.parquet" in mt["deps"]
    assert not any("test" in d for d in mt["deps"])  # meta-training never reads the test split
    assert {"metatrain.common", "metatrain.runs.${key}"} <= set(mt["params"])
    assert stages["report"]["metrics"] == [{"reports/metrics.json": {"cache": False}}]
    listed = subprocess.run(
        [str(BIN / "dvc"), "stage", "list", "--name-only"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert set(DATA_STAGES + LEO_STAGES) <= set(listed)  # no published import by default
    assert not any(n.startswith("import_published") for n in listed)


# -- the LEO stages' params: one line naming the key -----------------------------------------


def test_stage_exits_2_with_one_line_and_writes_nothing(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["metatrain"]["common"]["validate_evry"] = 5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run(
        [sys.executable, "-m", "stages.metatrain", "1shot"],
        cwd=tmp_path,
        env={"PATH": str(BIN), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr == ("error: params.yaml: metatrain.common.validate_evry: unknown key\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
