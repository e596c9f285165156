"""The report: metrics aggregated from known stage outputs, histories read from real DVCLive
logs, PNG plots, the report stage."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from leo.report import (
    HISTORY_COLUMNS,
    PLOTS,
    aggregate,
    plot_histories,
    read_history,
    summary_markdown,
    summary_rows,
)
from leo.utils.errors import LeoInputError
from leo.utils.live import METRICS_DIR, log_rows, open_live

REPO = Path(__file__).resolve().parents[1]
BACKBONE = {"backbone_heldout_accuracy": 0.875, "wall_seconds": 100.0, "epochs": 30}


def metatrain_metrics(shots: int, best: float, seconds: float) -> dict:
    return {
        "num_shots": shots,
        "best_val_accuracy": best,
        "best_step": 200,
        "steps": 300,
        "wall_seconds": seconds,
        "config": {"num_shots": shots},
    }


def eval_metrics(acc: float, ci: float, seconds: float) -> dict:
    return {"accuracy": acc, "ci95": ci, "episodes": 10000, "seconds": seconds, "num_shots": 1}


def history_rows(steps=(100, 200, 300), base=0.5) -> list[dict]:
    return [
        {
            "step": s,
            "train_loss": 1.5 - s / 1000,
            "train_accuracy": base + s / 2000,
            "val_accuracy": base + s / 3000,
            "val_ci95": 0.01,
            "nonfinite_steps": 2 if s == 200 else 0,
            "inner_lr_mean": 1.0 + s / 10000,
            "finetune_lr_mean": 1e-3 * (1 + s / 1000),
        }
        for s in steps
    ]


def write_history(live_dir: Path, rows: list[dict], summary: dict | None = None) -> None:
    """A real DVCLive log of ``rows`` (as the metatrain stage writes it), plus a summary."""
    with open_live(live_dir) as live:
        log_rows(live, rows)
        live.summary.update(summary or {})


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_aggregate_from_known_inputs():
    runs = {
        "1shot": (metatrain_metrics(1, 0.81, 120.0), eval_metrics(0.8, 0.004, 10.0)),
        "5shot": (metatrain_metrics(5, 0.93, 150.0), eval_metrics(0.92, 0.002, 20.0)),
    }
    report = aggregate(BACKBONE, runs)
    assert report == {
        "backbone": {"heldout_accuracy": 0.875, "wall_seconds": 100.0},
        "1shot": {
            "num_shots": 1,
            "best_val_accuracy": 0.81,
            "best_step": 200,
            "steps": 300,
            "test_accuracy": 0.8,
            "test_ci95": 0.004,
            "test_episodes": 10000,
            "metatrain_seconds": 120.0,
            "evaluate_seconds": 10.0,
        },
        "5shot": {
            "num_shots": 5,
            "best_val_accuracy": 0.93,
            "best_step": 200,
            "steps": 300,
            "test_accuracy": 0.92,
            "test_ci95": 0.002,
            "test_episodes": 10000,
            "metatrain_seconds": 150.0,
            "evaluate_seconds": 20.0,
        },
        "wall_seconds": 400.0,
    }
    rows = summary_rows(report)
    assert [r["meta-test accuracy (%)"] for r in rows] == [80.0, 92.0]
    assert [r["95% CI (+-%)"] for r in rows] == [0.4, 0.2]
    text = summary_markdown(report)
    assert "Backbone held-out accuracy: **87.50%**" in text
    assert "| 5shot | 5 | 92.0 | 0.2 | 93.0 | 200 | 170.0 |" in text


def test_aggregate_published_source_and_bad_inputs():
    published = {
        "source": "published",
        "dataset": "miniImageNet",
        "view": "center",
        "feature_dim": 640,
        "train_rows": 38400,
        "wall_seconds": 12.0,
    }
    runs = {"1shot": (metatrain_metrics(1, 0.6, 1.0), eval_metrics(0.61, 0.01, 2.0))}
    report = aggregate(published, runs)
    assert report["published"]["dataset"] == "miniImageNet" and "backbone" not in report
    assert report["wall_seconds"] == 15.0
    with pytest.raises(LeoInputError, match="neither backbone metrics"):
        aggregate({"wall_seconds": 1.0}, runs)
    broken = {"1shot": (metatrain_metrics(1, 0.6, 1.0), {"accuracy": "high"})}
    with pytest.raises(LeoInputError, match=r"reports/evaluate/1shot/metrics.json.*'accuracy'"):
        aggregate(BACKBONE, broken)
    clash = {"backbone": runs["1shot"]}
    with pytest.raises(LeoInputError, match="clashes"):
        aggregate(BACKBONE, clash)


def test_aggregate_own_embeddings_described_by_their_source():
    runs = {"1shot": (metatrain_metrics(1, 0.6, 1.0), eval_metrics(0.61, 0.01, 2.0))}
    own = {"source": "tf-idf + svd", "dataset": "clinc150", "feature_dim": 128, "extra": 1}
    report = aggregate(own, runs)
    assert report["embeddings"] == {
        "source": "tf-idf + svd",
        "dataset": "clinc150",
        "feature_dim": 128,
        "wall_seconds": 0.0,
    }
    assert report["wall_seconds"] == 3.0  # no cost given for the embeddings: 0
    assert "Own embeddings: tf-idf + svd (clinc150, 128-d)." in summary_markdown(report)
    with pytest.raises(LeoInputError, match="own embeddings"):
        aggregate({"source": ""}, runs)


def test_read_history_from_a_dvclive_log_and_bad_logs(tmp_path):
    rows = history_rows()
    rows[1]["val_ci95"] = float("nan")  # DVCLive writes it as text; it reads back as NaN
    write_history(tmp_path / "log", rows)
    back = read_history(tmp_path / "log")
    assert [r["step"] for r in back] == [100.0, 200.0, 300.0]
    assert back[0] == {k: float(v) for k, v in rows[0].items()}
    assert back[1]["val_ci95"] != back[1]["val_ci95"]  # NaN
    assert sorted(p.stem for p in (tmp_path / "log" / METRICS_DIR).iterdir()) == sorted(
        HISTORY_COLUMNS
    )
    (tmp_path / "log" / METRICS_DIR / "val_accuracy.tsv").unlink()
    with pytest.raises(LeoInputError, match=r"val_accuracy.tsv: not found"):
        read_history(tmp_path / "log")
    (tmp_path / "log" / METRICS_DIR / "val_accuracy.tsv").write_text("step\tval_accuracy\n1\tx\n")
    with pytest.raises(LeoInputError, match=r"val_accuracy.tsv: a non-numeric value"):
        read_history(tmp_path / "log")
    (tmp_path / "log" / METRICS_DIR / "val_accuracy.tsv").write_text("step\tloss\n1\t2\n")
    with pytest.raises(LeoInputError, match=r"val_accuracy.tsv: expected the columns"):
        read_history(tmp_path / "log")


def test_plots_are_pngs_of_the_expected_size(tmp_path):
    histories = {"1shot": history_rows(), "5shot": history_rows(base=0.7)}
    paths = plot_histories(histories, tmp_path, dpi=50, title="LEO on test")
    assert [p.name for p in paths] == list(PLOTS)
    sizes = {p.name: png_size(p) for p in paths}
    assert sizes == {
        "loss.png": (350, 225),
        "accuracy.png": (350, 225),
        "step_sizes.png": (500, 200),
    }
    for p in paths:
        assert p.stat().st_size > 5000  # drawn, not blank
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(PLOTS)  # no temporaries left


def stage_project(root: Path) -> None:
    """A directory with the stage outputs the report reads, from known values."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["metatrain"]["runs"] = {"1shot": {"num_shots": 1}, "5shot": {"num_shots": 5}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    reports = root / "reports"
    (reports / "pretrain").mkdir(parents=True)
    (reports / "pretrain/metrics.json").write_text(json.dumps(BACKBONE))
    for run, shots, acc in (("1shot", 1, 0.7), ("5shot", 5, 0.9)):
        (reports / "evaluate" / run).mkdir(parents=True)
        (reports / "evaluate" / run / "metrics.json").write_text(
            json.dumps(eval_metrics(acc, 0.003, 5.0))
        )
        write_history(
            reports / "metatrain" / run,
            history_rows(base=acc - 0.2),
            metatrain_metrics(shots, acc, 60.0),
        )


