"""compare() on a tiny SYNTHETIC problem (leo.data.synthetic) written to Parquet and read back
as a user's own embeddings would be, with tiny step counts; its settings, its check of the
LEO config against the checkpoint's, its CPU threads and its docstring."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from leo.comparison.compare import UNCHECKED_FIELDS, CompareSettings, RecordingSampler, compare
from leo.comparison.methods import METHODS, TUNED, method_config
from leo.core.config import LEOConfig, make_config
from leo.data.store import read_embeddings, write_embeddings
from leo.data.synthetic import synthetic_split
from leo.meta.evaluate import eval_sampler
from leo.meta.train import meta_train
from leo.settings import parse_settings
from leo.utils.errors import LeoInputError

REPO = Path(__file__).resolve().parents[1]
DIM = 16
CHEAP = ("leo", "nearest-mean-cosine")  # nothing to train
pytestmark = pytest.mark.usefixtures("one_thread")


def _parquet(split, path: Path):
    """Write a split as a user would (leo.data.store) and read it back."""
    names = np.array(split.class_names)[split.labels.numpy()]
    write_embeddings(
        path,
        split=split.split,
        class_names=names,
        example_ids=split.example_ids,
        embeddings=split.embeddings.numpy(),
        provenance=split.provenance,
    )
    return read_embeddings(path)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, one_thread):
    """One comparison of every method, 5-way 1-shot, on synthetic clusters."""
    root = tmp_path_factory.mktemp("compare")
    train, val, test = (
        _parquet(synthetic_split(classes, 12, DIM, noise=0.1, seed=seed, split=name), root / name)
        for classes, seed, name in ((30, 0, "train"), (8, 1, "val"), (8, 2, "test"))
    )
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
    return {
        "table": table,
        "root": root,
        "splits": (train, val, test),
        "test": test,
        "base": base,
        "settings": settings,
        "checkpoint": leo.checkpoint,
    }


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
    assert table == json.loads(json.dumps(outputs["table"]))  # the file is what was returned
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
        if name not in ("leo",) and row["trained"]:  # leo-pbt: as long as leo (tuned values)
            assert row["num_steps"] == (4 if name == TUNED else 2)
            assert (data / name / "best.pt").is_file()
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
    assert fig["episodes"] == 4 and fig["codes"] == 20 and fig["tsne_iterations"] == 20
    assert (reports / "figure2.png").stat().st_size > 0


def test_maml_steps_at_the_shots_default(outputs):
    """MAMLConfig.inner_lr left unset: 1.0 at 1-shot (0.1 beyond); the override applied."""
    obj = torch.load(outputs["root"] / "data" / "maml" / "best.pt", weights_only=True)
    assert obj["config"]["inner_lr"] == 1.0 and obj["config"]["inner_steps"] == 1
    assert obj["config"]["num_steps"] == 2 and obj["config"]["num_shots"] == 1
    five = method_config("maml", dataclasses.replace(outputs["base"], num_shots=5))
    assert five.inner_lr == 0.1 and five.num_shots == 5
    assert method_config("maml", outputs["base"], inner_lr=0.3).inner_lr == 0.3


def _cheap(outputs, tmp_path, base, **settings):
    """compare() of the fixture's checkpoint with methods that need no training."""
    values = dict(methods=CHEAP, num_episodes=30, batch_size=7, seed=3) | settings
    return compare(
        "cheap",
        base,
        CompareSettings(**values),
        outputs["checkpoint"],
        *outputs["splits"],
        tmp_path / "data",
        tmp_path / "reports",
        device="cpu",
    )


def test_defaults_every_method_no_ensembles_no_figure(outputs, tmp_path):
    defaults = CompareSettings()
    assert defaults.methods == tuple(METHODS)
    assert defaults.ensemble_episodes == 0 and defaults.figure_episodes == 0
    # base=None: the checkpoint's own config; the same episodes and numbers as the fixture's
    table = _cheap(outputs, tmp_path, None)
    ours, fixture = table["methods"]["leo"], outputs["table"]["methods"]["leo"]
    assert {k: v for k, v in ours.items() if k != "seconds"} == {
        k: v for k, v in fixture.items() if k != "seconds"
    }
    reports = tmp_path / "reports"
    assert sorted(p.name for p in reports.iterdir()) == [
        "ensembles.json",
        "ensembles.md",
        "figure2.json",
        "figure2.png",
        "maml",
        "table.json",
        "table.md",
    ]  # the parts switched off say so, in the files the pipeline declares
    assert "not among" in json.loads((reports / "maml" / "metrics.json").read_text())["note"]
    assert json.loads((reports / "figure2.json").read_text())["note"] == (
        "Figure 2 not drawn: figure_episodes is 0"
    )
    assert json.loads((reports / "ensembles.json").read_text()) == {
        "episodes": 0,
        "note": "not measured: ensemble_episodes is 0",
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [("latent_dim", 5), ("num_classes", 4), ("kl_weight", 0.5), ("eval_inner_steps", 2)],
)
def test_a_config_other_than_the_checkpoint_s_is_refused(outputs, tmp_path, field, value):
    stored = getattr(outputs["base"], field)
    base = dataclasses.replace(outputs["base"], **{field: value})
    with pytest.raises(LeoInputError) as err:
        _cheap(outputs, tmp_path, base)
    message = str(err.value)
    assert "\n" not in message and str(outputs["checkpoint"]) in message
    assert f"{field}={value!r}" in message and f"{field}={stored!r}" in message
    assert not tmp_path.joinpath("reports").exists()  # refused before anything is written


