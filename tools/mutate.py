"""Mutation testing: does each module's test file notice when the module is subtly wrong?

`make mutate` (or `python tools/mutate.py fanout/egress.py=tests/test_egress.py ...`).
Each mutant flips one thing in the module's syntax tree (a comparison, a boolean
operator, a constant, a return value, an arithmetic operator, break/continue),
is written into a copy of the package that shadows the real one on PYTHONPATH,
and the module's tests run against it. A mutant the tests do not fail is a
survivor: untested behaviour, or an equivalent mutant (the program means the same).
An equivalent mutant is marked where it arises: `# equivalent: GtE -> Gt (why)` skips
that one mutation of the line, `# pragma: no mutate (why)` every mutation of it.
Prints, per module, killed/total and every survivor.

Why our own: mutmut 3 finds mutated code only under `src/` or the top level, and
this package lives under layers/fanout (the Lambda layer), installed in
development mode; cosmic-ray needs a session database and a config per module.
"""

from __future__ import annotations

import argparse
import ast
import copy
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "layers" / "fanout" / "fanout"
DEFAULT_TARGETS = [
    "fanout/egress.py=tests/test_egress.py",
    "fanout/targets.py=tests/test_targets.py",
    "fanout/engine.py=tests/test_engine.py",
    "fanout/pinning.py=tests/test_pinning.py,tests/test_egress.py",
    "fanout/transport_pyreqwest.py=tests/test_transports.py,tests/test_pinning.py,tests/test_egress.py",
    "fanout/batch.py=tests/test_batch.py,tests/test_observability.py,tests/test_politeness.py",
]

_COMPARE_SWAPS: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}
_BINARY_SWAPS: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.FloorDiv: ast.Mult,
    ast.Mod: ast.Mult,
    ast.BitOr: ast.BitAnd,
    ast.BitAnd: ast.BitOr,
    ast.RShift: ast.LShift,
    ast.LShift: ast.RShift,
}


@dataclass(frozen=True)
class Mutant:
    module: str
    index: int
    line: int
    description: str


def _untouchable(node: ast.AST) -> ast.AST | None:
    """The part of `node` never mutated: annotations, imports, TYPE_CHECKING blocks, __all__, Literal[...]."""
    if isinstance(node, ast.arg):
        return node.annotation
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return node.returns
    if isinstance(node, ast.AnnAssign):
        return node.annotation
    whole = (
        isinstance(node, ast.Import | ast.ImportFrom | ast.JoinedStr)
        or (isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
        or (isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets))
        or (isinstance(node, ast.Call) and ast.unparse(node.func).endswith("TypeVar"))
        or (isinstance(node, ast.Subscript) and ast.unparse(node.value) == "Literal")
    )
    return node if whole else None


