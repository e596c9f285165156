"""Where the real datasets are: ``$LEO_DATA_DIR``, else the folder ``data`` of the ``shared``
folder beside the repository (the default below)."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LEO_DATA_DIR") or REPO.parent / "shared" / "data")
OMNIGLOT = SHARED_DATA / "omniglot"
