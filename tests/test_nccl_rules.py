"""Rules of NCCL that the gloo tests cannot see, checked on the source of the package, the
examples, the benchmarks and the tests (a desk audit of every collective found one break of each;
docs/parallelism.md).

* A call of ``init_process_group`` (any module prefix, or a name imported for it) that may start
  NCCL - any backend but the literal "gloo" - must come after a ``set_device`` call in the same
  scope (function, or module level), or pass ``device_id``: without it every rank of a node
  takes GPU 0 (the plugin example did; ``parallel.init.device_problem`` warns at run time too).
  Not seen: a ``set_device`` that never runs (a branch), a binding made in another function.
* Reductions use operations NCCL has: gloo also has the bitwise BAND / BOR / BXOR, NCCL does
  not (``ReduceOp`` or ``reduce_op``, any prefix, or a name imported for them).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [
    p
    for d in ("megatron_eaopd", "examples", "benchmarks", "tests")
    for p in (ROOT / d).rglob("*.py")
]
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


def _name(node: ast.AST) -> str:
    """The called name's last part: dist.init_process_group -> init_process_group."""
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def _aliases(tree: ast.AST, name: str) -> set:
    """``name`` and the names ``from ... import name as other`` binds for it."""
    out = {name}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            out |= {a.asname for a in node.names if a.name == name and a.asname}
    return out


def _own_nodes(scope: ast.AST):
    """The nodes of ``scope``'s own body, not those of functions or classes defined in it."""
    todo = list(ast.iter_child_nodes(scope))
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, _SCOPES):
            todo.extend(ast.iter_child_nodes(node))


def _gloo_only(call: ast.Call) -> bool:
    backend = (
        call.args[0]
        if call.args
        else next((k.value for k in call.keywords if k.arg == "backend"), None)
    )
    return isinstance(backend, ast.Constant) and backend.value == "gloo"


def nccl_starts_without_a_device(source: str) -> list[int]:
    """Lines of ``init_process_group`` calls that may start NCCL with neither a ``set_device``
    call before them in their scope nor ``device_id``."""
    tree = ast.parse(source)
    starts = _aliases(tree, "init_process_group")
    bad = []
    for scope in [tree] + [n for n in ast.walk(tree) if isinstance(n, _SCOPES)]:
        calls = [n for n in _own_nodes(scope) if isinstance(n, ast.Call)]
        bound = [c.lineno for c in calls if _name(c.func) == "set_device"]
        for c in calls:
            if _name(c.func) not in starts or _gloo_only(c):
                continue
            if any(k.arg == "device_id" for k in c.keywords):
                continue
            if not any(line < c.lineno for line in bound):
                bad.append(c.lineno)
    return sorted(bad)


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
    aliased = "from torch.distributed import init_process_group as ipg\nipg('nccl')\n"
    assert nccl_starts_without_a_device(aliased) == [2]  # an alias, at module level
    nested = "def f():\n    def g():\n        torch.cuda.set_device(0)\n    ipg = 1\n"
    nested += "    torch.distributed.init_process_group('nccl')\n"
    assert nccl_starts_without_a_device(nested) == [5]  # another function's binding
    bound = "init_process_group('nccl', device_id=torch.device('cuda', 0))\n"
    assert nccl_starts_without_a_device(bound) == []


def test_reductions_use_operations_nccl_has():
    used = {}
    for p in SOURCES:
        tree = ast.parse(p.read_text(encoding="utf-8"))
        ops = _aliases(tree, "ReduceOp") | _aliases(tree, "reduce_op")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _name(node.value) in ops:
                used.setdefault(node.attr, set()).add(str(p.relative_to(ROOT)))
    assert "SUM" in used and "MAX" in used  # the search finds them
    nccl_lacks = {op: files for op, files in used.items() if op in ("BAND", "BOR", "BXOR")}
    assert not nccl_lacks, f"reductions NCCL does not have: {nccl_lacks}"
