"""One entry point over every raw-dataset reader: ``base.dataset`` -> prepared splits.

==================  ============================================================  ==========
``base.dataset``    reader (format)                                               split file
==================  ============================================================  ==========
``omniglot``        :mod:`leo.data.raw.omniglot` (Lake et al.'s zips)              required
``miniImageNet``    :mod:`leo.data.raw.mini_imagenet` (CSV + JPEG) or              --
                    :mod:`leo.data.raw.mini_imagenet_cache` (pickles), detected
``tieredImageNet``  :mod:`leo.data.raw.tiered_imagenet` (pickles)                  --
``cifar-fs``        :mod:`leo.data.raw.cifar` (CIFAR-100 python archive)           default
``fc100``           :mod:`leo.data.raw.cifar`                                      default
==================  ============================================================  ==========

miniImageNet's format is read off the raw files: ``mini-imagenet-cache-<split>.pkl`` means
the pickles, ``<split>.csv`` the CSV + JPEG layout; both at once is refused (which one was
meant is not knowable).
"""

from __future__ import annotations

from pathlib import Path

from leo.data.prepared import SPLITS, PreparedSplit
from leo.data.raw.images import RawFiles
from leo.utils.errors import LeoInputError

DATASETS = ("omniglot", "miniImageNet", "tieredImageNet", "cifar-fs", "fc100")
SPLITS_DIR = Path(__file__).resolve().parents[1] / "splits"
DEFAULT_SPLIT_FILES = {"cifar-fs": SPLITS_DIR / "cifar_fs.json", "fc100": SPLITS_DIR / "fc100.json"}


def mini_imagenet_format(raw: RawFiles) -> str:
    """``"cache"`` (pickles) or ``"csv"``, from the files present.

    Raises:
        LeoInputError: both formats, or neither.
    """
    from leo.data.raw.mini_imagenet_cache import has_cache

    pickles = has_cache(raw)
    csvs = any(raw.find(f"{s}.csv") for s in SPLITS)
    if pickles and csvs:
        raise LeoInputError(
            "miniImageNet: the raw data holds both mini-imagenet-cache-<split>.pkl and "
            "<split>.csv; keep one format in download.miniImageNet.files"
        )
    if not (pickles or csvs):
        raise LeoInputError(
            "miniImageNet: neither mini-imagenet-cache-<split>.pkl nor <split>.csv in the raw data"
        )
    return "cache" if pickles else "csv"


def read_raw(
    dataset: str,
    raw: RawFiles,
    *,
    split_file: str | Path | None = None,
    image_size: tuple[int, int],
    channels: int,
    min_classes: int,
    min_images: int,
    workers: int = 1,
) -> tuple[dict[str, PreparedSplit], dict]:
    """Read ``dataset`` from ``raw`` into prepared splits.

    Args:
        dataset: one of :data:`DATASETS`.
        raw: the raw files.
        split_file: the class split (Omniglot: required; CIFAR-FS / FC100: default
            :data:`DEFAULT_SPLIT_FILES`; ignored otherwise).
        image_size, channels: output ``(H, W)`` and 1 or 3.
        min_classes, min_images: minimum classes per split and images per class.
        workers: decoding or resizing threads.

    Returns:
        ``({split: PreparedSplit}, manifest metadata)``.

    Raises:
        LeoInputError: an unknown dataset, a missing split file, or the reader's refusals.
    """
    options = dict(
        image_size=tuple(image_size),
        channels=channels,
        min_classes=min_classes,
        min_images=min_images,
        workers=workers,
    )
    if dataset == "omniglot":
        from leo.data.raw.omniglot import read_omniglot

        if split_file is None:
            raise LeoInputError("omniglot: a split file is required (prepare.omniglot.split_file)")
        return read_omniglot(raw, split_file, **options)
    if dataset == "miniImageNet":
        if mini_imagenet_format(raw) == "cache":
            from leo.data.raw.mini_imagenet_cache import read_mini_imagenet_cache

            return read_mini_imagenet_cache(raw, **options)
        from leo.data.raw.mini_imagenet import read_mini_imagenet

        return read_mini_imagenet(raw, **options)
    if dataset == "tieredImageNet":
        from leo.data.raw.tiered_imagenet import read_tiered_imagenet

        return read_tiered_imagenet(raw, **options)
    if dataset in DEFAULT_SPLIT_FILES:
        from leo.data.raw.cifar import read_cifar

        return read_cifar(raw, split_file or DEFAULT_SPLIT_FILES[dataset], **options)
    raise LeoInputError(f"unknown dataset {dataset!r} (one of {', '.join(DATASETS)})")
