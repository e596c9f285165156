"""``torch.compile`` where a config asks for it: the one switch every compiled path uses.

``enabled`` is ``True``, ``False`` or ``"auto"``: ``"auto"`` compiles on CUDA only, since on
a CPU at Omniglot's sizes the compiled step is no faster and costs about a minute to build.
Shapes are static (``dynamic=False``): an episode batch has one shape per config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

CompileSetting = bool | Literal["auto"]


def should_compile(enabled: CompileSetting, device: torch.device | str | None = None) -> bool:
    """Whether ``enabled`` means compiling on ``device`` (``"auto"``: only on CUDA)."""
    if enabled == "auto":
        return torch.device(device).type == "cuda" if device is not None else False
    return bool(enabled)


def maybe_compile(
    fn: Callable[..., Any], enabled: CompileSetting, device: torch.device | str | None = None
) -> Callable[..., Any]:
    """``torch.compile(fn, dynamic=False)`` when :func:`should_compile`, else ``fn`` itself."""
    return torch.compile(fn, dynamic=False) if should_compile(enabled, device) else fn
