"""The ``leo`` command: ``leo classify`` runs an exported few-shot classifier on image folders.

Usage::

    leo classify --bundle data/export/5shot --support SUPPORT_DIR --query QUERY [QUERY ...]
                 [--out predictions.csv] [--device cpu] [--batch-size 256] [--threads 1]

``SUPPORT_DIR`` holds one folder per class (the folder's name is the class name) with one or
more images; every class may have a different number. Each ``QUERY`` is an image file or a
folder of images. Image files are those whose extension PIL can open (``.png``, ``.jpg``,
...), hidden files left out, taken in name order; any size and mode (converted as at
training). The output is CSV, one row per query image: ``image`` (its path), ``prediction``
(the most probable class), ``probability`` (its probability), then one probability column
per class, named by the class; to ``--out`` (written atomically) or to stdout.

Bad input stops the command before anything is written, with ``error: <one line>`` on stderr
and exit status 2: an unreadable image (named), a class folder without images, a single
class, a bundle of another format version.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

from PIL import Image

from leo.utils.atomic import write_text
from leo.utils.errors import LeoInputError

FIXED_COLUMNS = ("image", "prediction", "probability")


def image_extensions() -> frozenset[str]:
    """Lower-case extensions (with the dot) of the formats PIL can open."""
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (not hidden), sorted by name."""
    exts = image_extensions()
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts
    )


def support_set(root: Path) -> tuple[list[Path], list[str]]:
    """The support images and their class names from one folder per class.

    Raises:
        LeoInputError: not a folder, no class folder, a class folder without images, a single
            class, a class named like a fixed output column.
    """
    if not root.is_dir():
        raise LeoInputError(f"{root}: --support must be a folder of class folders")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise LeoInputError(f"{root}: no class folders (one folder of images per class)")
    paths: list[Path] = []
    labels: list[str] = []
    for folder in folders:
        if folder.name in FIXED_COLUMNS:
            raise LeoInputError(
                f"{folder}: a class may not be named {folder.name!r} (an output column); "
                "rename the folder"
            )
        files = image_files(folder)
        if not files:
            raise LeoInputError(f"{folder}: class folder with no images")
        paths += files
        labels += [folder.name] * len(files)
    if len(folders) < 2:
        raise LeoInputError(
            f"{root}: one class folder ({folders[0].name}); a few-shot task needs at least 2"
        )
    return paths, labels


def query_set(paths: list[Path]) -> list[Path]:
    """Image files of the ``--query`` arguments, folders expanded.

    Raises:
        LeoInputError: a path that does not exist, a folder without images.
    """
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            files = image_files(path)
            if not files:
                raise LeoInputError(f"{path}: query folder with no images")
            out += files
        elif path.is_file():
            out.append(path)
        else:
            raise LeoInputError(f"{path}: no such file or folder (--query)")
    return out


def predictions_csv(paths: list[Path], classes: list[str], proba) -> str:
    """The output table as CSV text."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*FIXED_COLUMNS, *classes])
    for path, row in zip(paths, proba, strict=True):
        best = int(row.argmax())
        writer.writerow([str(path), classes[best], f"{row[best]:.6f}", *(f"{p:.6f}" for p in row)])
    return buf.getvalue()


def classify(args: argparse.Namespace) -> str:
    """Run ``leo classify``; return the CSV text (also written to ``--out`` when given)."""
    from leo.classify.classifier import FewShotClassifier
    from leo.utils.device import resolve_device

    device = resolve_device(args.device, "--device")
    support, labels = support_set(Path(args.support))
    queries = query_set([Path(q) for q in args.query])
    clf = FewShotClassifier.load(
        args.bundle, device=device, batch_size=args.batch_size, cpu_threads=args.threads
    )
    clf.fit(support, labels)
    proba = clf.predict_proba(queries)
    text = predictions_csv(queries, [str(c) for c in clf.classes_], proba)
    if args.out:
        write_text(args.out, text)
    return text


def parser() -> argparse.ArgumentParser:
    """The ``leo`` argument parser."""
    top = argparse.ArgumentParser(prog="leo", description="LEO few-shot classification.")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser(
        "classify",
        help="classify query images with an exported bundle and a support set",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--bundle", required=True, help="bundle directory (data/export/<run>)")
    p.add_argument("--support", required=True, help="folder with one folder of images per class")
    p.add_argument("--query", required=True, nargs="+", help="image files or folders of images")
    p.add_argument("--out", help="CSV file to write (default: stdout)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:<i> or auto")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument(
        "--threads", type=int, default=1, help="CPU threads (default 1; 0: torch's default)"
    )
    return top


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``leo`` console script."""
    args = parser().parse_args(argv)
    if args.command is None:
        parser().print_help(sys.stderr)
        sys.exit(2)
    try:
        if args.batch_size < 1:
            raise LeoInputError(f"--batch-size must be at least 1, got {args.batch_size}")
        if args.threads < 0:
            raise LeoInputError(f"--threads must be 0 or more, got {args.threads}")
        text = classify(args)
    except LeoInputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if not args.out:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
