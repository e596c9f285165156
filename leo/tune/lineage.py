"""What a search did: every trial's fitness over steps, who copied whom, the winner.

:func:`summarize` turns the results the trials reported (:func:`leo.tune.trial.trainable`'s
metrics, as :func:`result_row` keeps them) into

- ``histories``: ``{trial: [row, ...]}`` in reporting order, each row the loop's history
  row (``step``, ``val_accuracy``, ``val_ci95``, ``train_loss``, ``train_accuracy``,
  ``inner_lr_mean``, ``finetune_lr_mean``) plus the ``hyperparameters`` the interval ending
  there trained with, the Ray ``node`` it ran on, and for the first row after an exploit
  the ``source`` trial and ``source_step`` it continued from (else None). Steps rise within
  a trial except after an exploit of an older state (asynchronous PBT, :func:`segments`);
- ``lineage``: one event per exploit, ``{"trial", "step", "reached", "source", "changed":
  {name: [old, new]}}``: trial ``trial``, having reached outer step ``reached``, took
  ``source``'s whole state at outer step ``step`` and changed those hyperparameters from
  ``source``'s values;
- ``best``: the trial with the highest meta-validation accuracy at the last step (ties: the
  lowest-numbered), with its hyperparameters then.

Trials are named ``t0``, ``t1``, ... in the order the population was listed (``t0``: the
run's own hyperparameters), not by Ray's run-specific ids, so equal searches give equal
files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROW_FIELDS = (
    "step",
    "val_accuracy",
    "val_ci95",
    "train_loss",
    "train_accuracy",
    "inner_lr_mean",
    "finetune_lr_mean",
)


def trial_name(trial_id: str) -> str:
    """``t<k>`` for Ray's ``<experiment>_<k:05d>`` trial id."""
    return f"t{int(trial_id.rsplit('_', 1)[1])}"


def result_row(trial_id: str, result: dict[str, Any]) -> dict[str, Any]:
    """What :func:`summarize` needs of one reported result, trials named by :func:`trial_name`."""
    row = {k: result[k] for k in ROW_FIELDS if k in result}
    row["trial"] = trial_name(trial_id)
    row["hyperparameters"] = dict(result["hyperparameters"])
    row["node"] = result.get("node")
    exploit = result.get("exploit")
    if exploit:
        exploit = {**exploit, "source": trial_name(exploit["source"])}
    row["exploit"] = exploit
    return row


@dataclass
class Summary:
    """A search's outcome (see the module docstring)."""

    histories: dict[str, list[dict[str, Any]]]
    lineage: list[dict[str, Any]]
    best: dict[str, Any]

    @property
    def initial(self) -> dict[str, dict[str, Any]]:
        """Each trial's starting hyperparameters (those of its first segment)."""
        return {t: rows[0]["hyperparameters"] for t, rows in self.histories.items()}

    @property
    def nodes(self) -> list[str]:
        """The Ray nodes the trials ran on, in order of first use."""
        seen: dict[str, None] = {}
        for rows in self.histories.values():
            for row in rows:
                seen.setdefault(row["node"], None)
        return list(seen)


def _key(name: str) -> int:
    return int(name[1:])


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two rows report the same result (a trial restarted from the checkpoint
    before its last report trains and reports that interval again, identically)."""
    return all(a.get(k) == b.get(k) for k in (*ROW_FIELDS, "hyperparameters"))


def summarize(results: list[dict[str, Any]]) -> Summary:
    """Histories, lineage and best trial from :func:`result_row` rows, in reporting order."""
    histories: dict[str, list[dict[str, Any]]] = {}
    lineage: list[dict[str, Any]] = []
    for row in results:
        trial = row["trial"]
        rows = histories.setdefault(trial, [])
        entry = {k: v for k, v in row.items() if k not in ("trial", "exploit")}
        event = row["exploit"]
        entry["source"] = event["source"] if event else None
        entry["source_step"] = int(event["source_step"]) if event else None
        if rows and _same(rows[-1], entry):  # a result reported again after a restart
            continue
        if event:
            lineage.append(
                {
                    "trial": trial,
                    "step": int(event["source_step"]),
                    "reached": rows[-1]["step"] if rows else 0,
                    "source": event["source"],
                    "changed": event["changed"],
                }
            )
        rows.append(entry)
    if not histories:
        raise ValueError("the search reported no result")
    histories = dict(sorted(histories.items(), key=lambda item: _key(item[0])))
    last = max(rows[-1]["step"] for rows in histories.values())
    finals = {t: rows[-1] for t, rows in histories.items() if rows[-1]["step"] == last}
    winner = max(finals, key=lambda t: (finals[t]["val_accuracy"], -_key(t)))
    best = {
        "trial": winner,
        "step": last,
        "val_accuracy": finals[winner]["val_accuracy"],
        "val_ci95": finals[winner]["val_ci95"],
        "hyperparameters": finals[winner]["hyperparameters"],
    }
    return Summary(histories, lineage, best)


def segments(summary: Summary, trial: str) -> list[tuple[dict[str, Any] | None, list[dict]]]:
    """A trial's history cut at its exploits: ``[(start, rows), ...]``, where ``start`` is
    the source's row the segment continues from (None for the trial's own start)."""
    out: list[tuple[dict[str, Any] | None, list[dict]]] = []
    for row in summary.histories[trial]:
        if row["source"] is not None or not out:
            start = None
            if row["source"] is not None:
                same = [
                    r for r in summary.histories[row["source"]] if r["step"] == row["source_step"]
                ]
                start = same[-1] if same else None
            out.append((start, []))
        out[-1][1].append(row)
    return out
