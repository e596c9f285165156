"""``docs/own-embeddings.md`` runs as written: its ``python`` blocks, in order, in one
namespace, in a temporary directory, with the sizes of its first block made tiny.

The page's sizes are named constants at the top of its first block (``STEPS = 4000``...);
this test swaps each for a tiny value and fails if one is missing or repeated, so the page
cannot drift from the code without this test failing. Then it checks what the page claims
against independent computations: the stored rows are the array divided by its norms, the
comparison's ``leo`` row is ``leo.evaluate`` on the same episodes, and each method's table
accuracy is the mean of its per-episode accuracies. Skipped without
``$LEO_DATA_DIR/clinc150``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import warnings

import numpy as np
import pytest
import torch
from shared_data import REPO, SHARED_DATA

DOC = REPO / "docs" / "own-embeddings.md"
CLINC = SHARED_DATA / "clinc150"
TINY = {  # the page's sizes -> tiny ones (PER_INTENT >= 1 shot + 15 queries)
    "DIM": "16",
    "PER_INTENT": "20",
    "STEPS": "20",
    "VALIDATE_EVERY": "10",
    "EPISODES": "200",
    "DIAGNOSTIC_EPISODES": "50",
    "COMPARE_STEPS": "10",
}
METHODS = ["leo", "maml", "nearest-mean-cosine", "nearest-mean-euclidean", "logistic-regression"]

pytestmark = pytest.mark.skipif(
    not (CLINC / "data_full.json").is_file(), reason=f"no CLINC150 at {CLINC}"
)


def python_blocks(text: str) -> list[str]:
    """The ```python fenced blocks of a Markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def make_tiny(block: str) -> str:
    """The first block with every constant of :data:`TINY` replaced (each exactly once)."""
    for name, value in TINY.items():
        block, count = re.subn(rf"^{name} = .*$", f"{name} = {value}", block, flags=re.M)
        assert count == 1, f"docs/own-embeddings.md: constant {name} found {count} times"
    return block


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """Run the page once: (namespace, stdout of each block, warnings, working directory)."""
    work = tmp_path_factory.mktemp("own-embeddings")
    blocks = python_blocks(DOC.read_text())
    blocks[0] = make_tiny(blocks[0])
    namespace: dict = {"__name__": "own_embeddings_doc"}
    outputs = []
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mp.setenv("LEO_DATA_DIR", str(SHARED_DATA))
        mp.chdir(work)
        for i, code in enumerate(blocks):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(code, f"{DOC.name}:block{i}", "exec"), namespace)
            outputs.append(out.getvalue())
    return namespace, outputs, [str(w.message) for w in caught], work


def test_page_has_the_walkthrough_blocks():
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 10
    calls = "".join(blocks)
    for api in (
        "write_embeddings",
        "read_embeddings",
        "load_run_config",
        "make_config",
        "meta_train",
        "load_checkpoint",
        "evaluate",
        "CompareSettings",
        "compare(",
    ):
        assert f"leo.{api}" in calls, api


def test_splits_disjoint_and_stored_rows_are_the_normalised_array(ran):
    ns, _, _, work = ran
    splits = {s.split: s for s in (ns["train"], ns["val"], ns["test"])}
    names = [set(s.class_names) for s in splits.values()]
    assert sum(map(len, names)) == len(set().union(*names)) == 150  # disjoint, all intents
    assert {s: splits[s].num_classes for s in splits} == {"train": 90, "val": 30, "test": 30}
    for name, split in splits.items():
        assert split.class_counts().tolist() == [20] * split.num_classes
        raw = np.asarray(ns["embeddings"][name], dtype=np.float32)
        row_of = {eid: i for i, (eid, _, _) in enumerate(ns["rows"][name])}
        order = [row_of[str(e)] for e in split.example_ids]
        expect = raw[order] / np.linalg.norm(raw[order], axis=1, keepdims=True)
        np.testing.assert_allclose(split.embeddings.numpy(), expect, rtol=1e-5, atol=1e-6)
        intents = [ns["rows"][name][i][1] for i in order]
        assert [split.class_names[y] for y in split.labels.tolist()] == intents
        assert split.dim == 16
    prov = splits["test"].provenance
    expect_sha = hashlib.sha256((CLINC / "data_full.json").read_bytes()).hexdigest()
    assert prov["source_sha256"] == expect_sha
    assert prov["domains"] == ["small_talk", "meta"]
    assert json.loads((work / "clinc-leo" / "source.json").read_text())["train_rows"] == 1800


def test_training_resumes_and_refuses_other_config_and_data(ran):
    ns, outputs, _, work = ran
    result = ns["result"]
    assert result.steps == 20 and [r["step"] for r in result.history] == [10, 20]
    assert (work / "clinc-leo" / "leo-1shot" / "best.pt").is_file()
    refuse = next(o for o in outputs if "refused:" in o)
    assert "finished run returned: True 20" in refuse
    lines = [line for line in refuse.splitlines() if line.startswith("refused:")]
    assert len(lines) == 2
    assert "different config" in lines[0] and "other data" in lines[1]


def test_evaluation_and_comparison_agree_on_the_same_episodes(ran):
    ns, _, caught, work = ran
    table, scores = ns["table"], ns["scores"]
    assert list(table["methods"]) == METHODS
    assert len({row["episodes_sha256"] for row in table["methods"].values()}) == 1
    # compare's leo row and evaluate: the same checkpoint, seed and episodes
    assert scores.num_episodes == 200 and scores.queries_per_class == 19
    assert table["methods"]["leo"]["accuracy"] == pytest.approx(scores.mean, abs=1e-12)
    per_episode = np.load(work / "clinc-leo" / "compare" / "1shot" / "accuracies.npz")
    for name, row in table["methods"].items():
        assert row["accuracy"] == pytest.approx(float(per_episode[name].mean()), abs=1e-12)
        diff = per_episode[name] - per_episode["leo"]
        assert row["difference"] == pytest.approx(float(diff.mean()), abs=1e-12)
    # the page's claim: with unit rows and one shot, cosine and Euclidean nearest mean agree
    cosine, euclid = per_episode["nearest-mean-cosine"], per_episode["nearest-mean-euclidean"]
    np.testing.assert_array_equal(cosine, euclid)
    assert table["methods"]["maml"]["num_steps"] == 10
    md = (work / "clinc-leo" / "reports" / "1shot" / "table.md").read_text()
    assert all(f"| {name} |" in md for name in METHODS)
    assert set(ns["gap"]) == {"train", "val", "test"}
    assert not [w for w in caught if "capped" in w]  # eval_per_class_total = class size


def test_five_shots_and_mamls_step_size_by_shots(ran):
    ns, _, _, work = ran
    assert ns["cfg5"].num_shots == 5 and ns["table5"]["num_shots"] == 5
    assert list(ns["table5"]["methods"]) == METHODS
    for shots, inner_lr in (("1shot", 1.0), ("5shot", 0.1)):  # as the page says
        ckpt = work / "clinc-leo" / "compare" / shots / "maml" / "best.pt"
        assert torch.load(ckpt, weights_only=True)["config"]["inner_lr"] == inner_lr


def test_leo_compare_is_the_function_after_the_comparison_package_is_imported():
    """The page calls ``leo.compare(...)`` after ``load_run_config`` imported
    ``leo.comparison``: the function and the subpackage have different names."""
    import leo
    import leo.comparison.methods  # noqa: F401
    from leo.utils.errors import LeoInputError

    with pytest.raises(LeoInputError, match="settings must be CompareSettings"):
        leo.compare("run", None, "not settings", "best.pt", None, None, None, ".", ".")


def test_config_is_the_pipelines_with_the_pages_overrides(ran):
    ns, _, _, _ = ran
    import leo

    cfg = ns["cfg"]
    expect = leo.load_run_config("1shot", params=REPO / "params.yaml")
    changed = {k for k, v in cfg.to_dict().items() if v != getattr(expect, k)}
    assert changed == {"num_steps", "validate_every", "eval_per_class_total"}
    assert (cfg.num_steps, cfg.validate_every, cfg.eval_per_class_total) == (20, 10, 20)
