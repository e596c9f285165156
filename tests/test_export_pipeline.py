"""The exported bundle of a tiny real pipeline (``dvc repro export@1shot`` in a temp git repo):
its provenance, ``dvc artifacts get``, the same predictions as the pipeline's evaluation on the
same episode (from the raw PNGs), held-out Omniglot alphabets classified far above chance, and
``leo classify`` agreeing with the API."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_helpers import ALPHABETS, BIN, OMNIGLOT, dvc, git, make_project, set_param

from leo.classify.classifier import FewShotClassifier
from leo.data.store import read_embeddings
from leo.meta.episodes import EpisodeSampler
from leo.meta.evaluate import leo_classifier
from leo.meta.train import load_checkpoint
from leo.utils.hashing import json_sha256, tree_sha256

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not OMNIGLOT.is_file(), reason="real Omniglot data not available"),
]
HELD_OUT = ("Latin", "Greek")  # alphabets of images_background_small1.zip not in the project


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict:
    """The tiny project with 20 characters per alphabet and a backbone trained long enough to
    be better than chance (about 45 s of real DVC stages on 2 CPU cores)."""
    project, env = make_project(tmp_path_factory.mktemp("export"))
    zpath = project.parent / "shared" / "omniglot" / "tiny.zip"
    keep = set(ALPHABETS.values())
    with zipfile.ZipFile(OMNIGLOT) as src, zipfile.ZipFile(zpath, "w") as dst:
        for name in src.namelist():
            parts = name.split("/")
            if len(parts) == 4 and parts[1] in keep and parts[2] <= "character20":
                dst.writestr(name, src.read(name))
    sha = hashlib.sha256(zpath.read_bytes()).hexdigest()
    set_param(project, "download.omniglot.files", [{"name": "tiny.zip", "sha256": sha}])
    set_param(project, "pretrain.omniglot.epochs", 10)
    set_param(project, "pretrain.omniglot.width", 2)
    set_param(project, "metatrain.common.num_steps", 50)
    set_param(project, "metatrain.common.validate_every", 25)
    set_param(project, "metatrain.common.finetune_lr_init", 1.0)
    git("commit", "-qam", "bigger tiny data", cwd=project, env=env)
    commit = git("rev-parse", "HEAD", cwd=project, env=env).stdout.strip()
    out = dvc("repro", "export@1shot", cwd=project, env=env, timeout=900).stdout
    return {"path": project, "env": env, "commit": commit, "zip": zpath, "out": out}


def bundle_info(project) -> dict:
    return json.loads((project["path"] / "data/export/1shot/bundle.json").read_text())


def test_bundle_provenance_names_its_sources(project):
    p = project["path"]
    info = bundle_info(project)
    prov = info["provenance"]
    assert "Running stage 'export@1shot'" in project["out"]
    assert info["format"] == "leo-few-shot-classifier" and info["version"] == 1
    assert (
        info["preprocessing"]["image_size"] == [28, 28] and info["backbone"]["feature_dim"] == 128
    )
    assert prov["dataset"] == "omniglot" and prov["run"] == "1shot"
    assert prov["split_file"] == "leo/data/splits/tiny.json"
    assert prov["commit"] == project["commit"] and prov["dirty"] is False
    assert prov["params_sha256"] == json_sha256(prov["params"])
    assert prov["params"]["metatrain.config"]["num_steps"] == 50
    metrics = json.loads((p / "reports/evaluate/1shot/metrics.json").read_text())
    assert prov["metatest"]["accuracy"] == metrics["accuracy"]
    assert prov["backbone_sha256"] == tree_sha256(p / "data/pretrain/backbone.pt")
    assert prov["checkpoint_sha256"] == tree_sha256(p / "data/metatrain/1shot/best.pt")
    check = prov["check"]  # the stage's own check against evaluate, recorded
    assert check["episodes"] == 2 and check["agreement"] == 1.0
    assert check["max_feature_difference"] < 1e-5


def test_dvc_artifacts_get_fetches_the_bundle(project, tmp_path):
    p, env = project["path"], project["env"]
    git("add", "-A", cwd=p, env=env)
    git("commit", "-qm", "exported", cwd=p, env=env)
    git("tag", "-a", "leo-1shot@v0.1.0", "-m", "Registering leo-1shot v0.1.0", cwd=p, env=env)
    dvc("artifacts", "get", str(p), "leo-1shot", "-o", str(tmp_path / "got"), cwd=tmp_path, env=env)
    assert tree_sha256(tmp_path / "got") == tree_sha256(p / "data/export/1shot")


def raw_png(zf: zipfile.ZipFile, example_id: str) -> io.BytesIO:
    """The raw 105x105 drawing of a prepared example id (``alphabet/character/stem``)."""
    (name,) = [n for n in zf.namelist() if n.endswith(f"/{example_id}.png")]
    return io.BytesIO(zf.read(name))


def test_bundle_from_raw_images_predicts_as_the_pipeline_evaluation(project):
    """The same seeded test episode, scored as evaluate scores it (stored embeddings, the
    checkpoint) and by the bundle from the raw PNG files."""
    from PIL import Image

    p = project["path"]
    test = read_embeddings(p / "data/embeddings/test.parquet")
    params, cfg, _ = load_checkpoint(p / "data/metatrain/1shot/best.pt")
    sampler = EpisodeSampler(test.embeddings, test.labels, cfg.num_classes, cfg.num_shots, 10)
    idx = sampler.indices(3, torch.Generator().manual_seed(1))
    weights, _ = leo_classifier(params, cfg)(sampler.gather(idx.support))
    clf = FewShotClassifier.load(p / "data/export/1shot")
    with zipfile.ZipFile(project["zip"]) as zf:
        for b in range(3):
            ids_s = [str(test.example_ids[r]) for r in idx.support[b].reshape(-1).tolist()]
            ids_q = [str(test.example_ids[r]) for r in idx.query[b].reshape(-1).tolist()]
            names = [str(test.class_names[c]) for c in idx.classes[b].tolist()]
            clf.fit(
                [Image.open(raw_png(zf, i)) for i in ids_s], [i.rsplit("/", 1)[0] for i in ids_s]
            )
            proba = clf.predict_proba([Image.open(raw_png(zf, i)) for i in ids_q])
            logits = test.embeddings[idx.query[b].reshape(-1)] @ weights[b].T
            expected = torch.softmax(logits.double(), dim=1).numpy()
            order = [names.index(c) for c in clf.classes_]  # classes_ is sorted
            np.testing.assert_allclose(proba, expected[:, order], atol=1e-5)
            assert (proba.argmax(1) == expected[:, order].argmax(1)).all()


def held_out_characters() -> dict[str, list[str]]:
    with zipfile.ZipFile(OMNIGLOT) as zf:
        chars: dict[str, list[str]] = {}
        for n in zf.namelist():
            parts = n.split("/")
            if len(parts) == 4 and parts[1] in HELD_OUT and n.endswith(".png"):
                chars.setdefault(f"{parts[1]}/{parts[2]}", []).append(n)
    return {k: sorted(v) for k, v in sorted(chars.items())}


def test_held_out_alphabets_are_classified_far_above_chance(project):
    """Latin and Greek characters, never seen by any stage: 5-way 1-shot and 20-way 1-shot,
    20 seeded episodes of 5 queries per class each. Measured 0.71 and 0.58 (chance: 0.2 and
    0.05)."""
    from PIL import Image

    clf = FewShotClassifier.load(project["path"] / "data/export/1shot")
    chars = held_out_characters()
    rng = random.Random(0)
    with zipfile.ZipFile(OMNIGLOT) as zf:
        for n, floor in ((5, 0.5), (20, 0.3)):
            accs = []
            for _ in range(20):
                classes = rng.sample(sorted(chars), n)
                picks = {c: rng.sample(chars[c], 6) for c in classes}
                images = {f: Image.open(io.BytesIO(zf.read(f))) for v in picks.values() for f in v}
                clf.fit([images[v[0]] for v in picks.values()], classes)
                queries = [(c, f) for c, v in picks.items() for f in v[1:]]
                pred = clf.predict([images[f] for _, f in queries])
                accs.append(np.mean([p == c for p, (c, _) in zip(pred, queries, strict=True)]))
            assert np.mean(accs) >= floor, (n, np.mean(accs))


def test_cli_and_api_agree_on_held_out_characters(project, tmp_path):
    chars = held_out_characters()
    classes = list(chars)[:5]
    shots = dict(zip(classes, [1, 2, 3, 1, 2], strict=True))  # a different K per class
    with zipfile.ZipFile(OMNIGLOT) as zf:
        for c, k in shots.items():
            for j, f in enumerate(chars[c][: k + 2]):
                folder = tmp_path / ("support" if j < k else "query") / c.replace("/", "_")
                folder.mkdir(parents=True, exist_ok=True)
                (folder / Path(f).name).write_bytes(zf.read(f))
    queries = sorted((tmp_path / "query").glob("*/*.png"))
    bundle = project["path"] / "data/export/1shot"
    done = subprocess.run(
        [str(BIN / "leo"), "classify", "--bundle", str(bundle), "--support",
         str(tmp_path / "support"), "--query", *map(str, queries),
         "--out", str(tmp_path / "p.csv")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO((tmp_path / "p.csv").read_text())))
    support = sorted((tmp_path / "support").glob("*/*.png"))
    clf = FewShotClassifier.load(bundle).fit(support, [f.parent.name for f in support])
    proba = clf.predict_proba(queries)
    got = np.array([[float(r[c]) for c in clf.classes_] for r in rows])
    np.testing.assert_allclose(got, proba, atol=1e-6)
    assert [r["prediction"] for r in rows] == list(clf.classes_[proba.argmax(1)])


def test_export_refuses_embeddings_another_backbone_made(project, tmp_path, monkeypatch):
    """E.g. the published embeddings: their backbone is not in the pipeline, so no bundle."""
    from leo.data.store import write_embeddings
    from leo.settings import load_settings
    from leo.utils.errors import LeoInputError
    from stages import export

    p = project["path"]
    test = read_embeddings(p / "data/embeddings/test.parquet", normalize=False)
    write_embeddings(
        tmp_path / "test.parquet",
        split="test",
        class_names=np.asarray(test.class_names)[test.labels.numpy()],
        example_ids=test.example_ids,
        embeddings=test.embeddings.numpy(),
        provenance={**test.provenance, "backbone_sha256": "0" * 64},
    )
    before = tree_sha256(p / "data/export/1shot")
    monkeypatch.chdir(p)
    with pytest.raises(LeoInputError, match=r"test\.parquet: not made by data/pretrain/backbone"):
        export.run("1shot", load_settings(p / "params.yaml"), tmp_path)
    assert tree_sha256(p / "data/export/1shot") == before  # nothing written
