"""``.npz`` files whose bytes depend only on their arrays.

``numpy.savez`` stamps every member of the zip with the current time, so the same arrays
saved twice differ, and DVC would rebuild every stage downstream of an unchanged output.
:func:`write_npz` writes the same uncompressed ``.npy`` members (readable by ``numpy.load``
with ``allow_pickle=False``) with a fixed timestamp, atomically.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np
from numpy.lib import format as npy_format

from leo.utils.atomic import atomic_path

EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip member can carry


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Write ``arrays`` as an uncompressed ``.npz`` (members in the order given), atomically.

    Raises:
        ValueError: an object array (it would need pickling to store).
    """
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for name, value in arrays.items():
            array = np.asanyarray(value)
            if array.dtype.hasobject:
                raise ValueError(f"{name}: object arrays cannot be stored without pickling")
            info = zipfile.ZipInfo(f"{name}.npy", date_time=EPOCH)
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as member:
                npy_format.write_array(member, array, allow_pickle=False)
