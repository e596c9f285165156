"""The exported few-shot classifier: a bundle of the frozen backbone and LEO, the
``FewShotClassifier`` API over it, and the ``leo classify`` command.

- :mod:`leo.classify.adapt`: LEO's evaluation-mode adaptation for any shots per class;
- :mod:`leo.classify.bundle`: writing and reading the bundle directory (no pickled code);
- :mod:`leo.classify.classifier`: :class:`FewShotClassifier` (``load``, ``fit``,
  ``predict_proba``, ``predict``) on PIL images, paths or NumPy arrays;
- :mod:`leo.classify.check`: a bundle against the pipeline's evaluation on the same episodes;
- :mod:`leo.classify.cli`: ``leo classify --bundle DIR --support DIR --query PATH``.

Sits above ``leo.meta`` in the package's one-way imports (it uses the backbone, the LEO math
and the pipeline's evaluation).
"""

from __future__ import annotations

from typing import Any

__all__ = ["FewShotClassifier", "read_bundle", "write_bundle"]


def __getattr__(name: str) -> Any:
    """Load the public names on first use (``import leo.classify`` stays cheap)."""
    if name == "FewShotClassifier":
        from leo.classify.classifier import FewShotClassifier

        return FewShotClassifier
    if name in ("read_bundle", "write_bundle"):
        from leo.classify import bundle

        return getattr(bundle, name)
    raise AttributeError(f"module 'leo.classify' has no attribute {name!r}")
