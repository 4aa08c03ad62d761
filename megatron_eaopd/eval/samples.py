"""What the saved evaluation samples say: which mistakes, how often, at each evaluation.

The trainer writes ``<output_dir>/eval_samples/<who>_iter_<iteration>.jsonl``
(``eval.save_samples``; one JSON object per prompt with its responses, each with ``correct`` and,
when wrong, ``why``: the task's ``"<kind>: <detail>"`` reason).
This module counts the reasons' kinds per file::

    python -m megatron_eaopd.eval.samples runs/tiny-cpu

prints one row per evaluation (the teacher's first; per eval set when there are several) with the
saved responses, the fraction right and the fraction of responses per kind of mistake.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
from collections import Counter
from collections.abc import Sequence

__all__ = ["count_mistakes", "mistake_table", "read_samples"]

_NAME = re.compile(r"(?P<who>[a-z]+)_iter_(?P<iteration>[0-9]+)\.jsonl")


def read_samples(path: str | os.PathLike) -> list[dict]:
    """The records of one samples file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def count_mistakes(records: Sequence[dict]) -> tuple[int, int, Counter]:
    """(responses, right, Counter of the wrong ones' kinds: the text of ``why`` before its
    first ``:``, ``"wrong"`` when no reason was given)."""
    total, right, kinds = 0, 0, Counter()
    for record in records:
        for response in record["responses"]:
            total += 1
            if response["correct"]:
                right += 1
            else:
                kinds[(response.get("why") or "wrong").split(":")[0].strip()] += 1
    return total, right, kinds


def mistake_table(run_dir: str | os.PathLike) -> str:
    """A markdown table of :func:`count_mistakes` for every samples file of a run folder (or of
    the ``eval_samples`` folder itself), teacher first, then by iteration; one row per eval set
    when there are several. "right" is the fraction over the saved prompts only (the first
    ``eval.save_samples`` of each set), so it equals the logged Avg@k only when all are saved."""
    folder = os.path.join(run_dir, "eval_samples")
    folder = folder if os.path.isdir(folder) else str(run_dir)
    found = []
    for path in glob.glob(os.path.join(folder, "*_iter_*.jsonl")):
        m = _NAME.fullmatch(os.path.basename(path))
        if m:
            found.append((m["who"] != "teacher", int(m["iteration"]), m["who"], path))
    if not found:
        raise FileNotFoundError(f"no <who>_iter_<n>.jsonl samples files under {folder}")
    rows = []
    for _, iteration, who, path in sorted(found):
        by_set: dict[str, list[dict]] = {}
        for record in read_samples(path):
            by_set.setdefault(record["set"], []).append(record)
        for name, records in sorted(by_set.items()):
            label = f"{who} {iteration}" + (f" ({name})" if len(by_set) > 1 else "")
            rows.append((label, *count_mistakes(records)))
    names = sorted({k for *_, kinds in rows for k in kinds})
    head = ["evaluation", "responses", "right", *names]
    lines = ["| " + " | ".join(_cell(h) for h in head) + " |", "|" + "---|" * len(head)]
    for label, total, right, kinds in rows:
        cells = [label, str(total), _frac(right, total)] + [_frac(kinds[n], total) for n in names]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _frac(n: int, total: int) -> str:
    return f"{n / total:.3f}" if total else "-"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_eaopd.eval.samples",
        description="Count the kinds of mistakes in a run's saved evaluation samples.",
    )
    parser.add_argument("run_dir", help="a run's output folder (or its eval_samples folder)")
    args = parser.parse_args(argv)
    try:
        print(mistake_table(args.run_dir))
    except FileNotFoundError as e:
        parser.exit(2, f"error: {e} (the trainer writes them when eval.save_samples is not 0)\n")


if __name__ == "__main__":
    main()
