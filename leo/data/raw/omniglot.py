"""Omniglot: characters as classes, split into meta-train/val/test BY ALPHABET.

Raw layout (Lake et al.'s archives, read in place): ``<root>/<alphabet>/<character>/<id>.png``,
105x105 binary PNGs, 20 drawings per character. Several archives may be combined; a drawing
that appears in two of them with identical bytes (the two small background archives both hold
Greek and Latin) is read once, and one that differs is refused.

The split is a versioned JSON file (``leo/data/splits/*.json``)::

    {"name": str, "version": int, "description": str,
     "splits": {"train": [alphabet, ...], "val": [...], "test": [...]},
     "characters": {alphabet: number of characters, ...}}   # optional; checked when given

Classes are ``<alphabet>/<character>``, example ids ``<alphabet>/<character>/<png stem>``.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from leo.data.prepared import SPLITS, PreparedSplit, read_split_file
from leo.data.raw.images import Member, RawFiles, check_classes, decode_many
from leo.utils.errors import LeoInputError


@dataclass(frozen=True)
class AlphabetSplit:
    """A parsed split file.

    Attributes:
        path: the file.
        sha256: its sha256 (recorded in the manifest).
        name, version: its declared name and version.
        splits: split -> alphabets.
        characters: alphabet -> expected number of characters (may be empty).
    """

    path: Path
    sha256: str
    name: str
    version: int
    splits: dict[str, list[str]]
    characters: dict[str, int]


def load_split_file(path: str | Path) -> AlphabetSplit:
    """Read and validate a split file.

    Raises:
        LeoInputError: missing file, bad JSON, a malformed key, an alphabet in two splits.
    """
    path = Path(path)
    spec, data = read_split_file(path)
    splits: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for split in SPLITS:
        alphabets = spec["splits"].get(split)
        if not isinstance(alphabets, list) or not all(isinstance(a, str) for a in alphabets):
            raise LeoInputError(f"{path}: key 'splits.{split}' must be a list of alphabet names")
        for alphabet in alphabets:
            if alphabet in owner:
                raise LeoInputError(
                    f"{path}: alphabet '{alphabet}' is in both split '{owner[alphabet]}' "
                    f"and split '{split}'"
                )
            owner[alphabet] = split
        splits[split] = list(alphabets)
    extra = set(spec["splits"]) - set(SPLITS)
    if extra:
        raise LeoInputError(f"{path}: unknown split(s) {sorted(extra)} under 'splits'")
    characters = spec.get("characters", {})
    if not isinstance(characters, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in characters.values()
    ):
        raise LeoInputError(f"{path}: key 'characters' must map alphabet names to integers")
    return AlphabetSplit(
        path=path,
        sha256=hashlib.sha256(data).hexdigest(),
        name=str(spec.get("name", path.stem)),
        version=int(spec.get("version", 0)),
        splits=splits,
        characters=dict(characters),
    )


def index_drawings(raw: RawFiles, alphabets: set[str]) -> dict[str, dict[str, dict[str, Member]]]:
    """Find every drawing of the given alphabets: alphabet -> character -> file name -> member.

    Characters with a folder but no PNG are kept (with no drawings) so they can be reported.

    Raises:
        LeoInputError: the same drawing in two places with different bytes.
    """
    index: dict[str, dict[str, dict[str, Member]]] = defaultdict(lambda: defaultdict(dict))
    for folder in raw.dirs:
        parts = PurePosixPath(folder.inner).parts
        if len(parts) >= 2 and parts[-2] in alphabets:
            index[parts[-2]].setdefault(parts[-1], {})
    for member in raw.members:
        parts = PurePosixPath(member.inner).parts
        if len(parts) < 3 or parts[-3] not in alphabets or not parts[-1].lower().endswith(".png"):
            continue
        drawings = index[parts[-3]][parts[-2]]
        first = drawings.get(parts[-1])
        if first is None:
            drawings[parts[-1]] = member
        elif raw.read(first) != raw.read(member):
            raise LeoInputError(f"{member}: differs from the drawing of the same name in {first}")
    return index


def read_omniglot(
    raw: RawFiles,
    split_file: str | Path,
    *,
    image_size: tuple[int, int] = (28, 28),
    channels: int = 1,
    min_classes: int = 5,
    min_images: int = 20,
    workers: int = 1,
) -> tuple[dict[str, PreparedSplit], dict]:
    """Read the raw Omniglot archives into prepared splits.

    Args:
        raw: the raw files (archives or folders).
        split_file: the versioned alphabet split.
        image_size: output ``(H, W)`` (28x28 by default).
        channels: 1 (grey, default) or 3.
        min_classes, min_images: minimum characters per split and drawings per character.
        workers: decoding threads.

    Returns:
        ``({split: PreparedSplit}, manifest metadata)``; the metadata records the split file,
        its sha256, the alphabets of each split with their character counts, and the
        alphabets of the archives that the split file does not use.

    Raises:
        LeoInputError: an alphabet of the split file not in the archives, a character count
            that differs from the split file's, an empty or too small character or split, an
            undecodable drawing.
    """
    spec = load_split_file(split_file)
    wanted = {a for alphabets in spec.splits.values() for a in alphabets}
    index = index_drawings(raw, wanted)
    counts: dict[str, dict[str, int]] = {}
    alphabet_counts: dict[str, dict[str, int]] = {}
    for split, alphabets in spec.splits.items():
        counts[split] = {}
        alphabet_counts[split] = {}
        for alphabet in alphabets:
            if alphabet not in index:
                raise LeoInputError(
                    f"{spec.path}: alphabet '{alphabet}' (split '{split}') is not in the raw data"
                )
            chars = index[alphabet]
            expected = spec.characters.get(alphabet)
            if expected is not None and expected != len(chars):
                raise LeoInputError(
                    f"{spec.path}: alphabet '{alphabet}' has {len(chars)} characters in the raw "
                    f"data, the split file records {expected}"
                )
            alphabet_counts[split][alphabet] = len(chars)
            for char in sorted(chars):
                counts[split][f"{alphabet}/{char}"] = len(chars[char])
    check_classes(counts, min_classes, min_images, source=f"Omniglot ({spec.path.name})")

    splits = {}
    for split in SPLITS:
        classes = sorted(counts[split])
        items = []  # (label, id, member)
        for label, cls in enumerate(classes):
            alphabet, char = cls.split("/")
            drawings = index[alphabet][char]
            for name in sorted(drawings):
                items.append((label, f"{cls}/{PurePosixPath(name).stem}", drawings[name]))
        images = decode_many(
            ((str(m), lambda m=m: raw.read(m)) for _, _, m in items),
            len(items),
            image_size,
            channels,
            workers=workers,
            desc=f"omniglot {split}",
        )
        splits[split] = PreparedSplit(
            images=images,
            labels=np.array([label for label, _, _ in items], dtype=np.int64),
            classes=classes,
            ids=np.array([i for _, i, _ in items], dtype=str),
        )
    present = {
        PurePosixPath(m.inner).parts[-3]
        for m in raw.members
        if m.inner.lower().endswith(".png") and len(PurePosixPath(m.inner).parts) >= 3
    }
    meta = {
        "split_file": spec.path.as_posix(),
        "split_file_sha256": spec.sha256,
        "split_name": spec.name,
        "split_version": spec.version,
        "alphabets": alphabet_counts,
        "unused_alphabets": sorted(present - wanted),
    }
    return splits, meta
