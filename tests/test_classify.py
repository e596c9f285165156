"""The classifier bundle, ``FewShotClassifier`` and ``leo classify`` on a small bundle written
here (a random WRN-10-1 and LEO): round trip, preprocessing, the API against a plain
computation, the CLI against the API, and every refusal (one line, exit 2)."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from leo.backbone.wrn import WideResNet, WRNConfig, to_input
from leo.classify import cli
from leo.classify.adapt import adapt_ragged
from leo.classify.bundle import read_bundle, write_bundle
from leo.classify.classifier import FewShotClassifier
from leo.core.config import make_config
from leo.core.model import init_params
from leo.data.raw.images import decode_image
from leo.utils.errors import LeoInputError

SIZE = (12, 12)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    backbone = WideResNet(
        WRNConfig(depth=10, width=1, strides=(2, 2, 2), in_channels=1, num_classes=7),
        mean=torch.tensor([0.8]),
        std=torch.tensor([0.35]),
    ).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, as after training
        for m in backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    cfg = make_config(finetune_lr_init=1.0, compile=False)
    params = init_params(cfg, 64, torch.Generator().manual_seed(1))
    out = tmp_path_factory.mktemp("bundle") / "b"
    write_bundle(
        out, backbone=backbone, params=params, config=cfg, image_size=SIZE,
        provenance={"dataset": "synthetic", "run": "test", "metatest": {"accuracy": 0.5}},
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def clf(bundle_dir) -> FewShotClassifier:
    return FewShotClassifier.load(bundle_dir)


def drawing(seed: int, size=(30, 26), mode="L") -> Image.Image:
    """A random blocky image (any size and mode: the classifier converts it)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[1] // 2, size[0] // 2, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.Resampling.NEAREST)
    return img.convert(mode)


