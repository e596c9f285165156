"""What every stage shares: reading its section of ``params.yaml`` and failing in one line.

Each stage is ``python -m stages.<name>``: it reads ``base`` plus its own section, calls
into the ``leo`` package, and on bad input prints ``error: <one line>`` to stderr and exits 2
(nothing half-written: the package writes atomically).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from leo.errors import LeoInputError

PARAMS_FILE = Path(os.environ.get("LEO_PARAMS", "params.yaml"))


def load_params(section: str, path: str | Path | None = None) -> dict[str, Any]:
    """Return ``{"base": ..., **params[section]}`` from ``params.yaml``.

    Raises:
        LeoInputError: the file is missing or not YAML, or a section is missing.
    """
    path = Path(path) if path is not None else PARAMS_FILE
    if not path.is_file():
        raise LeoInputError(f"{path}: params file not found")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise LeoInputError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(params, dict):
        raise LeoInputError(f"{path}: expected a mapping at the top level")
    for key in ("base", section):
        if not isinstance(params.get(key), dict):
            raise LeoInputError(f"{path}: missing or malformed section '{key}'")
    _apply_cpu_threads(params["base"], path)
    return {"base": params["base"], **params[section]}


def _apply_cpu_threads(base: dict[str, Any], path: Path) -> None:
    """Set torch's CPU intra-op threads from ``base.cpu_threads`` (0 or absent: torch's default).

    On a 2-core machine the small kernels of LEO run several times slower with 2 OpenMP
    threads as soon as anything else uses the CPU, so the default params say 1.
    """
    threads = base.get("cpu_threads", 0)
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
        raise LeoInputError(f"{path}: key 'base.cpu_threads' must be an integer >= 0")
    if threads:
        import torch

        torch.set_num_threads(threads)


def require(params: dict[str, Any], key: str, kind: type | tuple[type, ...], section: str) -> Any:
    """Return ``params[key]`` if it has type ``kind``, else raise naming ``section.key``."""
    if key not in params:
        raise LeoInputError(f"{PARAMS_FILE}: missing key '{section}.{key}'")
    value = params[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        names = "/".join(t.__name__ for t in _as_tuple(kind))
        raise LeoInputError(f"{PARAMS_FILE}: key '{section}.{key}' must be {names}, got {value!r}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


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