def report_stage(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stages.report"],
        cwd=cwd,
        env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_report_stage_writes_metrics_and_plots(tmp_path):
    stage_project(tmp_path)
    done = report_stage(tmp_path)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    assert metrics["1shot"]["test_accuracy"] == 0.7 and metrics["5shot"]["test_accuracy"] == 0.9
    assert metrics["wall_seconds"] == 100.0 + 2 * 65.0
    assert "| 1shot | 1 | 70.0 | 0.3 |" in done.stdout
    dpi = yaml.safe_load((REPO / "params.yaml").read_text())["report"]["dpi"]
    assert png_size(tmp_path / "reports/plots/accuracy.png") == (7 * dpi, int(4.5 * dpi))


def test_report_stage_bad_key_and_missing_input_fail_in_one_line(tmp_path):
    stage_project(tmp_path)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["report"]["dpii"] = 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = report_stage(tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("error: params.yaml") and "report.dpii" in done.stderr
    assert done.stderr.count("\n") == 1
    assert not (tmp_path / "reports/metrics.json").exists()
    assert not (tmp_path / "reports/plots").exists()

    del params["report"]["dpii"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "reports/evaluate/5shot/metrics.json").unlink()
    done = report_stage(tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("error: reports/evaluate/5shot/metrics.json: not found")
    assert done.stderr.count("\n") == 1
    assert not (tmp_path / "reports/metrics.json").exists()
