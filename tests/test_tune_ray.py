"""Population-based training on a real two-node Ray cluster started on this machine.

One cluster (a head and a second node, one CPU each) serves the whole module. The search
runs with an identity explore (factors 1, no resampling), so an exploit copies a better
trial's state and hyperparameters unchanged: every reported fitness must then equal, bit
for bit, a plain ``meta_train`` of the hyperparameters the trial had at that point, whoever
trained it, on whichever node, after whichever kill. The stage runs as a new user would run
it, through ``RAY_ADDRESS``, and ``metatrain`` takes its result with ``from_tune``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from shared_data import REPO

from leo.core.config import make_config
from leo.data.store import write_embeddings
from leo.data.synthetic import synthetic_split
from leo.meta.train import load_checkpoint, meta_train
from leo.settings import read_yaml
from leo.tune.space import make_space

ray = pytest.importorskip("ray")
tune = pytest.importorskip("ray.tune")
pytestmark = pytest.mark.slow  # a Ray cluster and three searches: about a minute


@pytest.fixture(scope="module")
def cluster():
    """A head node and a second node, one CPU each; this process connected as the driver."""
    from ray.cluster_utils import Cluster

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    two = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    two.add_node(num_cpus=1)
    two.wait_for_nodes()
    ray.init(address=two.address, log_to_driver=False)
    yield two
    ray.shutdown()
    two.shutdown()


def _splits():
    kw = dict(per_class=20, dim=32, noise=0.25)
    return synthetic_split(30, split="train", seed=5, **kw), synthetic_split(
        10, split="val", seed=6, **kw
    )


def _base(**kw):
    values = dict(
        latent_dim=8,
        val_batches=1,
        val_batch_size=40,
        batch_size=4,
        compile=False,
        eval_per_class_total=None,
        outer_lr=1e-5,  # t0, the run's own values, learns nothing: the worst starter
        finetune_lr_init=1e-3,
    )
    return make_config("default", **{**values, **kw})


class KillOnce(tune.Callback):
    """Kills trial ``t1``'s actor (its process) as a report of it comes in, from its second
    report on (that report's checkpoint not yet registered, an earlier one is), and keeps
    the (step, exploit) of each of its reports."""

    def __init__(self) -> None:
        self.reports: list[tuple[int, dict | None]] = []
        self.killed_at: int | None = None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if trial.trial_id.endswith("_00001"):
            self.reports.append((result["step"], result["exploit"]))
            actor = trial.temporary_state.ray_actor
            running = trial.status == "RUNNING" and actor is not None and not result["exploit"]
            if self.killed_at is None and len(self.reports) >= 2 and running:
                self.killed_at = len(self.reports) - 1
                ray.kill(actor, no_restart=True)


@pytest.mark.filterwarnings("ignore:Consider boosting PBT performance")
def test_pbt_copies_exactly_resumes_after_a_kill_and_uses_both_nodes(cluster, tmp_path):
    from leo.tune.search import SearchSettings, search

    train, val = _splits()
    base = _base()
    space = make_space(
        {
            "outer_lr": {"low": 1e-5, "high": 1e-2, "log": True},
            "finetune_lr_init": {"low": 1e-3, "high": 1.0, "log": True},
        },
        base,
        "test",
        "space",
    )
    settings = SearchSettings(
        name="exact",
        space=space,
        population=2,
        steps=30,
        perturbation_interval=10,
        storage=tmp_path / "ray",
        cpus_per_trial=1.0,  # one trial per node ...
        reuse_actors=False,  # ... each in its own process (not one left by a finished trial)
        synch=True,  # every interval ranks both (asynchronously t0 could finish before t1 starts)
        perturbation_factors=(1.0, 1.0),
        resample_probability=0.0,
        seed=5,  # t1 draws outer_lr 2.6e-3, finetune_lr_init 0.27: a config that learns
    )
    killer = KillOnce()
    result = search(base, settings, train, val, callbacks=[killer])
    summary = result.summary

    # every fitness equals a plain, uninterrupted meta_train of the same hyperparameters
    straight = {}
    for i, hp in enumerate(result.population):
        cfg = _base(**hp, num_steps=30, validate_every=10)
        run = meta_train(cfg, train, val, tmp_path / f"plain{i}", progress=False)
        straight[json.dumps(hp, sort_keys=True)] = {r["step"]: r for r in run.history}
    for trial, rows in summary.histories.items():
        assert [r["step"] for r in rows][-1] == 30, trial
        for row in rows:
            plain = straight[json.dumps(row["hyperparameters"], sort_keys=True)][row["step"]]
            assert row["val_accuracy"] == plain["val_accuracy"], (trial, row["step"])
            assert row["train_loss"] == plain["train_loss"], (trial, row["step"])
    # the killed trial went on from its last registered checkpoint (or a copied one): after
    # the kill its next report is not step 10 again, as a restart from step 0 would be
    assert killer.killed_at is not None and len(killer.reports) > killer.killed_at + 1
    step, exploit = killer.reports[killer.killed_at + 1]
    assert step >= 20 or exploit is not None, killer.reports
    assert summary.lineage and all(e["changed"] == {} for e in summary.lineage)
    nodes = {t: [r["node"][:6] for r in rows] for t, rows in summary.histories.items()}
    assert len(set(summary.nodes)) == 2, (nodes, killer.reports)  # trials ran on both nodes
    assert not (tmp_path / "ray" / "exact").exists()  # checkpoints removed after the search

    # PBT improves fitness over its worst starting trial (t0: outer_lr 1e-5) trained alone
    worst = min(summary.histories, key=lambda t: summary.histories[t][0]["val_accuracy"])
    alone = straight[json.dumps(summary.initial[worst], sort_keys=True)][30]["val_accuracy"]
    assert worst == "t0"
    assert summary.best["val_accuracy"] > alone + 0.05, (summary.best, alone)


def _project(tmp_path, train, val):
    """A directory with params.yaml (the repository's, tiny) and synthetic embeddings."""
    params = read_yaml(REPO / "params.yaml")
    params["metatrain"]["device"] = "cpu"
    params["metatrain"]["common"] = dict(
        num_steps=20,
        validate_every=10,
        val_batches=1,
        val_batch_size=40,
        batch_size=4,
        latent_dim=8,
        compile=False,
        eval_per_class_total=None,
    )
    params["tune"].update(cpus_per_trial=1.0, device="cpu")
    params["tune"]["space"] = {
        "outer_lr": {"low": 1e-4, "high": 1e-2, "log": True},
        "dropout": {"low": 0.0, "high": 0.5},
        "inner_steps": {"choices": [1, 3]},
    }
    params["tune"]["runs"] = {"1shot": {"population": 2, "steps": 20, "perturbation_interval": 10}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for split in (train, val):
        write_embeddings(
            tmp_path / "emb" / f"{split.split}.parquet",
            split=split.split,
            class_names=[split.class_names[int(c)] for c in split.labels],
            example_ids=split.example_ids,
            embeddings=split.embeddings.numpy(),
            provenance=split.provenance,
        )


def _stage(args, cwd, **env):
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_tune_stage_on_the_cluster_then_metatrain_from_tune(cluster, tmp_path):
    train, val = _splits()
    _project(tmp_path, train, val)
    done = _stage(
        ["stages.tune", "1shot", "--embeddings", "emb"], tmp_path, RAY_ADDRESS=cluster.address
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reports = tmp_path / "reports/tune/1shot"
    metrics = json.loads((reports / "metrics.json").read_text())
    assert metrics["population"] == 2 and metrics["steps"] == 20 and metrics["nodes"] in (1, 2)
    best = yaml.safe_load((tmp_path / "data/tune/1shot/best.yaml").read_text())
    assert best == yaml.safe_load((reports / "best.yaml").read_text())
    assert set(best) == {"outer_lr", "dropout", "inner_steps"}
    lineage = json.loads((reports / "lineage.json").read_text())
    assert set(lineage["initial"]) == {"t0", "t1"} and lineage["best"]["hyperparameters"] == best
    assert sorted(p.name for p in (reports / "fitness").iterdir()) == ["t0.tsv", "t1.tsv"]
    figures = sorted(p.name for p in (reports / "figures").iterdir())
    assert figures == ["dropout.png", "fitness.png", "inner_steps.png", "outer_lr.png"]
    assert all((reports / "figures" / f).stat().st_size > 5000 for f in figures)
    header = (reports / "history.tsv").read_text().splitlines()[0].split("\t")
    assert header[:3] == ["trial", "step", "val_accuracy"] and header[-3:] == list(best)

    # metatrain takes the result with from_tune: true (written in its metrics and checkpoint)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["metatrain"]["runs"]["1shot"]["from_tune"] = True
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = _stage(["stages.metatrain", "1shot", "--embeddings", "emb"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    _, cfg, _ = load_checkpoint(tmp_path / "data/metatrain/1shot/best.pt")
    assert {k: getattr(cfg, k) for k in best} == best
    assert json.loads((tmp_path / "reports/metatrain/1shot/metrics.json").read_text())["from_tune"]

    # from_tune changed the run's params, so DVC reruns tune@1shot: the same search is reused
    before = {p: p.read_bytes() for p in reports.rglob("*") if p.is_file() and p.suffix != ".json"}
    done = _stage(
        ["stages.tune", "1shot", "--embeddings", "emb"], tmp_path, RAY_ADDRESS="127.0.0.1:9"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the same search finished before" in done.stdout
    assert before == {p: p.read_bytes() for p in before}
