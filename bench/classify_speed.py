"""Speed of the exported few-shot classifier: one N-way K-shot task with Q queries, from image
files to probabilities, after loading.

Prints one JSON object: seconds per task (median and max over ``--repeats``) for
``FewShotClassifier.fit(support files, labels).predict_proba(query files)``, and the median of
each phase (decode + resize, backbone, LEO adaptation, query logits), plus the machine.

    python bench/classify_speed.py [--bundle data/export/1shot] [--dataset omniglot]
        [--ways 20] [--shots 1] [--queries 20] [--repeats 10] [--threads 1] [--device cpu]

Without ``--bundle`` a bundle is written to a temporary directory with the architecture and
image size of ``pretrain.<dataset>`` / ``prepare.<dataset>`` in ``params.yaml`` and random
weights (the time does not depend on the values); the images are real Omniglot drawings from
``$LEO_DATA_DIR/omniglot`` when there, else random 105x105 PNGs. Queries are spread over the
classes. ``--threads`` is the classifier's ``cpu_threads`` (default 1, as the API's; 0 keeps
torch's default intra-op threads).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from leo.backbone.wrn import WideResNet, WRNConfig  # noqa: E402
from leo.classify.bundle import write_bundle  # noqa: E402
from leo.classify.classifier import FewShotClassifier  # noqa: E402
from leo.core.model import init_params  # noqa: E402
from leo.settings import load_settings  # noqa: E402


def make_bundle(out: Path, dataset: str) -> None:
    """A bundle of ``dataset``'s pipeline architecture with random weights."""
    settings = load_settings(ROOT / "params.yaml")
    pre = settings.pretrain_config(dataset)
    image = settings.prepare.for_dataset(dataset)
    wrn = WRNConfig(
        depth=pre.depth, width=pre.width, strides=pre.strides, in_channels=image.channels
    )
    cfg = settings.run_config(next(iter(settings.metatrain.runs)))
    write_bundle(
        out,
        backbone=WideResNet(wrn).eval(),
        params=init_params(cfg, wrn.feature_dim, torch.Generator().manual_seed(0)),
        config=cfg,
        image_size=image.size,
        provenance={"dataset": dataset, "note": "random weights, for timing"},
    )


def write_images(folder: Path, count: int) -> tuple[list[Path], str]:
    """``count`` PNG files: real Omniglot drawings if available, else random images."""
    folder.mkdir(parents=True, exist_ok=True)
    data_dir = Path(os.environ.get("LEO_DATA_DIR") or ROOT.parent / "shared" / "data")
    archive = data_dir / "omniglot" / "images_background_small1.zip"
    paths = []
    if archive.is_file():
        with zipfile.ZipFile(archive) as zf:
            names = sorted(n for n in zf.namelist() if n.endswith(".png"))[::20][:count]
            for i, name in enumerate(names):
                paths.append(folder / f"{i:04d}.png")
                paths[-1].write_bytes(zf.read(name))
        if len(paths) == count:
            return paths, "omniglot drawings (105x105, 1-bit)"
    rng = np.random.default_rng(0)
    for i in range(len(paths), count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (105, 105, 3), dtype=np.uint8)).save(buf, "PNG")
        paths.append(folder / f"{i:04d}.png")
        paths[-1].write_bytes(buf.getvalue())
    return paths, "random 105x105 RGB PNGs"


def cpu_model() -> str:
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def one_task(clf: FewShotClassifier, support, labels, queries) -> dict[str, float]:
    """Time one task, whole and by phase (the phases are what fit + predict_proba run)."""
    dev = clf.device
    t0 = time.perf_counter()
    clf.fit(support, labels).predict_proba(queries)
    sync(dev)
    total = time.perf_counter() - t0

    t0 = time.perf_counter()
    prepared = clf.preprocess(support + queries)
    t1 = time.perf_counter()
    feats = clf.embed_prepared(prepared)
    sync(dev)
    t2 = time.perf_counter()
    classes, y = np.unique(labels, return_inverse=True)
    clf.fit_embeddings(feats[: len(support)], classes, y)
    sync(dev)
    t3 = time.perf_counter()
    torch.softmax(clf.logits_of(feats[len(support) :]).double(), dim=1).cpu()
    t4 = time.perf_counter()
    return {
        "total": total,
        "decode_resize": t1 - t0,
        "backbone": t2 - t1,
        "adapt": t3 - t2,
        "logits": t4 - t3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", help="a bundle directory (default: a random one)")
    ap.add_argument("--dataset", default="omniglot", help="params.yaml preset without --bundle")
    ap.add_argument("--ways", type=int, default=20)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--queries", type=int, default=20, help="query images in the task")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bundle = Path(args.bundle) if args.bundle else tmp / "bundle"
        if not args.bundle:
            make_bundle(bundle, args.dataset)
        t0 = time.perf_counter()
        clf = FewShotClassifier.load(bundle, device=args.device, cpu_threads=args.threads)
        load_s = time.perf_counter() - t0
        files, source = write_images(tmp / "images", args.ways * args.shots + args.queries)
        support = files[: args.ways * args.shots]
        labels = [f"c{i:02d}" for i in range(args.ways) for _ in range(args.shots)]
        queries = files[args.ways * args.shots :]
        one_task(clf, support, labels, queries)  # warm-up (allocations, lazy init)
        runs = [one_task(clf, support, labels, queries) for _ in range(args.repeats)]
    info = clf.bundle.info
    print(
        json.dumps(
            {
                "task": f"{args.ways}-way {args.shots}-shot, {args.queries} queries",
                "seconds_median": statistics.median(r["total"] for r in runs),
                "seconds_max": max(r["total"] for r in runs),
                "phases_median_s": {
                    k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "total"
                },
                "load_s": load_s,
                "repeats": args.repeats,
                "bundle": str(args.bundle or f"random weights, {args.dataset} architecture"),
                "backbone": info["backbone"]["architecture"],
                "image_size": info["preprocessing"]["image_size"],
                "images": source,
                "device": str(clf.device),
                "cpu_threads": args.threads or torch.get_num_threads(),
                "torch": torch.__version__,
                "cpu": cpu_model(),
                "cpu_count": os.cpu_count(),
                "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
