"""miniImageNet (Vinyals et al.; the Ravi & Larochelle split): classes per split from CSVs.

Raw layout, as files, a folder or a zip/tar archive (any mix) under ``data/raw``:
``train.csv``, ``val.csv``, ``test.csv``, each with the header ``filename,label`` and rows
like ``n0153282900000005.jpg,n01532829``, and the JPEGs (usually in ``images/``), found by
file name. 64/16/20 classes of 600 images each. Images are resized (not cropped) to 80x80
RGB as in the paper. Example ids are the file names without extension.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import PurePosixPath

import numpy as np

from leo.data.prepared import SPLITS, PreparedSplit
from leo.data.raw.images import Member, RawFiles, check_classes, decode_many
from leo.utils.errors import LeoInputError

HEADER = ["filename", "label"]


def read_split_csv(raw: RawFiles, split: str) -> tuple[Member, list[tuple[str, str]]]:
    """Find and parse ``<split>.csv``: its member and its ``(filename, label)`` rows.

    Raises:
        LeoInputError: CSV missing or ambiguous, a wrong header, a malformed row.
    """
    member = raw.find_one(f"{split}.csv")
    try:
        text = raw.read(member).decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise LeoInputError(f"{member}: not UTF-8 text ({err})") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or [c.strip() for c in rows[0]] != HEADER:
        got = rows[0] if rows else "nothing"
        raise LeoInputError(f"{member}: expected the header 'filename,label', got {got}")
    out = []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise LeoInputError(f"{member}, line {line}: expected 'filename,label', got {row}")
        out.append((row[0].strip(), row[1].strip()))
    return member, out


def read_mini_imagenet(
    raw: RawFiles,
    *,
    image_size: tuple[int, int] = (80, 80),
    channels: int = 3,
    min_classes: int = 5,
    min_images: int = 20,
    workers: int = 1,
) -> tuple[dict[str, PreparedSplit], dict]:
    """Read miniImageNet's split CSVs and JPEGs into prepared splits.

    Args:
        raw: the raw files.
        image_size: output ``(H, W)``, 80x80 by default.
        channels: 3 (RGB, default) or 1.
        min_classes, min_images: minimum classes per split and images per class.
        workers: decoding threads.

    Returns:
        ``({split: PreparedSplit}, manifest metadata)``.

    Raises:
        LeoInputError: a missing/malformed CSV, an image listed twice or not found, a class
            in two splits, too few classes or images, an undecodable image.
    """
    by_name: dict[str, list[Member]] = defaultdict(list)
    for m in raw.members:
        by_name[m.basename].append(m)
    listed: dict[str, str] = {}
    plan: dict[str, list[tuple[Member, str]]] = {}
    csvs = {}
    for split in SPLITS:
        csv_member, rows = read_split_csv(raw, split)
        csvs[split] = str(PurePosixPath(csv_member.entry.name, csv_member.inner))
        plan[split] = []
        for filename, label in rows:
            where = f"{csv_member}: image '{filename}'"
            base = PurePosixPath(filename).name
            if base in listed:
                raise LeoInputError(f"{where} is listed twice (also in {listed[base]}.csv)")
            listed[base] = split
            found = by_name.get(base, [])
            if len(found) != 1:
                what = "not found" if not found else f"found {len(found)} times"
                raise LeoInputError(f"{where} {what} in the raw data")
            plan[split].append((found[0], label))
    counts = {s: _count(label for _, label in plan[s]) for s in SPLITS}
    check_classes(counts, min_classes, min_images, source="miniImageNet")

    splits = {}
    for split in SPLITS:
        label_of = dict(plan[split])
        members = raw.storage_order(label_of)
        classes = sorted(counts[split])
        index = {c: i for i, c in enumerate(classes)}
        images = decode_many(
            ((str(m), lambda m=m: raw.read(m)) for m in members),
            len(members),
            image_size,
            channels,
            workers=workers,
            desc=f"miniImageNet {split}",
        )
        splits[split] = PreparedSplit(
            images=images,
            labels=np.array([index[label_of[m]] for m in members], dtype=np.int64),
            classes=classes,
            ids=np.array([PurePosixPath(m.basename).stem for m in members], dtype=str),
        )
    return splits, {"split_csvs": csvs}


def _count(labels) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for label in labels:
        counts[label] += 1
    return dict(counts)
