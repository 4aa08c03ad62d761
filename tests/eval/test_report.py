"""End-of-run report: the before/after table and the run PNG (with and without matplotlib)."""

from __future__ import annotations

import json
import struct
import zlib

from megatron_eaopd.eval import plot as plot_mod
from megatron_eaopd.eval.report import before_after, format_before_after, plot_run, read_rows

ROWS = [
    {"split": "teacher", "iteration": 0, "mean/avg@8": 0.91, "mean/pass@8": 1.0,
     "mean/pass@1": 0.91, "response_length": 30.0},
    {"split": "eval", "iteration": 0, "mean/avg@8": 0.2, "mean/pass@8": 0.5, "mean/pass@1": 0.2,
     "response_length": 33.0, "student_high_frac": 0.3, "teacher_high_frac": 0.15,
     "fkl_high": 0.4},
    {"split": "train", "iteration": 1, "rkl_sampled": 0.5, "fkl": 0.3},
    {"split": "eval", "iteration": 10, "mean/avg@8": 0.35, "mean/pass@8": 0.75,
     "mean/pass@1": 0.35, "response_length": 31.5, "student_high_frac": 0.2,
     "teacher_high_frac": 0.14, "fkl_high": 0.3},
    {"split": "train", "iteration": 10, "rkl_sampled": 0.4, "fkl": 0.25},
    {"split": "eval", "iteration": 20, "mean/avg@8": 0.5, "mean/pass@8": 0.875,
     "mean/pass@1": 0.5, "response_length": 30.5, "student_high_frac": 0.18,
     "teacher_high_frac": 0.14, "fkl_high": 0.2},
]  # fmt: skip


def test_before_after_rows_and_table():
    table = before_after(ROWS)
    assert [label for label, _ in table] == [
        "teacher", "student, iteration 0", "student, iteration 20",
    ]  # fmt: skip
    text = format_before_after(ROWS)
    lines = text.splitlines()
    assert lines[0].split("|")[2].strip() == "Avg@8"
    assert "| teacher" in lines[2] and "0.910" in lines[2]
    change = lines[-1]
    assert change.startswith("| change") and "+0.300" in change and "+0.375" in change
    assert "-2.5" in change  # response length, one decimal
    assert len({len(line) for line in lines}) == 1  # aligned columns
    assert format_before_after([]) == "(no evaluation rows)"


def test_table_after_a_resume_with_another_eval_k():
    """A finished run of eval.k=8 shown again with eval.k=4 (a resume with another k): the
    table uses the k that every row holds instead of dropping the Avg@k and Pass@k columns."""
    text = format_before_after(ROWS, k=4)
    assert text.splitlines()[0].split("|")[2].strip() == "Avg@8"
    assert "+0.300" in text.splitlines()[-1]
    mixed = [dict(r, **{"mean/avg@4": 0.1}) if r["split"] != "train" else r for r in ROWS]
    assert format_before_after(mixed, k=4).splitlines()[0].split("|")[2].strip() == "Avg@4"
    assert format_before_after(mixed, k=8).splitlines()[0].split("|")[2].strip() == "Avg@8"


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_run_writes_a_png_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setattr(plot_mod, "matplotlib_available", lambda: False)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = plot_run(read_rows(metrics), tmp_path / "run" / "curves.png", 8, "tiny")
    data = out.read_bytes()
    width, height = _png_size(data)
    assert width > 400 and height > 300
    # the image data decompresses to one filter byte plus RGB per row
    idat = data.index(b"IDAT")
    (n,) = struct.unpack(">I", data[idat - 4 : idat])
    raw = zlib.decompress(data[idat + 4 : idat + 4 + n])
    assert len(raw) == height * (1 + 3 * width)
    assert len(set(raw)) > 3  # something was drawn
    # without force the public plot keeps its old contract
    assert plot_mod.plot_curves({"a": {"x": [(0, 1.0, 0.0)]}}, tmp_path / "x.png") is None


def test_a_table_of_one_sample_per_prompt_has_one_pass_at_1_column():
    """eval.k=1: Pass@k is Pass@1, which the table printed twice."""
    one = [{"split": s, "iteration": i, "mean/avg@1": v, "mean/pass@1": v, "response_length": 9.0}
           for s, i, v in (("teacher", 0, 0.9), ("eval", 0, 0.2), ("eval", 4, 0.5))]  # fmt: skip
    header = [c.strip() for c in format_before_after(one, k=1).splitlines()[0].split("|")[1:-1]]
    assert header == ["model", "Avg@1", "Pass@1", "resp. tokens"]