def _skipped_nodes(tree: ast.Module) -> set[int]:
    """Ids of nodes never mutated: docstrings and what `_untouchable` names."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            skipped.update(id(child) for child in ast.walk(first))
        untouchable = _untouchable(node)
        if untouchable is not None:
            skipped.update(id(child) for child in ast.walk(untouchable))
    return skipped


def _mutations(node: ast.AST) -> Iterator[tuple[str, ast.AST | None]]:
    """(description, replacement) for each way to mutate `node`; a None replacement means: mutate in place."""
    if isinstance(node, ast.Compare):
        for position, op in enumerate(node.ops):
            swap = _COMPARE_SWAPS.get(type(op))
            if swap is not None:
                mutated = copy.deepcopy(node)
                mutated.ops[position] = swap()
                yield f"{type(op).__name__} -> {swap.__name__}", mutated
    elif isinstance(node, ast.BoolOp):
        other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        yield f"{type(node.op).__name__} -> {type(other).__name__}", ast.BoolOp(op=other, values=node.values)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        yield "drop not", node.operand
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        yield "drop unary minus", node.operand
    elif isinstance(node, ast.BinOp):
        swap = _BINARY_SWAPS.get(type(node.op))
        if swap is not None:
            yield f"{type(node.op).__name__} -> {swap.__name__}", ast.BinOp(left=node.left, op=swap(), right=node.right)
    elif isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool):
            yield f"{value} -> {not value}", ast.Constant(not value)
        elif isinstance(value, int | float):
            yield f"{value!r} -> {value + 1!r}", ast.Constant(value + 1)
        elif isinstance(value, str):
            yield f"{value[:20]!r} -> 'XX..XX'", ast.Constant(f"XX{value}XX")
    elif isinstance(node, ast.Return) and node.value is not None:
        if not (isinstance(node.value, ast.Constant) and node.value.value is None):
            yield "return None", ast.Return(value=None)
    elif isinstance(node, ast.Break):
        yield "break -> continue", ast.Continue()
    elif isinstance(node, ast.Continue):
        yield "continue -> break", ast.Break()


class _Replacer(ast.NodeTransformer):
    def __init__(self, target: int, replacement: ast.AST) -> None:
        self.target = target
        self.replacement = replacement

    def visit(self, node: ast.AST) -> ast.AST:
        if id(node) == self.target:
            return ast.copy_location(self.replacement, node)
        return self.generic_visit(node)


def mutants_of(path: Path, module: str) -> list[tuple[Mutant, str]]:
    """All mutants, each made from a fresh parse (node ids differ between parses, positions do not)."""
    source = path.read_text()
    lines = source.splitlines()
    count_tree = ast.parse(source)
    skipped = _skipped_nodes(count_tree)
    plan: list[tuple[int, int, int, str]] = []  # (node position in walk order, choice, line, description)
    for position, node in enumerate(ast.walk(count_tree)):
        if id(node) in skipped:
            continue
        line = getattr(node, "lineno", 0)
        if line and "pragma: no mutate" in lines[line - 1]:
            continue
        for choice, (description, _) in enumerate(_mutations(node)):
            if line and f"equivalent: {description}" in lines[line - 1]:
                continue
            plan.append((position, choice, line, description))
    out: list[tuple[Mutant, str]] = []
    for index, (position, choice, line, description) in enumerate(plan):
        tree = ast.parse(source)
        node = next(n for i, n in enumerate(ast.walk(tree)) if i == position)
        _, replacement = list(_mutations(node))[choice]
        assert replacement is not None
        mutated = _Replacer(id(node), replacement).visit(tree)
        out.append((Mutant(module, index, line, description), ast.unparse(ast.fix_missing_locations(mutated))))
    return out


def _run_tests(mutated_source: str, module: str, tests: list[str], timeout_s: float) -> bool:
    """True if the tests fail (the mutant is killed) against a package copy holding `mutated_source`."""
    with tempfile.TemporaryDirectory(prefix="mutant-") as scratch:
        package = Path(scratch) / "fanout"
        shutil.copytree(PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
        (Path(scratch) / module).write_text(mutated_source)
        env = {**os.environ, "PYTHONPATH": scratch, "PYTHONDONTWRITEBYTECODE": "1"}
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return True  # a mutant that hangs the tests is caught by them
        return done.returncode != 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", default=DEFAULT_TARGETS, help="module=test_file[,test_file] pairs")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    scores: list[tuple[str, int, int, list[Mutant]]] = []
    for target in args.targets:
        module, _, test_list = target.partition("=")
        tests = test_list.split(",")
        started = time.monotonic()
        baseline = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=ROOT)
        if baseline.returncode != 0:
            print(f"{module}: its tests fail unmutated; fix them first", file=sys.stderr)
            return 2
        timeout_s = 3 * (time.monotonic() - started) + 10
        mutants = mutants_of(PACKAGE.parent / module, module)
        print(f"{module}: {len(mutants)} mutants against {', '.join(tests)}", flush=True)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            run = functools.partial(_run_tests, module=module, tests=tests, timeout_s=timeout_s)
            killed = list(pool.map(run, [source for _, source in mutants]))
        survivors = [mutant for (mutant, _), dead in zip(mutants, killed, strict=True) if not dead]
        scores.append((module, len(mutants) - len(survivors), len(mutants), survivors))
        for mutant in survivors:
            print(f"  survived: {module}:{mutant.line}  {mutant.description}", flush=True)
    print("\nmutation score (killed / mutants)")
    for module, dead, total, _ in scores:
        print(f"  {module:<24} {dead:>4} / {total:<4} {100 * dead / max(total, 1):5.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
