"""bench/gpu_check.sh in its short CPU mode: one JSON object with every section measured."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from pipeline_helpers import OMNIGLOT, REPO, SHARED


@pytest.mark.skipif(not OMNIGLOT.is_file(), reason="real Omniglot data not available")
def test_gpu_check_short_mode_prints_one_json_object_with_every_section():
    env = {**os.environ, "LEO_DATA_DIR": str(SHARED), "PYTHON": str(REPO / ".venv/bin/python")}
    if not (REPO / ".venv/bin/python").exists():
        env.pop("PYTHON")
    done = subprocess.run(
        [str(REPO / "bench/gpu_check.sh"), "--short", "--device", "cpu"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)  # the whole of stdout is one JSON object
    assert out["mode"] == "short" and out["device"] == "cpu"
    assert out["errors"] == {} and out["skipped"] == {}, (out["errors"], out["skipped"])
    steps = out["leo"]["steps_per_s"]
    assert sorted(steps) == ["mini-1shot", "mini-5shot", "tiered-1shot", "tiered-5shot"]
    assert all(v["eager"]["steps_per_s"] > 0 for v in steps.values())
    assert out["leo"]["target_met"] is None  # the target is for 640-d on a GPU
    assert out["evaluate"]["seconds"] > 0 and out["evaluate"]["episodes"] == 200
    assert out["pretrain"]["images_per_s"] > 0 and out["embed"]["images_per_s"] > 0
    assert list(out["dag"]["stage_seconds"]) == ["check"] and out["dag"]["device"] == "cpu"
    assert out["wall_s"] < 240
