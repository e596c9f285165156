"""What every stage shares: the validated ``params.yaml``, its flags, failing in one line.

Each stage is ``python -m stages.<name>``: it reads the whole ``params.yaml`` through
:func:`settings` (every section is validated before anything runs, so a bad key anywhere
stops every stage), calls into the ``leo`` package, and on bad input prints
``error: <one line>`` to stderr and exits 2 (nothing half-written: the package writes
atomically).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from leo.settings import Settings, load_settings, params_path
from leo.utils.atomic import write_json
from leo.utils.errors import LeoInputError


@functools.cache
def settings() -> Settings:
    """``params.yaml`` (or ``$LEO_PARAMS``), validated; sets torch's CPU threads from
    ``base.cpu_threads`` (0: torch's default) without importing torch for stages that do
    not need it (torch reads ``OMP_NUM_THREADS`` when it starts)."""
    loaded = load_settings()
    threads = loaded.base.cpu_threads
    if threads:
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
        else:
            os.environ["OMP_NUM_THREADS"] = str(threads)
    return loaded


def where() -> str:
    """The params file's name, for messages."""
    return str(params_path())


def stage_main(fn: Callable[[], None]) -> Callable[[], None]:
    """Decorate a stage's ``main``: a LeoInputError becomes one line on stderr and exit 2."""

    @functools.wraps(fn)
    def wrapper() -> None:
        try:
            fn()
        except LeoInputError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def parse_run_args(stage: str, description: str | None, splits: str) -> argparse.Namespace:
    """Flags of a per-run stage: ``RUN`` (a key of ``metatrain.runs``) and ``--embeddings``.

    Args:
        stage: the stage module's name, e.g. ``"evaluate"``.
        description: the module's docstring, for ``--help``.
        splits: the files it reads from the embeddings directory, e.g. ``"test.parquet"``.
    """
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=description)
    parser.add_argument("run", help="a key of metatrain.runs in params.yaml")
    parser.add_argument(
        "--embeddings",
        default="data/embeddings",
        help=f"directory of {splits} (default: data/embeddings)",
    )
    return parser.parse_args()


STAMP = "fingerprint.json"  # a work directory's inputs (prepare_work_dir)


def prepare_work_dir(work: Path, fingerprint: dict[str, Any]) -> bool:
    """A stage's resumable work directory, outside DVC's outs (which DVC clears before a run).

    ``work`` is kept (the stage resumes it) only if its ``fingerprint.json`` equals
    ``fingerprint`` (the inputs: config, device, data digests) and it holds more than that
    stamp; otherwise it is emptied and stamped. Returns whether the stage resumes.
    """
    stamp = work / STAMP
    fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back (tuples as lists)
    if stamp.is_file():
        try:
            same = json.loads(stamp.read_text()) == fingerprint
        except (json.JSONDecodeError, UnicodeDecodeError):
            same = False
        if same and any(p.name != stamp.name for p in work.iterdir()):
            return True
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    write_json(stamp, fingerprint)
    return False


# Where the stages read and write (dvc.yaml declares the same paths).
PREPARED = Path("data/prepared")
METATRAIN = Path("data/metatrain")
EVALUATE = Path("data/evaluate")
COMPARE = Path("data/compare")
REPORTS = Path("reports")
