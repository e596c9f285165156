"""params.yaml validated in one place: every section, every derived config, one-line errors."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
from shared_data import REPO

import leo
from leo.settings import load_settings, parse_settings, read_yaml
from leo.utils.errors import LeoInputError

PARAMS = read_yaml(REPO / "params.yaml")
SHA = "a" * 64


def with_value(dotted: str, value, *, delete: bool = False) -> dict:
    """The repository's params with one dotted key set (or deleted)."""
    doc = copy.deepcopy(PARAMS)
    *parents, leaf = dotted.split(".")
    node = doc
    for part in parents:
        node = node[part]
    if delete:
        del node[leaf]
    else:
        node[leaf] = value
    return doc


def refused(doc: dict) -> str:
    with pytest.raises(LeoInputError) as err:
        parse_settings(doc)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_the_repository_params_are_valid_and_build_every_run():
    settings = load_settings(REPO / "params.yaml")
    cfg = settings.run_config("1shot")
    assert (cfg.num_shots, cfg.num_steps, cfg.finetune_lr_init) == (1, 4000, 1.0)
    assert settings.run_config("5shot").num_shots == 5
    assert settings.pretrain_config().depth == PARAMS["pretrain"]["omniglot"]["depth"]
    assert settings.maml_overrides("5shot") == {"inner_lr": 0.1}


