"""A bundle against the pipeline's evaluation, on the same seeded test episodes.

The pipeline evaluates LEO on stored embeddings (``data/embeddings/test.parquet``); the bundle
starts from images. :func:`check_bundle` draws episodes from the test embeddings exactly as
the evaluation does (:class:`~leo.meta.episodes.EpisodeSampler`, a seeded generator), scores
each one both ways, and reports how far apart they are: the bundle's features against the
stored ones, its class probabilities against the softmax of the evaluation's logits, and the
fraction of queries on which the two predictions agree. The export stage records the result
in the bundle's provenance.
"""

from __future__ import annotations

import numpy as np
import torch

from leo.classify.classifier import FewShotClassifier
from leo.core.config import LEOConfig
from leo.core.model import Params
from leo.data.prepared import PreparedSplit
from leo.meta.episodes import EpisodeSampler
from leo.meta.evaluate import leo_classifier
from leo.utils.errors import LeoInputError


def check_bundle(
    clf: FewShotClassifier,
    params: Params,
    cfg: LEOConfig,
    test,
    prepared: PreparedSplit,
    *,
    episodes: int,
    queries: int,
    seed: int,
    source: str = "test embeddings",
) -> dict:
    """Score ``episodes`` test episodes with the pipeline's LEO and with the bundle.

    Args:
        clf: the bundle's classifier.
        params, cfg: the meta-trained LEO, as the evaluation uses it.
        test: the test :class:`~leo.data.store.EmbeddingSplit` (L2-normalised rows).
        prepared: the prepared test images, whose ``ids`` the embeddings' example ids name.
        episodes: how many episodes (``cfg.num_classes``-way ``cfg.num_shots``-shot).
        queries: queries per class (lowered to what the smallest class allows).
        seed: the episodes' seed.
        source: how messages name the embeddings (their file).

    Returns:
        ``episodes``, ``queries_per_class``, ``agreement`` (fraction of queries with the same
        prediction), ``max_probability_difference``, ``max_feature_difference`` and the
        accuracies ``pipeline_accuracy`` / ``bundle_accuracy``.

    Raises:
        LeoInputError: an example id of the embeddings missing from the prepared images, or
            classes too small for one support and one query.
    """
    position = {str(i): p for p, i in enumerate(prepared.ids)}
    missing = [str(i) for i in test.example_ids if str(i) not in position]
    if missing:
        raise LeoInputError(
            f"{source}: example {missing[0]!r} is not among the prepared test images "
            "(embeddings and prepared data from different runs?)"
        )
    smallest = int(torch.bincount(test.labels).min())
    q = min(queries, smallest - cfg.num_shots)
    if q < 1:
        raise LeoInputError(
            f"{source}: the smallest class has {smallest} examples, too few for "
            f"{cfg.num_shots} shots and one query"
        )
    sampler = EpisodeSampler(
        test.embeddings, test.labels, cfg.num_classes, cfg.num_shots, q,
        class_names=test.class_names, split="test",
    )  # fmt: skip
    idx = sampler.indices(episodes, torch.Generator().manual_seed(seed))
    weights, _ = leo_classifier(params, cfg)(sampler.gather(idx.support))  # (B, N, D)
    n = cfg.num_classes
    agree = correct_pipe = correct_bundle = total = 0
    max_p = max_f = 0.0
    for b in range(episodes):
        rows_s, rows_q = idx.support[b].reshape(-1), idx.query[b].reshape(-1)
        y_s = np.repeat(np.arange(n), cfg.num_shots)
        y_q = np.repeat(np.arange(n), q)
        images = {
            kind: prepared.images[[position[str(test.example_ids[r])] for r in rows.tolist()]]
            for kind, rows in (("support", rows_s), ("query", rows_q))
        }
        feats = clf.embed_prepared(np.concatenate([images["support"], images["query"]]))
        stored = torch.cat([test.embeddings[rows_s], test.embeddings[rows_q]])
        max_f = max(max_f, float((feats.cpu() - stored.cpu()).abs().max()))
        clf.fit_embeddings(feats[: len(rows_s)], np.arange(n), y_s)
        p_bundle = torch.softmax(clf.logits_of(feats[len(rows_s) :]).double(), dim=1).cpu()
        logits = test.embeddings[rows_q] @ weights[b].T
        p_pipe = torch.softmax(logits.double(), dim=1).cpu()
        max_p = max(max_p, float((p_bundle - p_pipe).abs().max()))
        pred_b, pred_p = p_bundle.argmax(1).numpy(), p_pipe.argmax(1).numpy()
        agree += int((pred_b == pred_p).sum())
        correct_pipe += int((pred_p == y_q).sum())
        correct_bundle += int((pred_b == y_q).sum())
        total += len(y_q)
    return {
        "episodes": episodes,
        "queries_per_class": q,
        "agreement": agree / max(total, 1),
        "max_probability_difference": max_p,
        "max_feature_difference": max_f,
        "pipeline_accuracy": correct_pipe / max(total, 1),
        "bundle_accuracy": correct_bundle / max(total, 1),
    }
