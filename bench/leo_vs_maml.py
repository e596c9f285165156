"""Why does LEO trail MAML (and nearest-mean) on a pipeline's embeddings? A controlled sweep.

Trains LEO variants and MAML on the same embeddings with the same outer-step budget, then
scores every run on the same seeded test episodes (the paper's protocol, paired over
episodes). Prints one JSON object; with ``--markdown`` also a table. Each run records its
meta-train accuracy (averaged over the steps before its best validation) beside the best
meta-validation and the meta-test accuracy, so over-fitting shows as a gap.

    python bench/leo_vs_maml.py --embeddings data/embeddings --shots 1 --steps 4000 \\
        --variants leo maml leo:dropout=0 leo:kl_weight=0 --markdown

A variant is ``leo`` or ``maml`` followed by ``:field=value,field=value`` overrides of
LEOConfig / MAMLConfig (values parsed as YAML scalars). Runs go to ``--out/<variant>``; a
finished LEO run there is reused, MAML always retrains.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from leo.comparison.baselines import nearest_mean_cosine  # noqa: E402
from leo.comparison.maml import (  # noqa: E402
    load_maml_checkpoint,
    make_maml_config,
    maml_classifier,
    maml_train,
)
from leo.comparison.stats import paired_difference  # noqa: E402
from leo.core.config import make_config  # noqa: E402
from leo.data.store import read_embeddings  # noqa: E402
from leo.meta.evaluate import eval_sampler, evaluate_classifier, leo_classifier  # noqa: E402
from leo.meta.train import load_checkpoint, meta_train  # noqa: E402

SHARED = ("num_shots", "num_steps", "validate_every", "val_batches", "val_batch_size", "seed")


def parse_variant(text: str) -> tuple[str, dict]:
    """``"leo:dropout=0,outer_lr=3e-4"`` -> ``("leo", {"dropout": 0, "outer_lr": 0.0003})``."""
    kind, _, rest = text.partition(":")
    if kind not in ("leo", "maml"):
        raise SystemExit(f"--variants: {text!r} must start with leo or maml")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--variants: {item!r} in {text!r} is not field=value")
        overrides[key] = yaml.safe_load(value)
    return kind, overrides


def train_accuracy_before_best(history: list[dict], best_step: int) -> float:
    """Mean meta-train accuracy over the logged windows up to the best validation."""
    rows = [float(r["train_accuracy"]) for r in history if int(r["step"]) <= best_step]
    return float(np.mean(rows)) if rows else float("nan")


def run_variant(text, args, splits, base_fields):
    kind, overrides = parse_variant(text)
    out = Path(args.out) / text.replace(":", "_").replace(",", "_").replace("=", "-")
    start = time.perf_counter()
    if kind == "leo":
        cfg = make_config(args.preset, **{**base_fields, "compile": False, **overrides})
        result = meta_train(cfg, splits["train"], splits["val"], out, progress=False)
        params, cfg, _ = load_checkpoint(result.checkpoint)
        classifier = leo_classifier(params, cfg)
    else:
        shared = {k: base_fields[k] for k in SHARED if k in base_fields}
        cfg = make_maml_config(**{**shared, "outer_lr": base_fields["outer_lr"], "compile": False})
        cfg = make_maml_config(**{**cfg.to_dict(), **overrides})
        result = maml_train(cfg, splits["train"], splits["val"], out, progress=False)
        params, cfg, _ = load_maml_checkpoint(result.checkpoint)
        classifier = maml_classifier(params, cfg)
    train_seconds = time.perf_counter() - start
    sampler = eval_sampler(splits["test"], make_config(args.preset, **base_fields))
    scored = evaluate_classifier(
        classifier, sampler, num_episodes=args.test_episodes, batch_size=200, seed=args.test_seed
    )
    likeness = prototype_likeness(classifier, sampler, args.likeness_episodes, args.test_seed)
    return {
        "variant": text,
        "best_step": result.best_step,
        "train_accuracy": train_accuracy_before_best(result.history, result.best_step),
        "val_accuracy": result.best_val_accuracy,
        "test_accuracy": scored.mean,
        "test_ci95": scored.ci95,
        "agreement_with_nearest_mean": likeness["agreement"],
        "cosine_to_class_means": likeness["cosine"],
        "train_seconds": train_seconds,
    }, scored.accuracies


@torch.no_grad()
def prototype_likeness(classifier, sampler, episodes: int, seed: int) -> dict[str, float]:
    """How close a method's classifiers are to nearest-mean (prototype) ones, on test episodes.

    ``agreement``: fraction of queries given the same class as nearest-mean-cosine;
    ``cosine``: mean cosine between a class's weight vector and its class mean, both centred
    over the episode's classes (softmax ignores a vector added to every class).
    """
    gen = torch.Generator(device=sampler.device).manual_seed(seed)
    idx = sampler.indices(episodes, gen)
    support = sampler.gather(idx.support)  # (B, N, K, D)
    queries = sampler.gather(idx.query)  # (B, N, Q, D)
    w, b = classifier(support)
    protos, _ = nearest_mean_cosine(support)

    def predict(weights, bias):
        logits = torch.einsum("bnqd,bmd->bnqm", queries, weights)
        return (logits if bias is None else logits + bias[:, None, None, :]).argmax(-1)

    agreement = (predict(w, b) == predict(protos, None)).float().mean()
    wc, pc = w - w.mean(1, keepdim=True), protos - protos.mean(1, keepdim=True)
    cosine = torch.nn.functional.cosine_similarity(wc, pc, dim=-1).mean()
    return {"agreement": float(agreement), "cosine": float(cosine)}


def markdown(rows: list[dict]) -> str:
    head = (
        "| variant | best step | meta-train acc | best val acc | test acc | "
        "Δ vs first (paired) | same class as nearest-mean | cos(w, class mean) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        diff = r.get("diff_vs_first")
        d = "—" if diff is None else f"{100 * diff['mean']:+.2f} ± {100 * diff['ci95']:.2f}"
        lines.append(
            f"| {r['variant']} | {r['best_step']} | {100 * r['train_accuracy']:.2f} | "
            f"{100 * r['val_accuracy']:.2f} | {100 * r['test_accuracy']:.2f} ± "
            f"{100 * r['test_ci95']:.2f} | {d} | {100 * r['agreement_with_nearest_mean']:.1f}% | "
            f"{r['cosine_to_class_means']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--embeddings", default="data/embeddings", help="dir with {train,val,test}.parquet"
    )
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--preset", default="default")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--validate-every", type=int, default=500)
    p.add_argument("--outer-lr", type=float, default=1e-3)
    p.add_argument("--test-episodes", type=int, default=10_000)
    p.add_argument("--test-seed", type=int, default=1)
    p.add_argument(
        "--likeness-episodes", type=int, default=1000, help="for the nearest-mean likeness"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="tmp/leo_vs_maml")
    p.add_argument("--variants", nargs="+", default=["leo", "maml"])
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    splits = {
        s: read_embeddings(Path(args.embeddings) / f"{s}.parquet") for s in ("train", "val", "test")
    }
    base_fields = {
        "num_shots": args.shots,
        "num_steps": args.steps,
        "validate_every": args.validate_every,
        "val_batches": 10,
        "val_batch_size": 200,
        "outer_lr": args.outer_lr,
    }
    rows, accs = [], []
    for text in args.variants:
        row, acc = run_variant(text, args, splits, base_fields)
        if accs:
            d = paired_difference(acc, accs[0])
            row["diff_vs_first"] = {"mean": d.mean, "ci95": d.ci95}
        rows.append(row)
        accs.append(acc)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(
        json.dumps(
            {"shots": args.shots, "steps": args.steps, "embeddings": args.embeddings, "runs": rows},
            indent=1,
        )
    )
    if args.markdown:
        print(markdown(rows))


if __name__ == "__main__":
    main()
