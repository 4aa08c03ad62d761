"""End-of-run report of one training run: a before/after table and a PNG of its curves.

Both read the run's ``metrics.jsonl`` (rows with ``split`` teacher / eval / train and
``iteration``), so they work on a finished run folder as well as at the end of the main job.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "before_after",
    "common_k",
    "format_before_after",
    "plot_run",
    "plot_run_file",
    "read_rows",
]

#: (column title, metric key pattern; {k} is eval.k)
COLUMNS = (
    ("Avg@{k}", "mean/avg@{k}"),
    ("Pass@{k}", "mean/pass@{k}"),
    ("Pass@1", "mean/pass@1"),
    ("resp. tokens", "response_length"),
)


def read_rows(path: str | os.PathLike) -> list[dict]:
    """All rows of a ``metrics.jsonl`` (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def before_after(rows: Sequence[dict], k: int = 8) -> list[tuple[str, dict]]:
    """``[(label, metrics)]`` for the teacher, the student at its first evaluation and at its
    last one (labels name the iterations). Missing rows are left out."""
    out = []
    teacher = [r for r in rows if r.get("split") == "teacher"]
    evals = sorted((r for r in rows if r.get("split") == "eval"), key=lambda r: r["iteration"])
    if teacher:
        out.append(("teacher", teacher[-1]))
    if evals:
        out.append((f"student, iteration {evals[0]['iteration']}", evals[0]))
        if len(evals) > 1:
            out.append((f"student, iteration {evals[-1]['iteration']}", evals[-1]))
    return out


def common_k(metrics: Sequence[dict], k: int) -> int:
    """``k`` when every row holds Avg@k, else the largest k that every row holds (a run resumed
    with another ``eval.k`` has both in its records), else ``k``."""
    have = [{int(key.rsplit("@", 1)[1]) for key in m if key.startswith("mean/avg@")}
            for m in metrics]  # fmt: skip
    shared = set.intersection(*have) if have else set()
    return k if k in shared or not shared else max(shared)


def format_before_after(rows: Sequence[dict], k: int = 8) -> str:
    """A short Markdown table of :func:`before_after` (Avg@k, Pass@k, Pass@1, response length)
    with the student's change from its first to its last evaluation."""
    table = before_after(rows, k)
    if not table:
        return "(no evaluation rows)"
    k = common_k([m for _, m in table], k)
    cols = [(title.format(k=k), key.format(k=k)) for title, key in COLUMNS]
    cols = [(t, key) for t, key in cols if any(key in m for _, m in table)]
    cols = list(dict(cols).items())  # k = 1: Pass@k is Pass@1, one column

    def cell(value, key, signed=False):
        if value is None:
            return "-"
        digits = 1 if key == "response_length" else 3
        return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"

    body = [[label] + [cell(m.get(key), key) for _, key in cols] for label, m in table]
    students = [m for label, m in table if label.startswith("student")]
    if len(students) == 2:
        first, last = students
        change = ["change"]
        for _, key in cols:
            a, b = first.get(key), last.get(key)
            change.append(cell(None if a is None or b is None else b - a, key, signed=True))
        body.append(change)
    header = ["model"] + [t for t, _ in cols]
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]

    def line(cells):
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                  enumerate(zip(cells, widths))]  # fmt: skip
        return "| " + " | ".join(padded) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in body)])


def plot_run_file(metrics: str, png: str, k: int = 8, title: str = "") -> Path | None:
    """:func:`plot_run` of the records in the file ``metrics`` (nothing when there is none),
    for the end of a run, after its final save: a write that fails (a full disk) is a warning,
    and the cut-short PNG is removed."""
    import contextlib
    import logging

    try:
        if os.path.exists(metrics):
            return plot_run(read_rows(metrics), png, k, title)
    except OSError as err:
        logging.getLogger(__name__).warning("no %s: %s", png, err)
        with contextlib.suppress(OSError):
            os.remove(png)
    return None


def plot_run(rows: Sequence[dict], path: str | os.PathLike, k: int = 8, title: str = "") -> Path:
    """Write the curves of one run to a PNG: Avg@k and Pass@k of the student over iterations
    (the teacher as a flat line), the student's and the teacher's high-entropy token fractions
    on the student's samples, the forward KL on the teacher's high-entropy tokens, and the
    sampled reverse KL and forward KL of the training rollouts. Uses matplotlib when installed,
    else a small built-in renderer (:mod:`megatron_eaopd.eval.plot`)."""
    from megatron_eaopd.eval.plot import plot_curves

    evals = sorted((r for r in rows if r.get("split") == "eval"), key=lambda r: r["iteration"])
    train = sorted((r for r in rows if r.get("split") == "train"), key=lambda r: r["iteration"])
    teacher = [r for r in rows if r.get("split") == "teacher"]
    last_it = evals[-1]["iteration"] if evals else 0

    def series(source, key):
        return [(r["iteration"], r[key], 0.0) for r in source if r.get(key) is not None]

    curves: dict[str, dict] = {}
    k = common_k(evals, k)
    for key in (f"mean/avg@{k}", f"mean/pass@{k}"):
        curves[key] = {"student": series(evals, key)}
        if teacher and teacher[-1].get(key) is not None:
            v = teacher[-1][key]
            curves[key]["teacher"] = [(0, v, 0.0), (last_it, v, 0.0)]
    curves["high-entropy fraction"] = {
        "student": series(evals, "student_high_frac"),
        "teacher (same tokens)": series(evals, "teacher_high_frac"),
    }
    curves["fkl_high"] = {"student": series(evals, "fkl_high")}
    for key in ("rkl_sampled", "fkl"):
        if any(key in r for r in train):
            curves[f"train {key}"] = {"student": series(train, key)}
    curves = {m: {n: pts for n, pts in c.items() if pts} for m, c in curves.items()}
    curves = {m: c for m, c in curves.items() if c}
    return plot_curves(curves, path, title=title or "run", force=True)
