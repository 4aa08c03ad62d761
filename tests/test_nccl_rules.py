"""Rules of NCCL that the gloo tests cannot see, checked on the source (a desk audit of every
collective found one break of each; docs/parallelism.md).

* A process that starts an NCCL (or backend-chosen) process group must first bind its GPU
  (``torch.cuda.set_device``) in the same function: without it every rank of a node takes GPU 0
  (the plugin example did; ``parallel.init.device_problem`` refuses it at run time too).
* Reductions use operations NCCL has: gloo also has the bitwise BAND / BOR / BXOR, NCCL does not.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    p for d in ("megatron_eaopd", "examples", "benchmarks") for p in (ROOT / d).rglob("*.py")
]


def _name(node: ast.AST) -> str:
    """The called name's last part: dist.init_process_group -> init_process_group."""
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def _gloo_only(call: ast.Call) -> bool:
    backend = (
        call.args[0]
        if call.args
        else next((k.value for k in call.keywords if k.arg == "backend"), None)
    )
    return isinstance(backend, ast.Constant) and backend.value == "gloo"


def nccl_starts_without_a_device(source: str) -> list[int]:
    """Lines of ``init_process_group`` calls that may start NCCL with no ``set_device`` call
    before them in the same function."""
    bad = []
    for func in ast.walk(ast.parse(source)):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        calls = [n for n in ast.walk(func) if isinstance(n, ast.Call)]
        bound = [c.lineno for c in calls if _name(c.func) == "set_device"]
        for c in calls:
            if _name(c.func) == "init_process_group" and not _gloo_only(c):
                if not any(line < c.lineno for line in bound):
                    bad.append(c.lineno)
    return bad


def test_every_nccl_start_binds_its_gpu_first():
    found = {
        str(p.relative_to(ROOT)): lines
        for p in SOURCES
        if (lines := nccl_starts_without_a_device(p.read_text(encoding="utf-8")))
    }
    assert not found, f"init_process_group without torch.cuda.set_device before it: {found}"
    # the rule sees the example's break as it was (negative control)
    before = (
        "def main():\n"
        "    dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo')\n"
    )
    assert nccl_starts_without_a_device(before) == [2]
    assert nccl_starts_without_a_device("def f():\n    dist.init_process_group('gloo')\n") == []


def test_reductions_use_operations_nccl_has():
    used = {}
    for p in SOURCES:
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and _name(node.value) == "ReduceOp":
                used.setdefault(node.attr, set()).add(str(p.relative_to(ROOT)))
    assert "SUM" in used and "MAX" in used  # the search finds them
    nccl_lacks = {op: files for op, files in used.items() if op in ("BAND", "BOR", "BXOR")}
    assert not nccl_lacks, f"reductions NCCL does not have: {nccl_lacks}"
