"""Two machines, one pipeline state: two git clones of a tiny real project and the default
local-directory DVC remote. One (a copy of the session's shared build, with a new LEO param)
runs up to ``embed`` and pushes; the other pulls only what ``metatrain@5shot`` reads and runs
it, without re-running anything upstream. An unreachable or unknown remote is refused in one
line before anything runs."""

from __future__ import annotations

import json

import pytest
import yaml
from pipeline_helpers import OMNIGLOT, copy_built, dvc, git, make_project, ran_stages, set_param

from leo.utils.errors import LeoInputError
from pipeline.flow import pipeline_stages, repro_stage
from pipeline.remote import check_remote, stage_inputs

pytestmark = [
    pytest.mark.slow,  # half a minute of real dvc
    pytest.mark.skipif(not OMNIGLOT.is_file(), reason="real Omniglot data not available"),
]


RUN = "5shot"  # a run without a hyperparameter search (tune.runs) in the default params
DATA_STAGES = ("check", "download", "prepare", "pretrain", "embed")


class Log:
    """A stand-in for the flow's run logger: keeps every line."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, msg: str, *args) -> None:
        self.lines.append(msg % args if args else msg)

    error = info


def run_flow_stages(project, env, targets, **sync) -> tuple[dict[str, str], Log]:
    """The flow's loop (pipeline.flow._run_stages) without Prefect: every stage of
    ``dvc repro TARGETS``, in order, through the task's own function."""
    log = Log()
    status = {
        stage: repro_stage(stage, str(project), env, log, **sync)
        for stage in pipeline_stages(project, targets, env=env)
    }
    return status, log


def test_a_clone_pulls_what_metatrain_reads_from_the_remote_another_clone_pushed(built, tmp_path):
    project, env = copy_built(built, tmp_path)  # tmp_path/project, built up to report
    storage = tmp_path / "leo-dvc-storage"  # the default remote `local`: ../../leo-dvc-storage
    assert check_remote(project, None, pull=False, push=True, env=env) == "local"
    assert not storage.exists()  # DVC creates it on the first push

    # A new LEO param: metatrain must run on the other machine; check reruns here (params.yaml
    # changed), the stages up to embed are up to date. Each pushes: run or found up to date.
    set_param(project, "metatrain.common.num_steps", 5)
    status, log = run_flow_stages(project, env, ["embed"], push="local")
    assert status == {"check": "ran", **{s: "skipped" for s in DATA_STAGES[1:]}}
    for stage in DATA_STAGES:
        assert any(line.startswith(f"{stage}: dvc push:") for line in log.lines), stage
    assert storage.is_dir()
    git("add", "-A", cwd=project, env=env)
    git("commit", "-q", "-m", "ran up to embed", cwd=project, env=env)
    lock = (project / "dvc.lock").read_text()

    clone = tmp_path / "clone"  # the other machine: a clone, nothing but git's files
    git("clone", "-q", str(project), str(clone), cwd=tmp_path, env=env)
    assert not (clone / "data").exists()
    assert check_remote(clone, "local", pull=True, push=False, env=env) == "local"
    inputs = stage_inputs(clone, f"metatrain@{RUN}")
    assert {"data/embeddings/train.parquet", "data/embeddings/val.parquet"} <= set(inputs)
    assert not [p for p in inputs if p.startswith(("data/raw", "data/prepared", "data/pretrain"))]
    status, log = run_flow_stages(clone, env, [f"metatrain@{RUN}"], pull="local")
    assert status[f"metatrain@{RUN}"] == "ran"
    assert all(status[s] == "skipped" for s in ("download", "prepare", "pretrain", "embed"))
    assert any(line.startswith(f"metatrain@{RUN}: pulled its inputs") for line in log.lines)
    # only what metatrain reads came over: no raw images, prepared images, backbone, test split
    assert sorted(p.name for p in (clone / "data/embeddings").iterdir()) == [
        "train.parquet",
        "val.parquet",
    ]
    for absent in ("data/raw", "data/prepared", "data/pretrain"):
        assert not (clone / absent).exists(), absent
    assert (clone / f"data/metatrain/{RUN}/best.pt").is_file()
    metrics = json.loads((clone / f"reports/metatrain/{RUN}/metrics.json").read_text())
    assert metrics["best_val_accuracy"] > 0 and metrics["steps"] == 5  # run here, not A's
    # nothing upstream re-ran: their dvc.lock entries are A's, and DVC finds all up to date
    done = dvc("repro", "--allow-missing", "--dry", f"metatrain@{RUN}", cwd=clone, env=env)
    assert ran_stages(done.stdout) == []
    before, after = (
        yaml.safe_load(lock)["stages"],
        yaml.safe_load((clone / "dvc.lock").read_text())["stages"],
    )
    for stage in ("download", "prepare", "pretrain", "embed"):
        assert after[stage] == before[stage], stage


def test_an_unreachable_or_unknown_remote_is_refused_in_one_line(tmp_path):
    project, env = make_project(tmp_path)
    with pytest.raises(LeoInputError) as err:  # the default remote's directory does not exist
        check_remote(project, None, pull=True, push=True, env=env)
    assert str(err.value) == (
        f"flow parameters: remote 'local' ({tmp_path / 'leo-dvc-storage'}) is unreachable: "
        "no such directory"
    )
    (tmp_path / "file").write_text("not a directory")
    dvc("remote", "add", "--local", "nas", str(tmp_path / "file" / "store"), cwd=project, env=env)
    with pytest.raises(LeoInputError, match=r"^flow parameters: remote 'nas' .* unreachable"):
        check_remote(project, "nas", pull=False, push=True, env=env)
    with pytest.raises(LeoInputError, match=r"^flow parameters: remote: 'gcs' is not a DVC "):
        check_remote(project, "gcs", pull=True, push=False, env=env)
    dvc("remote", "add", "--local", "s3", "s3://leo-bucket/cache", cwd=project, env=env)
    with pytest.raises(LeoInputError) as err:  # dvc-s3 is not installed, or no network
        check_remote(project, "s3", pull=True, push=False, env=env, timeout=60)
    assert str(err.value).startswith("flow parameters: remote 's3' (s3://leo-bucket/cache)")
    assert "\n" not in str(err.value)