def test_a_run_merges_its_preset_then_common_then_its_own_keys():
    doc = with_value("metatrain.runs.1shot", {"preset": "mini-5shot", "num_shots": 1})
    doc["metatrain"]["common"]["outer_lr"] = 2.0e-3
    cfg = parse_settings(doc).run_config("1shot")
    assert cfg.num_shots == 1  # the run's own key wins over the preset
    assert cfg.outer_lr == 2.0e-3  # common wins over the preset
    assert cfg.kl_weight == pytest.approx(0.466387)  # the preset's
    assert cfg.seed == PARAMS["base"]["seed"]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("metatrain.common.num_steps", 0, "metatrain.common.num_steps: must be greater than"),
        ("metatrain.common.num_steps", -5, "metatrain.common.num_steps: must be greater than"),
        ("metatrain.common.validate_every", 0, "metatrain.common.validate_every: must be"),
        ("metatrain.common.validate_every", -100, "metatrain.common.validate_every: must be"),
        ("metatrain.common.val_batches", 0, "metatrain.common.val_batches: must be greater"),
        ("metatrain.common.val_batch_size", 0, "metatrain.common.val_batch_size: must be"),
        ("metatrain.common.num_stepz", 7, "metatrain.common.num_stepz: unknown key"),
        ("metatrain.common.outer_lr", "1e-4", "metatrain.common.outer_lr: must be a valid number"),
        ("metatrain.common.compile", 1, "metatrain.common.compile: must be a valid boolean"),
        ("metatrain.runs.1shot.num_shots", 1.5, "metatrain.runs.1shot.num_shots: must be a valid"),
        ("metatrain.runs.1shot.dropout", 1.0, "metatrain.runs.1shot.dropout: must be less than 1"),
        ("metatrain.runs.1shot.preset", "huge", "metatrain.runs.1shot.preset: must be one of"),
        ("metatrain.runs.1shot.form", "magic", "metatrain.runs.1shot.form: must be 'fast' or"),
        ("metatrain.device", "gpu", "metatrain.device: must be auto, cpu, cuda or cuda:<index>"),
        ("metatrain.extra", 1, "metatrain.extra: unknown key"),
        ("pretrain.omniglot.epoch", 1, "pretrain.omniglot.epoch: unknown key"),
        ("pretrain.omniglot.depth", 12, "pretrain.omniglot: depth must be 6n + 4"),
        ("pretrain.omniglot.schedule", "linear", "pretrain.omniglot.schedule: must be"),
        ("pretrain.omniglot.strides", [2, 2], "pretrain.omniglot.strides: list should have"),
        ("pretrain.miniImageNet.lr", -0.1, "pretrain.miniImageNet.lr: must be greater than 0"),
        ("pretrain.heldout_fraction", 1.0, "pretrain.heldout_fraction: must be less than 1"),
        ("pretrain.device", "tpu", "pretrain.device: must be auto, cpu, cuda"),
        ("embed.device", "cuda:x", "embed.device: must be auto, cpu, cuda"),
        ("embed.batch_size", 0, "embed.batch_size: must be greater than or equal to 1"),
        ("embed.processes", 0, "embed.processes: must be greater than or equal to 1"),
        ("pretrain.processes_per_node", 0, "pretrain.processes_per_node: must be greater than"),
        ("pretrain.nodes", "2", "pretrain.nodes: must be a valid integer"),
        ("pretrain.sync_batchnorm", "yes", "pretrain.sync_batchnorm: must be a valid boolean"),
        ("pretrain.rdzv_endpoint", "gpu-0 29500", "pretrain.rdzv_endpoint: string should match"),
        ("pretrain.rdzv_endpoint", "gpu-0:99999", "pretrain.rdzv_endpoint: port must be in 1-65"),
        ("pretrain.rdzv_timeout_s", 0, "pretrain.rdzv_timeout_s: must be greater than 0"),
        ("evaluate.num_episodes", 0, "evaluate.num_episodes: must be greater than"),
        ("evaluate.episodes", 3, "evaluate.episodes: unknown key"),
        ("evaluate.seed", "1", "evaluate.seed: must be a valid integer"),
        ("report.dpi", 10, "report.dpi: must be greater than or equal to 30"),
        ("base.dataset", "cifar", "base.dataset: must be 'omniglot', 'miniImageNet', "),
        ("base.cpu_threads", True, "base.cpu_threads: must be a valid integer"),
        ("download.timeout_s", 0, "download.timeout_s: must be greater than 0"),
        ("download.omniglot.files", [{"name": "a/b.zip", "sha256": SHA}], "files[0].name: must"),
        ("download.omniglot.files", [{"name": "a.zip", "sha256": "abc"}], "files[0].sha256: "),
        ("download.omniglot.files", [{"name": "a", "url": "ftp://x"}], "files[0].url: string"),
        ("download.omniglot.files", [{"name": "a", "mirror": "x"}], "files[0].mirror: unknown"),
        ("download.omniglot.files", ["a.zip"], "download.omniglot.files[0]: must be a valid"),
        ("prepare.omniglot.channels", 2, "prepare.omniglot.channels: must be 1 or 3"),
        ("prepare.omniglot.image_size", [28], "prepare.omniglot.image_size: "),
        ("compare.methods", ["leo", "foo"], "compare.methods[1]: unknown method 'foo'"),
        ("compare.methods", ["maml"], "compare.methods: must include 'leo'"),
        ("compare.methods", ["leo", "leo"], "compare.methods[1]: 'leo' is listed twice"),
        ("compare.maml_runs", {"7shot": {}}, "compare.maml_runs.7shot: not a run"),
        ("compare.maml", {"inner_lr": -1.0}, "compare.maml.inner_lr: must be greater than"),
        ("compare.maml", {"inner_lrr": 1.0}, "compare.maml.inner_lrr: unknown key"),
        ("compare.figure_episodes", -1, "compare.figure_episodes: must be greater than"),
        ("embeddings.dir", "data/published/x", "embeddings.dir: data/published/x names no"),
        ("metatrain.runs", {}, "metatrain.runs: dictionary should have at least 1 item"),
        (
            "tune.runs",
            {"1shot": {"population": 1, "steps": 8, "perturbation_interval": 4}},
            "tune.runs.1shot.population: must be greater than or equal to 2 (got 1)",
        ),
        (
            "tune.runs",
            {"1shot": {"population": 4, "steps": 8, "perturbation_interval": 9}},
            "tune.runs.1shot: perturbation_interval: must be at most steps (8), got 9",
        ),
        (
            "tune.runs",
            {"7shot": {"population": 2, "steps": 8, "perturbation_interval": 4}},
            "tune.runs.7shot: not a run of metatrain.runs",
        ),
        (
            "tune.space",
            {"dropout": {"low": 0.6, "high": 0.2}},
            "tune.space.dropout: empty or inverted range (low 0.6 >= high 0.2)",
        ),
        ("tune.space", {"dropout": {"low": 0.2, "high": 0.2}}, "tune.space.dropout: empty or"),
        (
            "tune.space",
            {"dropout": {"low": 0.1, "high": 1.2}},
            "tune.space.dropout.high: must be less than 1 (got 1.2)",
        ),
        ("tune.space", {"lr": {"low": 0.1, "high": 0.2}}, "tune.space.lr: unknown hyperparameter"),
        (
            "tune.space",
            {"kl_weight": {"low": 0, "high": 1, "log": True}},
            "tune.space.kl_weight: low: must be > 0 for a log range (got 0)",
        ),
        ("tune.space", {"inner_steps": {"choices": []}}, "tune.space.inner_steps: choices: empty"),
        ("tune.space", {"inner_steps": {"low": 1, "high": 3}}, "an integer hyperparameter takes"),
        ("tune.cpus_per_trial", 0, "tune.cpus_per_trial: must be greater than 0 (got 0)"),
        ("tune.gpus_per_trial", -0.5, "tune.gpus_per_trial: must be greater than or equal to 0"),
        ("tune.address", 5, "tune.address: must be a valid string (got 5)"),
        ("metatrain.runs.1shot.from_tune", "yes", "metatrain.runs.1shot.from_tune: must be true"),
        (
            "metatrain.runs.5shot.from_tune",
            True,
            "metatrain.runs.5shot.from_tune: no tune.runs.5shot to take the values from",
        ),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key(key, value, message):
    assert message in refused(with_value(key, value))