def test_execution_seed_and_training_length_may_differ(outputs, tmp_path):
    assert UNCHECKED_FIELDS == {
        "compile",
        "form",
        "gradients",
        "seed",
        "num_steps",
        "validate_every",
    }
    assert UNCHECKED_FIELDS < {f.name for f in dataclasses.fields(LEOConfig)}
    base = dataclasses.replace(
        outputs["base"],
        compile="auto",
        form="literal",
        gradients="autograd",
        seed=7,
        num_steps=9,
        validate_every=3,
    )
    table = _cheap(outputs, tmp_path, base)
    assert table["methods"]["leo"]["accuracy"] == outputs["table"]["methods"]["leo"]["accuracy"]


def test_splits_of_another_dimension_are_refused(outputs, tmp_path):
    train, val, test = outputs["splits"]
    other = synthetic_split(8, 12, DIM + 1, seed=1, split="val")
    with pytest.raises(LeoInputError, match=f"{DIM}-d embeddings, but the val split is"):
        compare(
            "x", None, None, outputs["checkpoint"], train, other, test, tmp_path, tmp_path / "r"
        )


def test_runs_on_the_threads_asked_and_puts_torch_s_back(outputs, tmp_path):
    torch.set_num_threads(2)
    try:
        _cheap(outputs, tmp_path / "one", None, figure_episodes=2, figure_iterations=8)
        assert torch.get_num_threads() == 2
        compare(
            "threads",
            None,
            CompareSettings(
                methods=("leo",),
                num_episodes=7,
                batch_size=7,
                figure_episodes=2,
                figure_iterations=8,
            ),
            outputs["checkpoint"],
            *outputs["splits"],
            tmp_path / "data",
            tmp_path / "torch",
            device="cpu",
            cpu_threads=None,
        )
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    one = json.loads((tmp_path / "one" / "reports" / "figure2.json").read_text())
    own = json.loads((tmp_path / "torch" / "figure2.json").read_text())
    # the t-SNE on every core either way, and the same map (Figure 2's numbers) whatever the
    # torch threads
    assert one["tsne_threads"] == own["tsne_threads"] == (os.cpu_count() or 1)
    assert {k: v for k, v in one.items() if "seconds" not in k and k != "png"} == {
        k: v for k, v in own.items() if "seconds" not in k and k != "png"
    }


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"methods": ("maml",)}, "CompareSettings.methods: must include 'leo'"),
        ({"methods": ("leo", "nope")}, "CompareSettings.methods: unknown method 'nope'"),
        ({"methods": ("leo", "leo")}, "listed twice"),
        ({"num_episodes": 0}, "CompareSettings.num_episodes: must be an int >= 1, got 0"),
        ({"figure_episodes": -1}, "CompareSettings.figure_episodes: must be an int >= 0"),
        ({"train_steps": 2.5}, r"CompareSettings.train_steps: must be an int >= 1 or None"),
        ({"batch_size": True}, "CompareSettings.batch_size"),
        ({"ensemble_samples": (1, 0)}, "CompareSettings.ensemble_samples"),
    ],
)
def test_bad_settings_are_one_line_errors(values, message):
    with pytest.raises(LeoInputError, match=message) as err:
        CompareSettings(**values)
    assert "\n" not in str(err.value)


def test_settings_take_lists():
    settings = CompareSettings(methods=["leo", "maml"], ensemble_samples=[1, 3])
    assert settings.methods == ("leo", "maml") and settings.ensemble_samples == (1, 3)


def test_docstring_documents_every_argument_output_and_the_return():
    doc = inspect.getdoc(compare)
    args = doc.split("Args:")[1].split("Returns:")[0]
    for name in inspect.signature(compare).parameters:
        assert f" {name}:" in args or f" {name}," in args, name
    for section in ("Returns:", "Raises:", "Cost:", "What it trains:"):
        assert section in doc
    for out in ("table.json", "table.md", "ensembles.json", "ensembles.md", "figure2.png"):
        assert out in doc
    assert "figure2.json" in doc and "accuracies.npz" in doc and "best.pt" in doc


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


def test_stage_settings_merge_the_run_s_maml_overrides():
    from stages.compare import compare_settings

    doc = yaml.safe_load((REPO / "params.yaml").read_text())
    doc["compare"]["maml"] = {"inner_steps": 3, "inner_lr": 0.5}
    doc["compare"]["maml_runs"] = {"5shot": {"inner_lr": 0.1}}
    doc["compare"]["num_episodes"] = None
    doc["evaluate"].update(num_episodes=50, batch_size=10, seed=4)
    doc["tune"]["runs"] = {}  # no search: no tuned values to read
    for run in doc["metatrain"]["runs"].values():
        run.pop("from_tune", None)
    params = parse_settings(doc)
    five = compare_settings(params, "5shot")
    assert five.maml == {"inner_steps": 3, "inner_lr": 0.1}
    one = compare_settings(params, "1shot")
    assert one.maml == {"inner_steps": 3, "inner_lr": 0.5}
    assert (one.num_episodes, one.batch_size, one.seed) == (50, 10, 4)  # null: evaluate's
    assert one.figure_episodes == doc["compare"]["figure_episodes"]  # passed explicitly
    assert one.ensemble_episodes == doc["compare"]["ensemble_episodes"]
