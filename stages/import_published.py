"""Stage ``import_published@<name>``: the LEO authors' published embeddings, into Parquet.

The alternative entry point of the pipeline: instead of ``download -> prepare -> pretrain ->
embed``, meta-train on the WRN-28-10 features published with the paper. Usage:
``python -m stages.import_published NAME``. Reads ``published.imports.NAME`` from
``params.yaml``:

- ``root``: the directory holding ``<dataset>/<view>/<split>_embeddings.pkl`` (relative
  paths are relative to the repository);
- ``dataset``: ``miniImageNet`` or ``tieredImageNet``; ``view``: ``center`` or ``multiview``
  (miniImageNet only);
- ``sha256``: ``{train, val, test}`` hex digests of the three pickles, checked before any is
  unpickled (``python -m leo.data.fetch FILE`` or ``sha256sum`` prints them);
- ``train_on_val`` (optional, default false): meta-train on train + val classes.

Writes ``data/published/NAME/{train,val,test}.parquet`` (all or nothing, see
:mod:`leo.published`) and ``reports/published/NAME/metrics.json`` (the report's source
summary). Point ``embeddings.dir`` / ``embeddings.metrics`` of ``params.yaml`` at them.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

from leo.atomic import atomic_dir, write_json
from leo.errors import LeoInputError
from leo.published import SPLITS, import_published
from leo.store import read_metadata
from stages.common import PARAMS_FILE, load_params, require, stage_main

OUT = Path("data/published")
REPORTS = Path("reports/published")
KEYS = {"root", "dataset", "view", "sha256", "train_on_val"}
HEX64 = re.compile(r"^[0-9a-f]{64}$")


def entry(params: dict[str, Any], name: str) -> dict[str, Any]:
    """Check ``published.imports.<name>`` and return its keyword arguments."""
    unknown = sorted(set(params) - {"base", "imports"})
    if unknown:
        raise LeoInputError(f"{PARAMS_FILE}: unknown key 'published.{unknown[0]}'")
    imports = require(params, "imports", dict, "published")
    if name not in imports:
        raise LeoInputError(
            f"{PARAMS_FILE}: no entry 'published.imports.{name}' "
            f"(entries: {', '.join(map(str, imports)) or 'none'})"
        )
    key = f"published.imports.{name}"
    spec = require(imports, name, dict, "published.imports")
    unknown = sorted(set(spec) - KEYS)
    if unknown:
        raise LeoInputError(f"{PARAMS_FILE}: unknown key '{key}.{unknown[0]}'")
    sha = require(spec, "sha256", dict, key)
    for split in SPLITS:
        digest = require(sha, split, str, f"{key}.sha256")
        if not HEX64.match(digest):
            raise LeoInputError(
                f"{PARAMS_FILE}: key '{key}.sha256.{split}' must be 64 lower-case hex digits"
            )
    extra = sorted(set(sha) - set(SPLITS))
    if extra:
        raise LeoInputError(f"{PARAMS_FILE}: unknown key '{key}.sha256.{extra[0]}'")
    train_on_val = require(spec, "train_on_val", bool, key) if "train_on_val" in spec else False
    return {
        "root": Path(require(spec, "root", str, key)),
        "dataset": require(spec, "dataset", str, key),
        "view": require(spec, "view", str, key),
        "train_on_val": train_on_val,
        "expected_sha256": dict(sha),
    }


def run(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Import entry ``name``; write the Parquet files and the summary; return the summary."""
    kwargs = entry(params, name)
    start = time.perf_counter()
    with atomic_dir(OUT / name) as tmp:
        paths = import_published(
            kwargs.pop("root"), kwargs.pop("dataset"), kwargs.pop("view"), tmp, **kwargs
        )
        meta = {split: read_metadata(path) for split, path in paths.items()}
    prov = meta["test"]["provenance"]
    summary = {
        "source": "published",
        "dataset": prov.get("dataset"),
        "view": prov.get("view"),
        "train_on_val": kwargs["train_on_val"],
        "feature_dim": meta["test"]["embedding_dim"],
        **{f"{split}_rows": meta[split]["num_rows"] for split in SPLITS},
        "wall_seconds": time.perf_counter() - start,
    }
    write_json(REPORTS / name / "metrics.json", summary)
    return summary


@stage_main
def main() -> None:
    """Parse the flags, read ``params.yaml`` and run the stage."""
    parser = argparse.ArgumentParser(prog="python -m stages.import_published", description=__doc__)
    parser.add_argument("name", help="a key of published.imports in params.yaml")
    args = parser.parse_args()
    s = run(args.name, load_params("published"))
    print(
        f"import_published {args.name}: {s['dataset']}/{s['view']} -> {OUT / args.name} "
        f"({s['train_rows']}/{s['val_rows']}/{s['test_rows']} rows x {s['feature_dim']})"
    )


if __name__ == "__main__":
    main()
