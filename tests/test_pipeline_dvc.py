"""The DVC pipeline for real: ``dvc repro`` of a tiny copy of the project, what reruns after a
LEO or a backbone param change, ``dvc metrics diff`` between commits, one-line param errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from pipeline_helpers import (
    BIN,
    OMNIGLOT,
    REPO,
    dvc,
    git,
    make_project,
    ran_stages,
    set_param,
    stage_names,
)

from leo.errors import LeoInputError
from stages import evaluate as evaluate_stage
from stages import import_published as import_stage
from stages import metatrain as metatrain_stage

DATA_STAGES = ["download", "prepare", "pretrain", "embed"]
LEO_STAGES = ["metatrain@1shot", "metatrain@5shot", "evaluate@1shot", "evaluate@5shot", "report"]
needs_data = pytest.mark.skipif(not OMNIGLOT.is_file(), reason="real Omniglot data not available")
slow = pytest.mark.slow  # the tests that share the `history` fixture: ~100 s of real DVC runs


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> dict:
    """Every DVC step of the scenario, run once: repro, LEO change, backbone change, bad key."""
    project, env = make_project(tmp_path_factory.mktemp("dvc"))
    h: dict = {"project": project, "stages": stage_names(project, env)}
    h["repro1"] = dvc("repro", cwd=project, env=env, timeout=600).stdout
    h["status1"] = json.loads(dvc("status", "--json", cwd=project, env=env).stdout)
    h["metrics1"] = json.loads((project / "reports/metrics.json").read_text())
    git("add", "-A", cwd=project, env=env)
    git("commit", "-q", "-m", "tiny run", cwd=project, env=env)

    set_param(project, "metatrain.common.num_steps", 6)  # a LEO hyperparameter
    h["status2"] = json.loads(dvc("status", "--json", cwd=project, env=env).stdout)
    h["repro2"] = dvc("repro", cwd=project, env=env, timeout=600).stdout
    git("add", "-A", cwd=project, env=env)
    git("commit", "-q", "-m", "more LEO steps", cwd=project, env=env)
    h["diff"] = json.loads(dvc("metrics", "diff", "HEAD~1", "--json", cwd=project, env=env).stdout)
    h["diff_text"] = dvc("metrics", "diff", "HEAD~1", cwd=project, env=env).stdout

    set_param(project, "pretrain.omniglot.epochs", 2)  # a backbone hyperparameter
    h["status3"] = json.loads(dvc("status", "--json", cwd=project, env=env).stdout)
    h["repro3"] = dvc("repro", cwd=project, env=env, timeout=600).stdout
    h["repro4"] = dvc("repro", cwd=project, env=env).stdout

    good = (project / "params.yaml").read_text()
    h["metrics_before_bad"] = (project / "reports/metrics.json").read_text()
    set_param(project, "metatrain.common.num_stepz", 7)
    h["bad"] = subprocess.run(
        [str(BIN / "dvc"), "repro"], cwd=project, env=env, capture_output=True, text=True
    )
    h["metrics_after_bad"] = (project / "reports/metrics.json").read_text()
    (project / "params.yaml").write_text(good)
    return h


@needs_data
@slow
def test_repro_runs_every_stage_in_dag_order_and_writes_the_report(history):
    ran = ran_stages(history["repro1"])
    assert sorted(ran) == sorted(history["stages"])
    assert set(DATA_STAGES + LEO_STAGES) <= set(ran)
    assert ran[:4] == DATA_STAGES
    for run in ("1shot", "5shot"):
        assert ran.index(f"metatrain@{run}") < ran.index(f"evaluate@{run}") < ran.index("report")
    assert history["status1"] == {}  # everything up to date afterwards
    m = history["metrics1"]
    assert set(m) == {"backbone", "1shot", "5shot", "wall_seconds"}
    assert 0.0 <= m["backbone"]["heldout_accuracy"] <= 1.0
    for run, shots in (("1shot", 1), ("5shot", 5)):
        assert m[run]["num_shots"] == shots and m[run]["steps"] == 4
        assert m[run]["test_episodes"] == 20 and 0.0 <= m[run]["test_accuracy"] <= 1.0
        assert m[run]["test_ci95"] > 0.0
    plots = history["project"] / "reports/plots"
    assert sorted(p.name for p in plots.iterdir()) == ["accuracy.png", "loss.png", "step_sizes.png"]


@needs_data
@slow
def test_leo_param_change_reruns_only_metatrain_onward(history):
    downstream = set(history["stages"]) - set(DATA_STAGES)  # every stage after embed
    assert {"metatrain@1shot", "metatrain@5shot"} <= set(history["status2"]) <= downstream
    ran = ran_stages(history["repro2"])
    assert sorted(ran) == sorted(downstream) and set(LEO_STAGES) <= set(ran)
    for stage in DATA_STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in history["repro2"]


@needs_data
@slow
def test_metrics_diff_between_commits_shows_the_changed_metric(history):
    diff = history["diff"]["reports/metrics.json"]
    assert diff["1shot.steps"] == {"old": 4, "new": 6, "diff": 2}
    assert diff["5shot.steps"] == {"old": 4, "new": 6, "diff": 2}
    assert "backbone.heldout_accuracy" not in diff  # the backbone did not change
    assert "1shot.steps" in history["diff_text"]


@needs_data
@slow
def test_backbone_param_change_reruns_pretrain_onward(history):
    assert set(history["status3"]) == {"pretrain"}
    ran = ran_stages(history["repro3"])
    assert sorted(ran) == sorted(set(history["stages"]) - {"download", "prepare"})
    assert ran[:2] == ["pretrain", "embed"]
    assert ran_stages(history["repro4"]) == []  # and then nothing is left to do


@needs_data
@slow
def test_malformed_param_key_fails_in_one_line_before_writing(history):
    bad = history["bad"]
    assert bad.returncode != 0
    lines = [x for x in bad.stderr.splitlines() if x.startswith("error: ")]
    assert lines == [
        "error: params.yaml: unknown key 'metatrain.common.num_stepz' (not a LEO field)"
    ]
    assert history["metrics_after_bad"] == history["metrics_before_bad"]
    leftovers = [p for p in history["project"].rglob("*.tmp") if ".dvc" not in p.parts]
    assert leftovers == []


def test_dvc_yaml_declares_the_dag_and_templated_sources():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    names = list(stages)
    mine = ["download", "prepare", "pretrain", "embed", "import_published", "metatrain"]
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

BASE = {"seed": 3, "dataset": "omniglot"}


def metatrain_params(**run) -> dict:
    return {
        "base": BASE,
        "device": "cpu",
        "common": {"num_steps": 10, "compile": False},
        "runs": {"1shot": {"preset": "default", "num_shots": 1, **run}},
    }


def test_run_config_merges_preset_common_and_run():
    cfg, preset, device = metatrain_stage.run_config(
        metatrain_params(preset="mini-5shot", num_shots=1, outer_lr=2.0e-3), "1shot"
    )
    assert (preset, device.type) == ("mini-5shot", "cpu")
    assert cfg.num_shots == 1 and cfg.outer_lr == 2.0e-3  # the run overrides the preset
    assert cfg.kl_weight == pytest.approx(0.466387)  # from the preset
    assert cfg.num_steps == 10 and cfg.compile is False and cfg.seed == 3


@pytest.mark.parametrize(
    ("run", "message"),
    [
        ({"latent_dimm": 8}, "unknown key 'metatrain.runs.1shot.latent_dimm'"),
        ({"outer_lr": "1e-4"}, "'metatrain.runs.1shot.outer_lr' must be float, got '1e-4'"),
        ({"num_shots": 1.5}, "'metatrain.runs.1shot.num_shots' must be int"),
        ({"compile": 1}, "'metatrain.runs.1shot.compile' must be bool"),
        ({"preset": "huge"}, "'metatrain.runs.1shot.preset' must be one of default,"),
        ({"num_shots": 0}, "metatrain.runs.1shot: LEO config: num_shots must be >= 1"),
    ],
)
def test_run_config_names_the_bad_key(run, message):
    with pytest.raises(LeoInputError, match=message.replace("(", r"\(").replace(".", r"\.")):
        metatrain_stage.run_config(metatrain_params(**run), "1shot")


def test_run_config_rejects_unknown_runs_sections_and_devices():
    with pytest.raises(LeoInputError, match=r"no run 'metatrain\.runs\.9shot'"):
        metatrain_stage.run_config(metatrain_params(), "9shot")
    with pytest.raises(LeoInputError, match=r"unknown key 'metatrain\.extra'"):
        metatrain_stage.run_config({**metatrain_params(), "extra": 1}, "1shot")
    with pytest.raises(LeoInputError, match=r"'metatrain\.device' must be auto, cpu or cuda"):
        metatrain_stage.run_config({**metatrain_params(), "device": "tpu"}, "1shot")


def test_evaluate_and_import_params_name_the_bad_key():
    good = {"base": BASE, "device": "cpu", "num_episodes": 10, "batch_size": 5, "seed": 1}
    assert evaluate_stage.options(good)["num_episodes"] == 10
    with pytest.raises(LeoInputError, match=r"'evaluate\.num_episodes' must be >= 1"):
        evaluate_stage.options({**good, "num_episodes": 0})
    with pytest.raises(LeoInputError, match=r"unknown key 'evaluate\.episodes'"):
        evaluate_stage.options({**good, "episodes": 3})
    entry = {"root": "/x", "dataset": "miniImageNet", "view": "center"}
    sha = {"train": "a" * 64, "val": "b" * 64, "test": "c" * 64}
    params = {"base": BASE, "imports": {"mini": {**entry, "sha256": sha}}}
    assert import_stage.entry(params, "mini")["expected_sha256"] == sha
    params["imports"]["mini"]["sha256"] = {**sha, "test": "C" * 64}
    with pytest.raises(LeoInputError, match=r"'published\.imports\.mini\.sha256\.test' must be 64"):
        import_stage.entry(params, "mini")
    with pytest.raises(LeoInputError, match=r"no entry 'published\.imports\.tiered'"):
        import_stage.entry(params, "tiered")


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
    assert done.stderr == (
        "error: params.yaml: unknown key 'metatrain.common.validate_evry' (not a LEO field)\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
