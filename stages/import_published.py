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
  unpickled (``python -m leo.utils.hashing FILE`` or ``sha256sum`` prints them);
- ``train_on_val`` (optional, default false): meta-train on train + val classes.

Writes ``data/published/NAME/{train,val,test}.parquet`` (all or nothing, see
:mod:`leo.data.published`) and ``reports/published/NAME/metrics.json`` (the report's source
summary). Point ``embeddings.dir`` / ``embeddings.metrics`` of ``params.yaml`` at them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from leo.data.published import SPLITS, import_published
from leo.data.store import read_metadata
from leo.settings import Settings
from leo.utils.atomic import atomic_dir, write_json
from leo.utils.errors import LeoInputError
from stages.common import REPORTS, settings, stage_main, where

OUT = Path("data/published")


def run(name: str, params: Settings) -> dict[str, Any]:
    """Import entry ``name``; write the Parquet files and the summary; return the summary."""
    if name not in params.published.imports:
        names = ", ".join(params.published.imports) or "none"
        raise LeoInputError(f"{where()}: no entry 'published.imports.{name}' (entries: {names})")
    spec = params.published.imports[name]
    start = time.perf_counter()
    with atomic_dir(OUT / name) as tmp:
        paths = import_published(
            Path(spec.root),
            spec.dataset,
            spec.view,
            tmp,
            train_on_val=spec.train_on_val,
            expected_sha256=dict(spec.sha256),
        )
        meta = {split: read_metadata(path) for split, path in paths.items()}
    prov = meta["test"]["provenance"]
    summary = {
        "source": "published",
        "dataset": prov.get("dataset"),
        "view": prov.get("view"),
        "train_on_val": spec.train_on_val,
        "feature_dim": meta["test"]["embedding_dim"],
        **{f"{split}_rows": meta[split]["num_rows"] for split in SPLITS},
        "wall_seconds": time.perf_counter() - start,
    }
    write_json(REPORTS / "published" / name / "metrics.json", summary)
    return summary


@stage_main
def main() -> None:
    """Parse the flags, read ``params.yaml`` and run the stage."""
    parser = argparse.ArgumentParser(prog="python -m stages.import_published", description=__doc__)
    parser.add_argument("name", help="a key of published.imports in params.yaml")
    args = parser.parse_args()
    s = run(args.name, settings())
    print(
        f"import_published {args.name}: {s['dataset']}/{s['view']} -> {OUT / args.name} "
        f"({s['train_rows']}/{s['val_rows']}/{s['test_rows']} rows x {s['feature_dim']})"
    )


if __name__ == "__main__":
    main()
