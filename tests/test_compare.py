"""The comparison stage on a tiny SYNTHETIC problem (leo.synthetic), with tiny step counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from leo.compare import CompareSettings, RecordingSampler, compare
from leo.config import make_config
from leo.errors import LeoInputError
from leo.evaluate import eval_sampler
from leo.methods import METHODS
from leo.synthetic import synthetic_split
from leo.train import meta_train

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
DIM = 16


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """One comparison of every method, 5-way 1-shot, on synthetic clusters."""
    root = tmp_path_factory.mktemp("compare")
    train = synthetic_split(30, 12, DIM, noise=0.1, seed=0, split="train")
    val = synthetic_split(8, 12, DIM, noise=0.1, seed=1, split="val")
    test = synthetic_split(8, 12, DIM, noise=0.1, seed=2, split="test")
    base = make_config(
        "default",
        num_shots=1,
        num_queries=3,
        latent_dim=4,
        num_steps=4,
        validate_every=2,
        val_batches=1,
        val_batch_size=8,
        batch_size=2,
        compile=False,
    )
    leo = meta_train(base, train, val, root / "leo", device="cpu", progress=False)
    settings = CompareSettings(
        methods=tuple(METHODS),
        train_steps=2,
        validate_every=2,
        maml={"inner_steps": 1},
        num_episodes=30,
        batch_size=7,
        seed=3,
        ensemble_episodes=14,  # two whole batches: the first 14 test episodes
        ensemble_samples=(1, 2),
        figure_episodes=4,
        figure_iterations=20,
    )
    table = compare(
        "tiny",
        base,
        settings,
        leo.checkpoint,
        train,
        val,
        test,
        root / "data",
        root / "reports",
        device="cpu",
    )
    return {"table": table, "root": root, "test": test, "base": base, "settings": settings}


def test_every_method_scored_on_the_same_episodes(outputs):
    table, base, settings = outputs["table"], outputs["base"], outputs["settings"]
    assert list(table["methods"]) == list(METHODS)
    # the digest the stage recorded is that of the episodes drawn directly from the seed
    sampler = RecordingSampler(eval_sampler(outputs["test"], base, "cpu"))
    gen = torch.Generator().manual_seed(settings.seed)
    for size in (7, 7, 7, 7, 2):
        sampler.indices(size, gen)
    for row in table["methods"].values():
        assert row["episodes"] == 30
        assert row["episodes_sha256"] == sampler.digest
    assert table["episodes_sha256"] == sampler.digest


def test_paired_difference_matches_numpy(outputs):
    table, root = outputs["table"], outputs["root"]
    with np.load(root / "data" / "accuracies.npz") as npz:
        accs = {k: npz[k] for k in npz.files}
    assert set(accs) == set(METHODS)
    for name, row in table["methods"].items():
        d = accs[name] - accs["leo"]
        half = 1.96 * d.std(ddof=1) / np.sqrt(len(d)) if d.any() else 0.0
        assert row["accuracy"] == pytest.approx(accs[name].mean(), abs=1e-12)
        assert row["difference"] == pytest.approx(d.mean(), abs=1e-12)
        assert row["difference_ci95"] == pytest.approx(half, abs=1e-12)
        assert row["significant"] == bool(abs(d.mean()) > half)


def test_outputs_and_keys(outputs):
    reports, data = outputs["root"] / "reports", outputs["root"] / "data"
    table = json.loads((reports / "table.json").read_text())
    assert set(table) == {
        "run",
        "num_classes",
        "num_shots",
        "reference",
        "episodes",
        "seed",
        "episodes_sha256",
        "seconds",
        "methods",
    }
    row_keys = {
        "summary",
        "trained",
        "num_steps",
        "best_step",
        "accuracy",
        "ci95",
        "difference",
        "difference_ci95",
        "significant",
        "episodes",
        "episodes_sha256",
        "seconds",
    }
    for name, row in table["methods"].items():
        assert set(row) == row_keys
        assert row["trained"] == METHODS[name].needs_training
        if name not in ("leo",) and row["trained"]:
            assert row["num_steps"] == 2 and (data / name / "best.pt").is_file()
    assert table["methods"]["leo"]["num_steps"] == 4  # reused, not retrained
    assert not (data / "leo").exists()
    md = (reports / "table.md").read_text()
    for name in METHODS:
        assert f"| {name} |" in md
    ens = json.loads((reports / "ensembles.json").read_text())
    assert set(ens) == {"run", "episodes", "seed", "noise_seed", "seconds", "predictors"}
    assert list(ens["predictors"]) == ["mean-only", "ensemble-1", "ensemble-2"]
    for row in ens["predictors"].values():
        assert {"accuracy", "ci95", "ece", "episodes", "difference"} <= set(row)
        assert row["episodes"] == 14 and 0.0 <= row["ece"] <= 1.0
    assert ens["predictors"]["mean-only"]["difference"] == 0.0
    # mean-only on the same first episodes is plain LEO's accuracy on them
    with np.load(data / "accuracies.npz") as npz:
        assert ens["predictors"]["mean-only"]["accuracy"] == pytest.approx(
            npz["leo"][:14].mean(), abs=1e-6
        )
    ens_md = (reports / "ensembles.md").read_text()
    assert "| mean-only |" in ens_md and "| ensemble-2 |" in ens_md
    fig = json.loads((reports / "figure2.json").read_text())
    assert fig["episodes"] == 4 and (reports / "figure2.png").stat().st_size > 0


def test_settings_need_leo_and_known_methods():
    with pytest.raises(LeoInputError, match="include 'leo'"):
        CompareSettings(methods=("maml",))
    with pytest.raises(LeoInputError, match="unknown method 'nope'"):
        CompareSettings(methods=("leo", "nope"))


def test_bad_params_key_is_one_line_exit_2(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["compare"]["not_a_key"] = 1
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    env = {**os.environ, "LEO_PARAMS": str(path), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "stages.compare", "1shot"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "compare.not_a_key" in lines[0], proc.stderr


def test_settings_merge_the_run_s_maml_overrides():
    from stages.compare import settings

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    compare_params = {"base": params["base"], **params["compare"]}
    compare_params["maml"] = {"inner_steps": 3, "inner_lr": 0.5}
    compare_params["maml_runs"] = {"5shot": {"inner_lr": 0.1}}
    evaluate = {"num_episodes": 50, "batch_size": 10, "seed": 4}
    five = settings(compare_params, evaluate, "5shot")
    assert five.maml == {"inner_steps": 3, "inner_lr": 0.1}
    one = settings(compare_params, evaluate, "1shot")
    assert one.maml == {"inner_steps": 3, "inner_lr": 0.5}
    assert (one.num_episodes, one.batch_size, one.seed) == (50, 10, 4)  # null: evaluate's