def write_png(path: Path, img: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


# ------------------------------------------------------------------------- the bundle
def test_bundle_round_trip_keeps_weights_config_and_preprocessing(bundle_dir):
    info = json.loads((bundle_dir / "bundle.json").read_text())
    assert info["format"] == "leo-few-shot-classifier" and info["version"] == 1
    assert info["preprocessing"]["image_size"] == [12, 12]
    assert info["preprocessing"]["color_mode"] == "L"
    assert info["preprocessing"]["mean"] == pytest.approx([0.8])
    assert info["backbone"]["architecture"] == "WRN-10-1"
    assert sorted(p.name for p in bundle_dir.iterdir()) == [
        "README.md",
        "backbone.pt",
        "bundle.json",
        "leo.pt",
    ]
    b = read_bundle(bundle_dir)
    assert b.config.finetune_lr_init == 1.0 and b.provenance["dataset"] == "synthetic"
    fresh = init_params(b.config, 64, torch.Generator().manual_seed(1))
    for name, value in fresh.items():
        torch.testing.assert_close(b.params[name], value, rtol=0, atol=0)
    assert float(b.backbone.std) == pytest.approx(0.35)
    assert not b.backbone.training


def test_weight_files_hold_only_tensors(bundle_dir):
    """Loadable with weights_only=True: no pickled code is needed (or run) to read a bundle."""
    for name in ("backbone.pt", "leo.pt"):
        obj = torch.load(bundle_dir / name, weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in obj.values())


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _edit_json(path: Path, change) -> None:
    info = json.loads((path / "bundle.json").read_text())
    change(info)
    (path / "bundle.json").write_text(json.dumps(info))


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_bad_bundles_are_refused_in_one_line(bundle_dir, tmp_path):
    from leo.utils.hashing import file_sha256

    with pytest.raises(LeoInputError, match=r"not a classifier bundle \(no bundle\.json\)"):
        read_bundle(tmp_path)
    newer = _copy(bundle_dir, tmp_path / "newer")
    _edit_json(newer, lambda i: i.update(version=2, leo_version="9.0"))
    with pytest.raises(
        LeoInputError, match=r"bundle format version 2 \(written by leo 9\.0\); this leo .* reads "
        r"version 1: export it again",
    ):  # fmt: skip
        read_bundle(newer)
    other = _copy(bundle_dir, tmp_path / "other")
    _edit_json(other, lambda i: i.update(format="something-else"))
    with pytest.raises(LeoInputError, match="not a LEO classifier bundle"):
        read_bundle(other)
    damaged = _copy(bundle_dir, tmp_path / "damaged")
    data = bytearray((damaged / "backbone.pt").read_bytes())
    data[-100] ^= 0xFF
    (damaged / "backbone.pt").write_bytes(bytes(data))
    with pytest.raises(LeoInputError, match=r"backbone\.pt: sha256 differs from bundle\.json's"):
        read_bundle(damaged)
    evil = _copy(bundle_dir, tmp_path / "evil")
    marker = tmp_path / "pwned"
    (evil / "leo.pt").write_bytes(pickle.dumps({"encoder.0": _Payload(marker)}, protocol=2))
    _edit_json(evil, lambda i: i["leo"].update(sha256=file_sha256(evil / "leo.pt")))
    with pytest.raises(LeoInputError, match=r"leo\.pt: not a readable weight file"):
        read_bundle(evil)
    assert not marker.exists()
    wrong = _copy(bundle_dir, tmp_path / "wrong")
    _edit_json(wrong, lambda i: i["backbone"]["config"].update(width=2))
    with pytest.raises(
        LeoInputError, match=r"backbone\.pt: does not fit .*bundle\.json's backbone"
    ):
        read_bundle(wrong)


# ------------------------------------------------------------------------- preprocessing
def test_images_of_any_type_mode_and_size_are_converted_as_at_training(clf, tmp_path):
    img = drawing(3, size=(105, 105), mode="RGB")
    png = write_png(tmp_path / "a.png", img)
    expected = decode_image(png.read_bytes(), SIZE, 1, "a.png")  # the prepare stage's path
    grey = np.asarray(img.convert("L"))
    inputs = [img, png, str(png), grey, grey[:, :, None], np.asarray(img), img.convert("RGBA")]
    out = clf.preprocess(inputs)
    assert out.shape == (len(inputs), 12, 12, 1)
    for row in out:
        np.testing.assert_array_equal(row, expected)
    one_bit = clf.preprocess([np.zeros((20, 20), dtype=bool), Image.new("1", (20, 20), 1)])
    assert one_bit[0].max() == 0 and one_bit[1].min() == 255
    assert clf.preprocess([img.convert("P"), img.convert("CMYK")]).shape == (2, 12, 12, 1)


@pytest.mark.parametrize(
    ("item", "needle"),
    [
        (np.zeros((8, 8), dtype=np.float32), r"image 1: expected a uint8 array .* got float32"),
        (np.zeros((8, 8, 2), dtype=np.uint8), r"image 1: expected a uint8 array .* \(8, 8, 2\)"),
        (3.5, r"image 1: expected a PIL image, a path or a uint8 array, got float"),
    ],
)
def test_unusable_inputs_are_named(clf, item, needle):
    with pytest.raises(LeoInputError, match=needle):
        clf.preprocess([drawing(0), item])


def test_unreadable_files_are_named(clf, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(LeoInputError, match=r"broken\.png: cannot decode image"):
        clf.preprocess([bad])
    with pytest.raises(LeoInputError, match=r"missing\.png: cannot read"):
        clf.preprocess([tmp_path / "missing.png"])


# ------------------------------------------------------------------------- fit / predict
def test_api_equals_a_plain_computation_with_unequal_shots(clf, bundle_dir):
    shots = {"b": 1, "a": 3, "c": 2}
    support = [drawing(10 * i + k) for i, (c, n) in enumerate(shots.items()) for k in range(n)]
    labels = [c for c, n in shots.items() for _ in range(n)]
    queries = [drawing(100 + i, size=(40, 40)) for i in range(5)]
    clf.fit(support, labels)
    proba = clf.predict_proba(queries)
    assert list(clf.classes_) == ["a", "b", "c"]
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-12)

    b = read_bundle(bundle_dir)  # plain: the same steps written out
    with torch.no_grad():

        def feats(images):
            arr = np.stack(
                [
                    np.asarray(im.convert("L").resize((12, 12), Image.Resampling.LANCZOS))
                    for im in images
                ]
            )
            f = b.backbone.features(to_input(arr[..., None]))
            return f / f.norm(dim=1, keepdim=True)

        y = torch.tensor([["a", "b", "c"].index(c) for c in labels])
        w = adapt_ragged(b.params, feats(support), y, 3, b.config)["w_bar"]
        expected = torch.softmax((feats(queries) @ w.T).double(), dim=1).numpy()
    np.testing.assert_allclose(proba, expected, atol=1e-6)
    assert list(clf.predict(queries)) == [["a", "b", "c"][i] for i in expected.argmax(1)]


def test_twenty_way_and_integer_labels(clf):
    support = [drawing(i) for i in range(20)]
    before = torch.get_num_threads()
    clf.fit(support, list(range(20)))
    proba = clf.predict_proba(support)
    assert torch.get_num_threads() == before  # one thread while it ran, then put back
    assert proba.shape == (20, 20)
    assert (proba.argmax(1) == np.arange(20)).mean() >= 0.9  # its own support, mostly


def test_fit_refusals(clf):
    with pytest.raises(LeoInputError, match=r"support set has 1 class \('x'\); .* at least 2"):
        clf.fit([drawing(0), drawing(1)], ["x", "x"])
    with pytest.raises(LeoInputError, match="3 support images but 2 labels"):
        clf.fit([drawing(0), drawing(1), drawing(2)], ["x", "y"])
    with pytest.raises(LeoInputError, match="labels must be all strings or all numbers"):
        clf.fit([drawing(0), drawing(1)], ["x", None])


def test_a_support_image_without_features_is_refused(bundle_dir):
    clf = FewShotClassifier.load(bundle_dir)
    with torch.no_grad():  # a backbone whose last batch norm outputs zeros everywhere
        clf.backbone.bn.weight.zero_()
        clf.backbone.bn.bias.zero_()
    with pytest.raises(LeoInputError, match=r"image 0: the backbone's features are all zero"):
        clf.fit([drawing(0), drawing(1)], ["x", "y"])


def test_predict_before_fit_is_refused(bundle_dir):
    with pytest.raises(LeoInputError, match="not fitted"):
        FewShotClassifier.load(bundle_dir).predict_proba([drawing(0)])


# ------------------------------------------------------------------------- the CLI
def make_folders(root: Path, shots: dict[str, int], queries: int) -> tuple[Path, Path]:
    support, query = root / "support", root / "query"
    for i, (cls, k) in enumerate(shots.items()):
        for j in range(k):
            write_png(support / cls / f"{j}.png", drawing(50 * i + j, mode="RGB"))
    for q in range(queries):
        write_png(query / f"q{q:02d}.jpg", drawing(1000 + q, size=(64, 48), mode="RGB"))
    return support, query


def run_cli(capsys, *args) -> tuple[int, str, str]:
    try:
        cli.main(["classify", *map(str, args)])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_writes_what_the_api_computes(bundle_dir, tmp_path, capsys):
    support, query = make_folders(tmp_path, {"dog": 2, "cat": 1, "emu": 3}, 4)
    (support / "cat" / "notes.txt").write_text("not an image: ignored")
    (support / ".hidden").mkdir()
    extra = write_png(tmp_path / "one.png", drawing(7))
    code, out, err = run_cli(
        capsys, "--bundle", bundle_dir, "--support", support, "--query", query, extra
    )
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["image", "prediction", "probability", "cat", "dog", "emu"]
    paths = sorted(query.glob("*.jpg")) + [extra]
    assert [r["image"] for r in rows] == [str(p) for p in paths]

    clf = FewShotClassifier.load(bundle_dir)
    files = sorted(support.glob("*/*.png"))
    clf.fit(files, [p.parent.name for p in files])
    proba = clf.predict_proba(paths)
    got = np.array([[float(r[c]) for c in ("cat", "dog", "emu")] for r in rows])
    np.testing.assert_allclose(got, proba, atol=1e-6)
    assert [r["prediction"] for r in rows] == list(clf.classes_[proba.argmax(1)])
    assert [float(r["probability"]) for r in rows] == pytest.approx(proba.max(1), abs=1e-6)

    code, out, _ = run_cli(
        capsys, "--bundle", bundle_dir, "--support", support, "--query", query,
        "--out", tmp_path / "p.csv",
    )  # fmt: skip
    assert code == 0 and out == ""
    assert (tmp_path / "p.csv").read_text().splitlines()[
        0
    ] == "image,prediction,probability,cat,dog,emu"


def test_cli_refusals_are_one_line_with_exit_2(bundle_dir, tmp_path, capsys):
    support, query = make_folders(tmp_path, {"a": 1, "b": 2}, 2)

    def refused(sup, qry, needle, *extra, bundle=bundle_dir):
        code, out, err = run_cli(
            capsys, "--bundle", bundle, "--support", sup, "--query", qry, *extra
        )
        assert code == 2 and out == "", err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert re.search(needle, err), err

    (support / "c").mkdir()
    refused(support, query, r"support/c: class folder with no images")
    (support / "c").rmdir()
    single, _ = make_folders(tmp_path / "single", {"only": 2}, 0)
    refused(single, query, r"one class folder \(only\); a few-shot task needs at least 2")
    broken = write_png(tmp_path / "broken" / "x" / "0.png", drawing(0))
    broken.write_bytes(b"garbage")
    write_png(tmp_path / "broken" / "y" / "0.png", drawing(1))
    refused(tmp_path / "broken", query, r"broken/x/0\.png: cannot decode image")
    refused(support, tmp_path / "nowhere", r"nowhere: no such file or folder \(--query\)")
    (tmp_path / "empty").mkdir()
    refused(support, tmp_path / "empty", r"empty: query folder with no images")
    refused(support, query, r"--device must be auto, cpu, cuda", "--device", "tpu")
    refused(support, query, r"--threads must be 0 or more, got -1", "--threads", "-1")
    newer = _copy(bundle_dir, tmp_path / "newer")
    _edit_json(newer, lambda i: i.update(version=2))
    refused(support, query, r"newer/bundle\.json: bundle format version 2", bundle=newer)
    refused(support, query, r"not a classifier bundle", bundle=tmp_path)


def test_the_console_script_is_installed(bundle_dir, tmp_path):
    support, query = make_folders(tmp_path, {"a": 1, "b": 1}, 1)
    leo = Path(sys.executable).parent / "leo"
    assert leo.is_file(), "pip install -e . installs the `leo` console script"
    done = subprocess.run(
        [str(leo), "classify", "--bundle", str(bundle_dir), "--support", str(support),
         "--query", str(query)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "image,prediction,probability,a,b"
