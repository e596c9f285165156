"""Choosing a device and CPU threads: the one helper every stage and API call uses.

Device names are ``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda`` or
``cuda:<index>``. CPU threads: LEO's kernels are small (a 5-way episode is a few hundred
kilobytes), and on a small machine OpenMP's second thread costs more than it gives as soon
as anything else runs, so the API runs on ``DEFAULT_CPU_THREADS`` intra-op threads unless
told otherwise, and puts torch's setting back afterwards (:func:`cpu_threads`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from leo.utils.errors import LeoInputError
from leo.utils.validation import DEVICE_PATTERN

DEFAULT_CPU_THREADS = 1


def resolve_device(name: str | torch.device | None = "auto", what: str = "device") -> torch.device:
    """``auto``/None -> ``cuda`` when available else ``cpu``; ``cpu``, ``cuda[:i]`` as asked.

    Args:
        name: the device name (or a ``torch.device``, returned as it is).
        what: how to name the setting in the error (e.g. ``"params.yaml: metatrain.device"``).

    Raises:
        LeoInputError: an unknown name, or CUDA asked for where there is none.
    """
    if isinstance(name, torch.device):
        return name
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(name, str) or not DEVICE_PATTERN.match(name):
        raise LeoInputError(f"{what} must be auto, cpu, cuda or cuda:<index>, got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LeoInputError(f"{what} is {name!r} but CUDA is not available here")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise LeoInputError(
                f"{what} is {name!r} but there are {torch.cuda.device_count()} CUDA devices"
            )
    return torch.device(name)


@contextlib.contextmanager
def cpu_threads(threads: int | None = DEFAULT_CPU_THREADS) -> Iterator[None]:
    """Run the block with ``threads`` intra-op CPU threads (None or 0: leave torch's setting).

    The previous setting is restored afterwards.
    """
    if not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)