def test_a_missing_section_or_key_is_named():
    assert "params.yaml: compare: missing key" in refused(with_value("compare", None, delete=True))
    doc = with_value("published.imports", {"x": {"root": "/a", "dataset": "miniImageNet"}})
    assert "published.imports.x.sha256: missing key" in refused(doc)
    doc = with_value(
        "published.imports",
        {"x": {"root": "/a", "dataset": "miniImageNet", "sha256": {"train": SHA}}},
    )
    assert "published.imports.x: sha256.val: missing key" in refused(doc)


def test_published_imports_are_checked_field_by_field():
    sha = {"train": SHA, "val": SHA, "test": SHA}
    good = {"root": "/x", "dataset": "miniImageNet", "view": "center", "sha256": sha}
    settings = parse_settings(with_value("published.imports", {"mini": good}))
    assert settings.published.imports["mini"].sha256["test"] == SHA
    bad = {**good, "sha256": {**sha, "test": "C" * 64}}
    message = refused(with_value("published.imports", {"mini": bad}))
    assert "published.imports.mini.sha256.test: must be 64 lower-case hex digits" in message
    tiered = {**good, "dataset": "tieredImageNet", "view": "multiview"}
    assert "tieredImageNet has only 'center'" in refused(
        with_value("published.imports", {"t": tiered})
    )


def test_yaml_numbers_are_read_as_dvc_reads_them(tmp_path):
    text = (REPO / "params.yaml").read_text().replace("outer_lr: 1.0e-3", "outer_lr: 1e-3")
    assert "outer_lr: 1e-3" in text
    (tmp_path / "params.yaml").write_text(text)
    assert load_settings(tmp_path / "params.yaml").run_config("1shot").outer_lr == 1e-3


def test_unreadable_files_are_one_line(tmp_path):
    with pytest.raises(LeoInputError, match=r"params file not found"):
        load_settings(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("base: [1, 2\n")
    with pytest.raises(LeoInputError, match=r"bad\.yaml: not valid YAML"):
        load_settings(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(LeoInputError, match=r"expected a mapping at the top level"):
        load_settings(tmp_path / "list.yaml")


def test_load_run_config_is_the_pipeline_s_config_with_overrides():
    cfg = leo.load_run_config("5shot", REPO / "params.yaml", num_steps=50)
    assert (cfg.num_shots, cfg.num_steps, cfg.outer_lr) == (5, 50, 1.0e-3)
    with pytest.raises(LeoInputError, match=r"no run 'metatrain\.runs\.9shot'"):
        leo.load_run_config("9shot", REPO / "params.yaml")
    with pytest.raises(LeoInputError, match=r"LEO config: num_steps: must be greater"):
        leo.load_run_config("1shot", REPO / "params.yaml", num_steps=0)


@pytest.mark.parametrize("stage", ["check", "download", "metatrain 1shot", "tune 1shot", "report"])
def test_every_stage_refuses_bad_params_before_doing_anything(tmp_path, stage):
    text = (REPO / "params.yaml").read_text().replace("device: auto", "device: gpu", 1)
    (tmp_path / "params.yaml").write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", *f"stages.{stage}".split()],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: params.yaml: pretrain.device: must be auto, cpu, cuda or cuda:<index> (got 'gpu')"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
