"""Population-based training without a Ray cluster: the search space, the exact copy of a
trial's state, the lineage and best trial, the stage's files and its refusals of bad input.

(A real search on a two-node Ray cluster: ``tests/test_tune_ray.py``.)
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from shared_data import REPO

from leo.core.config import make_config
from leo.data.synthetic import synthetic_split
from leo.meta.loop import STATE_FILE
from leo.settings import parse_settings, read_yaml
from leo.tune.lineage import segments, summarize
from leo.tune.space import STEP_SIZE_INITS, clamp, initial_population, make_space
from leo.tune.trial import TrialSetup, restore, write_checkpoint
from leo.tune.trial import segments as trial_segments
from leo.utils.errors import LeoInputError

PARAMS = read_yaml(REPO / "params.yaml")


def _base(**kw):
    values = dict(
        latent_dim=8,
        val_batches=1,
        val_batch_size=20,
        batch_size=4,
        compile=False,
        eval_per_class_total=None,
        outer_lr=1e-3,
    )
    return make_config("default", **{**values, **kw})


SPACE = {
    "outer_lr": {"low": 1e-4, "high": 1e-2, "log": True},
    "dropout": {"low": 0.0, "high": 0.6},
    "finetune_lr_init": {"low": 1e-3, "high": 3.0, "log": True},
    "inner_steps": {"choices": [1, 3, 5]},
}


# ----------------------------------------------------------------------------- space
@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"learning_rate": {"low": 1, "high": 2}}, "s.learning_rate: unknown hyperparameter"),
        ({"dropout": {"low": 0.5, "high": 0.2}}, "s.dropout: empty or inverted range"),
        ({"dropout": {"low": 0.3, "high": 0.3}}, "s.dropout: empty or inverted range"),
        ({"kl_weight": {"low": 0.0, "high": 1.0, "log": True}}, "s.kl_weight.low: must be > 0"),
        ({"dropout": {"low": 0.1, "high": 1.0}}, "s.dropout.high: must be less than 1"),
        ({"outer_lr": {"low": -1.0, "high": 1.0}}, "s.outer_lr.low: must be greater than 0"),
        ({"inner_steps": {"low": 1, "high": 5}}, "s.inner_steps: an integer hyperparameter"),
        ({"inner_steps": {"choices": []}}, "s.inner_steps.choices: empty"),
        ({"inner_steps": {"choices": [3, 3]}}, "s.inner_steps.choices[1]: 3 is listed twice"),
        ({"inner_steps": {"choices": [3, 2.5]}}, "s.inner_steps.choices[1]: must be a valid"),
        ({"dropout": {"low": 0.1}}, "s.dropout: needs low and high"),
        ({"inner_lr_init": {"low": 0.0, "high": 1.0}}, "s.inner_lr_init.low: a step-size init"),
    ],
)
def test_tune_space_refuses_bad_dimensions_in_one_line(entries, message):
    with pytest.raises(LeoInputError) as err:
        make_space(entries, _base(), "params.yaml", "s")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("params.yaml: s.")


def test_tune_population_starts_from_the_run_s_values_then_seeded_draws():
    base = _base(outer_lr=0.5, dropout=0.5, finetune_lr_init=1.0, inner_steps=4)
    space = make_space(SPACE, base, "t", "s")
    first = initial_population(space, base, 64, seed=7)
    assert first == initial_population(space, base, 64, seed=7)  # seeded
    assert first != initial_population(space, base, 64, seed=8)
    # member 0: the run's own values, clamped into the space (nearest choice for an int)
    assert first[0] == {"outer_lr": 1e-2, "dropout": 0.5, "finetune_lr_init": 1.0, "inner_steps": 3}
    draws = first[1:]
    assert all(1e-4 <= d["outer_lr"] <= 1e-2 and 0.0 <= d["dropout"] <= 0.6 for d in draws)
    assert {d["inner_steps"] for d in draws} == {1, 3, 5}
    # log-uniform: the median of log(outer_lr) sits near the middle of the log range
    logs = sorted(math.log10(d["outer_lr"]) for d in draws)
    assert -3.6 < logs[len(logs) // 2] < -2.4
    # explore's perturbation is clamped back into the space
    assert clamp(space, {"outer_lr": 0.02, "dropout": -0.1, "inner_steps": 4, "seed": 9}) == {
        "outer_lr": 1e-2,
        "dropout": 0.0,
        "inner_steps": 3,
        "seed": 9,
    }


def test_the_repository_search_space_holds_the_published_and_hand_found_values():
    settings = parse_settings(PARAMS)
    space = settings.tune_space("1shot")

    for preset in ("mini-1shot", "mini-5shot", "tiered-1shot", "tiered-5shot", "default"):
        cfg = make_config(preset)
        for name, dim in space.items():
            value = getattr(cfg, name)
            assert dim.clamp(value) == value, (preset, name, value, dim.describe())
    assert space["finetune_lr_init"].clamp(1.0) == 1.0  # the hand-found init
    assert settings.tune.runs["1shot"].population >= 2


# ----------------------------------------------------------------------------- exact copy
def _state(path):
    return torch.load(path / STATE_FILE, weights_only=True)


def _assert_same_state(a, b, skip=()):
    for name in a["params"]:
        if name not in skip:
            assert torch.equal(a["params"][name], b["params"][name]), name
    for key in ("m", "v"):
        for name in a["adam"][key]:
            assert torch.equal(a["adam"][key][name], b["adam"][key][name]), (key, name)
    assert a["adam"]["step"] == b["adam"]["step"] and a["step"] == b["step"]
    for ga, gb in zip(a["generators"], b["generators"], strict=True):
        assert torch.equal(ga, gb)


@pytest.fixture(scope="module")
def source(tmp_path_factory, one_thread):
    """Trial A trained one interval (10 steps), its checkpoint, then on to step 20."""
    root = tmp_path_factory.mktemp("copy")
    kw = dict(per_class=20, dim=24, noise=0.2)
    setup = TrialSetup(
        base=_base(num_steps=20, validate_every=10).to_dict(),
        space=make_space(SPACE, _base(), "t", "s"),
        device="cpu",
        cpu_threads=1,
        train=synthetic_split(20, split="train", seed=1, **kw),
        val=synthetic_split(8, split="val", seed=2, **kw),
    )
    hp = {"outer_lr": 3e-3, "dropout": 0.3, "finetune_lr_init": 0.1, "inner_steps": 3}
    work = root / "a"
    rows = trial_segments(setup, hp, work, 0)
    first = next(rows)
    ckpt = write_checkpoint(work, root / "ckpt", "trial_a", int(first["step"]), hp)
    last = next(rows)
    return dict(root=root, setup=setup, hp=hp, ckpt=ckpt, rows=[first, last], a=work)


def test_a_copied_trial_continues_bit_identically_to_its_source(source):
    setup, hp = source["setup"], source["hp"]
    work = source["root"] / "b"
    step, event = restore(source["ckpt"], work, "trial_b", setup, dict(hp))
    assert step == 10 and event == {"source": "trial_a", "source_step": 10, "changed": {}}
    rows = list(trial_segments(setup, dict(hp), work, step))
    assert rows == [source["rows"][1]]  # the same validation, the same losses
    _assert_same_state(_state(source["a"]), _state(work))
    assert _state(source["a"])["history"] == _state(work)["history"]


def test_a_copy_with_a_new_step_size_init_rescales_the_learned_step_sizes_exactly(source):
    setup, hp = source["setup"], source["hp"]
    new = {**hp, "finetune_lr_init": 0.25, "dropout": 0.1}
    work = source["root"] / "c"
    step, event = restore(source["ckpt"], work, "trial_c", setup, new)
    assert event["changed"] == {"finetune_lr_init": [0.1, 0.25], "dropout": [0.3, 0.1]}
    copied = torch.load(source["ckpt"] / STATE_FILE, weights_only=True)
    adopted = _state(work)
    _assert_same_state(copied, adopted, skip=("finetune_lr",))
    expected = copied["params"]["finetune_lr"] * (0.25 / 0.1)
    assert torch.equal(adopted["params"]["finetune_lr"], expected)
    assert adopted["params"]["finetune_lr"].mean().item() == pytest.approx(
        copied["params"]["finetune_lr"].mean().item() * 2.5, rel=1e-6
    )
    assert adopted["config"]["finetune_lr_init"] == 0.25 and adopted["config"]["dropout"] == 0.1
    assert set(STEP_SIZE_INITS) == {"inner_lr_init", "finetune_lr_init"}
    # it then trains on under the new config (the loop accepts the rewritten state)
    rows = list(trial_segments(setup, new, work, step))
    assert [r["step"] for r in rows] == [20] and rows[0] != source["rows"][1]


def test_restoring_its_own_checkpoint_resumes_without_an_exploit(source):
    work = source["root"] / "own"
    step, event = restore(source["ckpt"], work, "trial_a", source["setup"], dict(source["hp"]))
    assert (step, event) == (10, None)
    assert list(trial_segments(source["setup"], dict(source["hp"]), work, step)) == [
        source["rows"][1]
    ]


# ----------------------------------------------------------------------------- lineage
def _row(trial, step, acc, hp, exploit=None):
    return {
        "trial": trial,
        "step": step,
        "val_accuracy": acc,
        "val_ci95": 0.01,
        "hyperparameters": hp,
        "node": "n",
        "exploit": exploit,
    }


def test_pbt_lineage_histories_and_best_from_reported_results():
    a, b = {"outer_lr": 1e-3}, {"outer_lr": 1e-4}
    results = [
        _row("t0", 10, 0.5, a),
        _row("t1", 10, 0.4, b),
        _row("t0", 20, 0.6, a),
        # t1, at step 10, copies t0's state at step 10 (asynchronous PBT) and perturbs
        _row(
            "t1",
            20,
            0.55,
            {"outer_lr": 1.2e-3},
            {"source": "t0", "source_step": 10, "changed": {"outer_lr": [1e-3, 1.2e-3]}},
        ),
        _row("t1", 20, 0.55, {"outer_lr": 1.2e-3}),  # reported again after a restart
        _row("t0", 30, 0.6, a),
        _row("t1", 30, 0.6, {"outer_lr": 1.2e-3}),
    ]
    summary = summarize(results)
    assert [r["step"] for r in summary.histories["t1"]] == [10, 20, 30]
    assert summary.lineage == [
        {
            "trial": "t1",
            "step": 10,
            "reached": 10,
            "source": "t0",
            "changed": {"outer_lr": [1e-3, 1.2e-3]},
        }
    ]
    assert summary.best["trial"] == "t0" and summary.best["step"] == 30  # a tie: lowest
    assert summary.initial == {"t0": a, "t1": b}
    cut = segments(summary, "t1")
    assert [
        (s and (s["step"], s["val_accuracy"]), [r["step"] for r in rows]) for s, rows in cut
    ] == [
        (None, [10]),
        ((10, 0.5), [20, 30]),
    ]


# ----------------------------------------------------------------------------- stage
def _stage(tmp_path, params: dict, *args, env=None):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return subprocess.run(
        [sys.executable, "-m", "stages.tune", *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_tune_stage_refuses_an_unreachable_ray_address_in_one_line(tmp_path):
    params = json.loads(json.dumps(PARAMS))
    params["tune"]["address"] = "127.0.0.1:9"
    (tmp_path / "emb").mkdir()
    from leo.data.store import write_embeddings

    for split in ("train", "val"):
        s = synthetic_split(6, per_class=6, dim=8, split=split, seed=len(split))
        write_embeddings(
            tmp_path / "emb" / f"{split}.parquet",
            split=split,
            class_names=[s.class_names[int(c)] for c in s.labels],
            example_ids=s.example_ids,
            embeddings=s.embeddings.numpy(),
            provenance=s.provenance,
        )
    done = _stage(tmp_path, params, "1shot", "--embeddings", "emb")
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "error: params.yaml: tune.address '127.0.0.1:9': no Ray cluster reachable "
        "(Connection refused)"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb", "params.yaml"]


def test_a_run_without_a_search_gets_an_empty_result_at_once(tmp_path, monkeypatch):
    from pathlib import Path

    from stages import tune

    monkeypatch.chdir(tmp_path)
    assert tune.run("5shot", parse_settings(PARAMS), Path("missing")) == {
        "run": "5shot",
        "searched": False,
    }
    assert yaml.safe_load((tmp_path / "data/tune/5shot/best.yaml").read_text()) == {}
    metrics = json.loads((tmp_path / "reports/tune/5shot/metrics.json").read_text())
    assert metrics == {"run": "5shot", "searched": False}


def test_an_unreachable_ray_address_from_the_environment_is_named(monkeypatch):
    import ray

    from leo.tune.search import connect

    assert not ray.is_initialized()
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    with pytest.raises(LeoInputError) as err, connect(None, "params.yaml: tune"):
        pass
    assert (
        str(err.value) == "RAY_ADDRESS '127.0.0.1:9': no Ray cluster reachable (Connection refused)"
    )
    with pytest.raises(LeoInputError, match=r"tune.address 'nowhere': not a Ray address"):
        with connect("nowhere", "tune"):
            pass
    assert not ray.is_initialized()


def test_the_flow_s_population_parameter_sets_every_search(tmp_path):
    from pipeline.flow import param_updates, prepare_params

    assert param_updates(PARAMS, population=8) == {"tune.runs.1shot.population": 8}
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    _, text, changed = prepare_params(tmp_path, param_updates(PARAMS, population=8))
    assert changed == {"tune.runs.1shot.population": (4, 8)}
    assert "1shot: {population: 8, steps: 600, perturbation_interval: 150}" in text
    with pytest.raises(LeoInputError, match=r"tune.runs.1shot.population: must be greater"):
        prepare_params(tmp_path, param_updates(PARAMS, population=1))
    with pytest.raises(ValueError, match="no tune.runs"):
        param_updates({**PARAMS, "tune": {"runs": {}}}, population=4)


def test_compare_trains_leo_pbt_only_for_a_searched_run_not_trained_from_tune(
    tmp_path, monkeypatch
):
    from stages.compare import compare_settings

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data/tune/1shot").mkdir(parents=True)
    (tmp_path / "data/tune/1shot/best.yaml").write_text("dropout: 0.25\nfinetune_steps: 8\n")
    params = parse_settings(PARAMS)
    one, five = compare_settings(params, "1shot"), compare_settings(params, "5shot")
    assert "leo-pbt" in one.methods and one.tuned == {"dropout": 0.25, "finetune_steps": 8}
    assert "leo-pbt" not in five.methods and five.tuned == {}  # no search for 5shot
    doc = json.loads(json.dumps(PARAMS))
    doc["metatrain"]["runs"]["1shot"]["from_tune"] = True  # leo is the tuned LEO then
    assert "leo-pbt" not in compare_settings(parse_settings(doc), "1shot").methods
