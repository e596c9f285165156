"""Stage ``check``: validate the whole ``params.yaml`` whenever any of it changes.

Usage: ``python -m stages.check``. Every stage validates every section before it runs, but
a key that no stage depends on (a device, a batch size of inference) changes no stage, so
``dvc repro`` would run nothing and never read it. This stage depends on the whole file
(``params: - params.yaml:`` in ``dvc.yaml``): any edit reruns it, and a bad value anywhere
stops ``dvc repro`` with one line before anything else runs. Its output,
``data/check/params.ok``, is the same bytes whatever the params, so the stages after it
rerun only for their own reasons.
"""

from __future__ import annotations

from pathlib import Path

from leo.utils.atomic import write_text
from stages.common import settings, stage_main, where

OUT = Path("data/check/params.ok")


@stage_main
def main() -> None:
    """Validate ``params.yaml``; write the marker the first stages depend on."""
    settings()
    write_text(OUT, "params.yaml validated\n")
    print(f"check: {where()} is valid")


if __name__ == "__main__":
    main()
