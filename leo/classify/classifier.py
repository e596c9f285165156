"""``FewShotClassifier``: a bundle's frozen backbone and LEO, fitted to a user's support set.

Example::

    from PIL import Image
    from leo.classify import FewShotClassifier

    clf = FewShotClassifier.load("data/export/5shot")
    clf.fit([Image.open(p) for p in support_paths], support_labels)
    probabilities = clf.predict_proba(["query1.png", "query2.png"])  # (2, N), rows sum to 1
    labels = clf.predict(query_images)                                # clf.classes_[argmax]

Images may be PIL images (any mode and size), paths of image files, or uint8 NumPy arrays
``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` (a bool ``(H, W)`` array is a
1-bit image). Each goes through the prepare stage's conversion (:func:`~leo.data.raw.images.
prepare_image`: grey or RGB, Lanczos resize to the training size), the backbone in eval mode
(its buffers hold the training images' per-channel mean and std) and an L2 normalisation,
as the embed stage and the embedding store do. ``fit`` takes any N >= 2 classes and any
K_n >= 1 images of each (:func:`leo.classify.adapt.adapt_ragged`); the probabilities are the
softmax of the logits ``q . w_n`` that the pipeline's evaluation takes the argmax of.

On a CPU the work runs on ``cpu_threads`` intra-op threads (default 1, torch's setting put back
afterwards, :func:`leo.utils.device.cpu_threads`): a 20-way 1-shot task takes about 13 ms on
one thread of a shared 2-core machine, while two OpenMP threads that compete with another
process took up to 1.4 s (``bench/classify_speed.py``, 2026-12-02). Pass ``cpu_threads=0`` for
torch's default, e.g. for a WRN-28-10 on an idle many-core machine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from leo.backbone.wrn import to_input
from leo.classify.adapt import adapt_ragged
from leo.classify.bundle import Bundle, read_bundle
from leo.data.raw.images import decode_image, prepare_image
from leo.utils.device import DEFAULT_CPU_THREADS, cpu_threads, resolve_device
from leo.utils.errors import LeoInputError

ImageLike = Image.Image | np.ndarray | str | os.PathLike


def image_name(item: Any, index: int) -> str:
    """How messages name an image: its path, else its position."""
    return str(item) if isinstance(item, str | os.PathLike) else f"image {index}"


def _from_array(arr: np.ndarray, name: str) -> Image.Image:
    if arr.dtype == np.bool_ and arr.ndim == 2:
        return Image.fromarray(arr)
    if arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] in (1, 3, 4):
        return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    if arr.dtype == np.uint8 and arr.ndim == 2:
        return Image.fromarray(arr)
    raise LeoInputError(
        f"{name}: expected a uint8 array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got "
        f"{arr.dtype} {arr.shape}"
    )


class FewShotClassifier:
    """A few-shot classifier from an exported bundle (see the module docstring).

    Args:
        bundle: a loaded :class:`~leo.classify.bundle.Bundle`.
        device: ``cpu`` (default), ``cuda[:i]`` or ``auto``.
        batch_size: images per backbone forward pass.
        cpu_threads: intra-op threads on a CPU (0 or None: torch's setting).

    Attributes:
        classes_: the class labels after :meth:`fit`, sorted (column order of the outputs).
        weights_: ``(N, D)`` the adapted class weights after :meth:`fit`.
    """

    def __init__(
        self,
        bundle: Bundle,
        device: str | torch.device = "cpu",
        batch_size: int = 256,
        cpu_threads: int | None = DEFAULT_CPU_THREADS,
    ):
        self.bundle = bundle
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.cpu_threads = cpu_threads if self.device.type == "cpu" else None
        self.backbone = bundle.backbone.to(self.device).eval()
        self.params = {k: v.to(self.device) for k, v in bundle.params.items()}
        self.config = bundle.config
        self.preprocessing = bundle.preprocessing
        self.classes_: np.ndarray | None = None
        self.weights_: torch.Tensor | None = None

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        batch_size: int = 256,
        cpu_threads: int | None = DEFAULT_CPU_THREADS,
    ) -> FewShotClassifier:
        """Load the bundle directory ``path`` (no pickled code runs; see :mod:`~leo.classify.
        bundle`); the other arguments are the constructor's.

        Raises:
            LeoInputError: not a bundle, another format version, a damaged bundle.
        """
        return cls(read_bundle(path), device, batch_size, cpu_threads)

    # ------------------------------------------------------------------ images -> features
    def preprocess(self, images: Sequence[ImageLike] | np.ndarray) -> np.ndarray:
        """Images -> uint8 ``(n, H, W, C)`` at the training size and colour mode.

        Raises:
            LeoInputError: an unreadable image or an array of another dtype or shape, naming it.
        """
        size, channels = self.preprocessing.image_size, self.preprocessing.channels
        items = list(images)
        out = np.empty((len(items), size[0], size[1], channels), dtype=np.uint8)
        for i, item in enumerate(items):
            name = image_name(item, i)
            if isinstance(item, str | os.PathLike):
                try:
                    data = Path(item).read_bytes()
                except OSError as err:
                    raise LeoInputError(f"{name}: cannot read ({err.strerror or err})") from None
                out[i] = decode_image(data, size, channels, name)
                continue
            if isinstance(item, np.ndarray):
                item = _from_array(item, name)
            if not isinstance(item, Image.Image):
                raise LeoInputError(
                    f"{name}: expected a PIL image, a path or a uint8 array, got "
                    f"{type(item).__name__}"
                )
            try:
                out[i] = prepare_image(item, size, channels)
            except (OSError, ValueError) as err:
                raise LeoInputError(f"{name}: cannot convert image ({err})") from None
        return out

    @torch.no_grad()
    def embed_prepared(self, images: np.ndarray) -> torch.Tensor:
        """Prepared uint8 images ``(n, H, W, C)`` -> backbone features ``(n, D)`` (float32,
        on the classifier's device), each divided by its L2 norm (a zero row stays zero)."""
        feats = []
        with cpu_threads(self.cpu_threads):
            for s in range(0, len(images), self.batch_size):
                x = to_input(images[s : s + self.batch_size], self.device)
                feats.append(self.backbone.features(x).float())
        if not feats:
            return torch.zeros(0, self.bundle.backbone.config.feature_dim, device=self.device)
        f = torch.cat(feats)
        norms = torch.linalg.vector_norm(f, dim=1, keepdim=True)
        return f / torch.where(norms > 0, norms, torch.ones_like(norms))

    def embed(self, images: Sequence[ImageLike] | np.ndarray) -> torch.Tensor:
        """Images -> L2-normalised features ``(n, D)``: :meth:`preprocess`, then
        :meth:`embed_prepared`."""
        return self.embed_prepared(self.preprocess(images))

    # ------------------------------------------------------------------ fit / predict
    def fit(
        self, support_images: Sequence[ImageLike] | np.ndarray, labels: Sequence
    ) -> FewShotClassifier:
        """Adapt LEO to a support set: N >= 2 classes, K_n >= 1 images each.

        Args:
            support_images: the support images (see the module docstring for the types).
            labels: one label per image (strings or integers); ``classes_`` is their sorted
                set.

        Returns:
            ``self``.

        Raises:
            LeoInputError: a count mismatch, fewer than 2 classes, an unreadable image, an
                image whose features are all zero.
        """
        items = list(support_images)
        labels = list(labels)
        if len(items) != len(labels):
            raise LeoInputError(f"{len(items)} support images but {len(labels)} labels")
        classes, y = self._classes(labels)
        x = self.embed(items)
        zero = (x.abs().sum(dim=1) == 0).nonzero()
        if len(zero):
            i = int(zero[0])
            raise LeoInputError(
                f"{image_name(items[i], i)}: the backbone's features are all zero (a blank "
                "image?); it cannot serve as a support example"
            )
        return self.fit_embeddings(x, classes, y)

    def fit_embeddings(
        self, x: torch.Tensor, classes: np.ndarray, y: np.ndarray | torch.Tensor
    ) -> FewShotClassifier:
        """:meth:`fit` from L2-normalised features ``(M, D)`` and label indices ``(M,)`` into
        ``classes`` (every class present)."""
        y = torch.as_tensor(y, dtype=torch.int64, device=self.device)
        with torch.no_grad(), cpu_threads(self.cpu_threads):
            out = adapt_ragged(self.params, x.to(self.device), y, len(classes), self.config)
        self.classes_ = np.asarray(classes)
        self.weights_ = out["w_bar"]
        return self

    @staticmethod
    def _classes(labels: list) -> tuple[np.ndarray, np.ndarray]:
        try:
            classes, y = np.unique(np.asarray(labels), return_inverse=True)
        except TypeError as err:
            raise LeoInputError(f"labels must be all strings or all numbers ({err})") from None
        if len(classes) < 2:
            only = f" ({classes[0].item()!r})" if len(classes) else ""
            raise LeoInputError(
                f"the support set has {len(classes)} class{only}; a few-shot task needs at least 2"
            )
        return classes, y.reshape(-1)

    def logits_of(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(n, N)`` of L2-normalised features ``(n, D)``: ``x . w_n``."""
        if self.weights_ is None:
            raise LeoInputError("the classifier is not fitted: call fit(support, labels) first")
        return x.to(self.device) @ self.weights_.T

    def decision_function(self, images: Sequence[ImageLike] | np.ndarray) -> np.ndarray:
        """Logits ``(n, N)`` (float64), columns in ``classes_`` order."""
        return self.logits_of(self.embed(images)).double().cpu().numpy()

    def predict_proba(self, images: Sequence[ImageLike] | np.ndarray) -> np.ndarray:
        """Class probabilities ``(n, N)`` (float64, rows sum to 1), columns in ``classes_``
        order."""
        logits = self.logits_of(self.embed(images)).double()
        return torch.softmax(logits, dim=1).cpu().numpy()

    def predict(self, images: Sequence[ImageLike] | np.ndarray) -> np.ndarray:
        """The most probable class of each image, ``(n,)`` from ``classes_``."""
        proba = self.predict_proba(images)
        return self.classes_[proba.argmax(axis=1)]
