#!/usr/bin/env python3
"""Structural checks on the package source, run by ``tests/test_structure.py`` (so CI runs them).

    python scripts/check_structure.py [--src src] [--json]

Four checks, each a function below that returns its findings (file:line and what was found):

* ``long-functions``: no function or method longer than :data:`MAX_FUNCTION_LINES` lines, counted
  from its ``def`` line to its last line (decorators excluded).
* ``defense-names``: no code outside ``bastion/defenses/`` compares a string with a defense's
  registered name (``bastion.defenses.list()``): ``defense == "sap"``, ``spec.defense in ("sap",
  "pcl")``, ``name not in ["clm"]`` and the like, or ``"none"`` compared with something named
  like a defense. Decide from what a model declares, never from a defense's name.
* ``worst-case``: the strings "worst-case" / "worst case" (any case; string literals, docstrings
  excluded) appear only in ``bastion/results/worst_case.py``, the one worst-case aggregation.
* ``import-cycles``: the module graph of the package has no cycle. Every ``import`` counts, those
  inside functions included, and a package's ``__init__`` is a module like any other (a package
  that imports its submodule, which imports the package back, is a cycle).

Exit status 0 when there is no finding, 1 otherwise. Uses only the standard library, except that
the defense names come from the installed ``bastion`` unless ``--defense-names`` gives them.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

PACKAGE = "bastion"
MAX_FUNCTION_LINES = 60
#: relative to the source root: where defense names may be compared, where "worst case" may appear
DEFENSES_DIR = Path(PACKAGE, "defenses")
WORST_CASE_MODULE = Path(PACKAGE, "results", "worst_case.py")
#: the name a config uses for "no defense"
NO_DEFENSE = "none"
WORST_CASE = re.compile(r"worst[- ]case", re.IGNORECASE)
CHECKS = ("long-functions", "defense-names", "worst-case", "import-cycles")


@dataclass(frozen=True)
class Finding:
    """One violation: the check, ``path:line`` and what was found (``details``: more lines)."""

    check: str
    path: str
    line: int
    message: str
    details: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        return "\n".join([f"{self.path}:{self.line}: {self.message}", *(f"    {d}" for d in self.details)])


def python_files(src: Path) -> list[Path]:
    """Every ``.py`` file under ``src``, sorted."""
    return sorted(p for p in src.rglob("*.py") if "__pycache__" not in p.parts)


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _rel(path: Path, src: Path) -> str:
    return path.relative_to(src).as_posix()


def _shown(path: Path, src: Path) -> str:
    """``path`` as printed: relative to the working directory when it lies below it."""
    try:
        return path.resolve().relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------ long functions
def long_functions(src: Path, limit: int = MAX_FUNCTION_LINES) -> list[Finding]:
    """Functions and methods (nested ones too) longer than ``limit`` lines, decorators excluded."""
    found = []
    for path in python_files(src):
        for node in ast.walk(_parse(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > limit:
                    msg = f"function {node.name!r} is {length} lines long (at most {limit})"
                    found.append(Finding("long-functions", _shown(path, src), node.lineno, msg))
    return found


# ------------------------------------------------------------------------------ defense names
def _strings(node: ast.expr, constants: dict[str, list[str]] | None = None) -> list[str]:
    """The string constants of ``node``: itself, the items of a tuple/list/set literal (also
    wrapped in ``frozenset(...)``, ``set(...)`` or ``tuple(...)``), or, for a name or attribute
    ``X`` / ``mod.X``, those of a module-level constant ``X`` of the package (``constants``)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("frozenset", "set", "tuple", "list")
        and len(node.args) == 1
    ):
        return _strings(node.args[0])
    if constants:
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
        return constants.get(name or "", [])
    return []


def string_constants(src: Path) -> dict[str, list[str]]:
    """Module-level ``NAME = <strings>`` assignments over every file (name -> the strings), so
    that ``defense in SEED001`` is seen through ``SEED001 = ("ulm", "clm")``."""
    out: dict[str, list[str]] = {}
    for path in python_files(src):
        for node in _parse(path).body:
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                targets, value = [node.target], node.value
            else:
                continue
            strings = [] if isinstance(value, ast.Constant) else _strings(value)
            for target in targets:
                if isinstance(target, ast.Name) and strings:
                    out.setdefault(target.id, []).extend(strings)
    return out


def _names_a_defense(node: ast.expr) -> bool:
    """Whether ``node`` is a name, attribute, subscript or call that mentions "defense"
    (``defense``, ``spec.defense``, ``defense.name``, ``row["defense"]``, ``job.get("defense")``)."""
    if isinstance(node, (ast.Constant, ast.Tuple, ast.List, ast.Set)):
        return False
    return "defense" in ast.unparse(node).lower()


def _compared_names(
    left: ast.expr, op: ast.cmpop, right: ast.expr, names: frozenset[str], constants: dict[str, list[str]]
) -> list[str]:
    """The defense names (or "none") that one comparison ``left op right`` tests against."""
    hits = []
    if isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)):
        for subject, other in ((left, right), (right, left)):
            if _names_a_defense(subject):
                hits += [s for s in _strings(other, constants) if s in names or s == NO_DEFENSE]
    if isinstance(op, (ast.In, ast.NotIn)) and not isinstance(right, (ast.Constant, ast.Name, ast.Attribute)):
        hits += [s for s in _strings(right) if s in names]  # a literal collection of defense names
    return sorted(set(hits))


def _match_names(node: ast.Match, names: frozenset[str]) -> list[str]:
    """Defense names among the ``case "..."`` patterns of a ``match`` on a defense."""
    if not _names_a_defense(node.subject):
        return []
    hits = set()
    for case in node.cases:
        for pattern in ast.walk(case.pattern):
            if isinstance(pattern, ast.MatchValue):
                hits.update(s for s in _strings(pattern.value) if s in names or s == NO_DEFENSE)
    return sorted(hits)


def defense_name_comparisons(src: Path, names: Iterable[str]) -> list[Finding]:
    """String comparisons with a defense's registered name outside ``bastion/defenses/``."""
    known = frozenset(names)
    constants = string_constants(src)
    found = []
    for path in python_files(src):
        if Path(_rel(path, src)).is_relative_to(DEFENSES_DIR):
            continue
        for node in ast.walk(_parse(path)):
            hits: list[str] = []
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                for i, op in enumerate(node.ops):
                    hits += _compared_names(operands[i], op, operands[i + 1], known, constants)
            elif isinstance(node, ast.Match):
                hits = _match_names(node, known)
            if hits:
                code = ast.unparse(node).splitlines()[0]
                msg = f"compares with defense name(s) {', '.join(map(repr, sorted(set(hits))))}: {code}"
                found.append(Finding("defense-names", _shown(path, src), node.lineno, msg))
    return found


# ------------------------------------------------------------------------------ worst case
def _docstrings(tree: ast.Module) -> set[int]:
    """``id()`` of every docstring constant in ``tree``."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def worst_case_strings(src: Path) -> list[Finding]:
    """String literals saying "worst-case" / "worst case" outside ``bastion/results/worst_case.py``
    (docstrings and comments are prose and are not counted)."""
    found = []
    for path in python_files(src):
        if Path(_rel(path, src)) == WORST_CASE_MODULE:
            continue
        tree = _parse(path)
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                for match in WORST_CASE.finditer(node.value):
                    # the line of the match in a multi-line literal (approximate across escapes)
                    line = min(node.lineno + node.value.count("\n", 0, match.start()), node.end_lineno or node.lineno)
                    msg = f"string {match.group(0)!r} outside {WORST_CASE_MODULE.as_posix()}"
                    found.append(Finding("worst-case", _shown(path, src), line, msg))
    return found


# ------------------------------------------------------------------------------ import cycles
def module_files(src: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Module name -> file for every module of ``package`` under ``src`` (``a.b`` for ``a/b/__init__.py``)."""
    mods = {}
    for path in python_files(src / package):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _owner(name: str, mods: dict[str, Path]) -> str | None:
    """The module ``name`` is or lies in (``a.b.c`` -> ``a.b`` when ``c`` is an attribute of it)."""
    while name not in mods and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in mods else None


def import_graph(src: Path, package: str = PACKAGE) -> dict[str, dict[str, int]]:
    """``importer -> {imported: first line}`` over the package's modules, every import counted
    (at any depth: inside functions, ``if`` blocks, ``try``)."""
    mods = module_files(src, package)
    graph: dict[str, dict[str, int]] = defaultdict(dict)
    for mod, path in mods.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(_parse(path)):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(mod, is_package, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                owner = _owner(target, mods)
                if owner is not None and owner != mod:
                    line = graph[mod].get(owner, node.lineno)
                    graph[mod][owner] = min(line, node.lineno)
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    nodes = sorted(set(graph) | {w for ws in graph.values() for w in ws})
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, {}))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, {})))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return sorted(out)


def _shortest_cycle(graph: dict[str, dict[str, int]], comp: list[str]) -> list[str]:
    """A shortest cycle through ``comp[0]`` inside the component (breadth-first), closed."""
    members, start = set(comp), comp[0]
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, {})):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w in members and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return [start, start]  # pragma: no cover - a component of > 1 module always has a cycle


def import_cycles(src: Path, package: str = PACKAGE) -> list[Finding]:
    """One finding per import cycle (a strongly connected component): a shortest cycle, then
    every import inside the component with its file:line (the candidates to cut)."""
    graph = import_graph(src, package)
    mods = module_files(src, package)
    found = []
    for comp in strongly_connected(graph):
        cycle = _shortest_cycle(graph, comp)
        members = set(comp)
        edges = [
            f"{_shown(mods[a], src)}:{graph[a][b]}: {a} imports {b}"
            for a in comp
            for b in sorted(graph.get(a, {}))
            if b in members
        ]
        msg = f"import cycle among {len(comp)} modules: {' -> '.join(cycle)}"
        first = cycle[0]
        found.append(Finding("import-cycles", _shown(mods[first], src), graph[first][cycle[1]], msg, tuple(edges)))
    return found


# ------------------------------------------------------------------------------ driver
def registered_defenses() -> list[str]:
    """``bastion.defenses.list()`` of the installed package."""
    from bastion import defenses

    return list(defenses.list())


def run_checks(src: Path, defense_names: Sequence[str] | None = None) -> dict[str, list[Finding]]:
    """Every check on the source root ``src`` (the folder holding the ``bastion`` package)."""
    names = registered_defenses() if defense_names is None else defense_names
    return {
        "long-functions": long_functions(src),
        "defense-names": defense_name_comparisons(src, names),
        "worst-case": worst_case_strings(src),
        "import-cycles": import_cycles(src),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1] / "src",
                        help="the source root holding the bastion package (default: the repository's src/)")
    parser.add_argument("--defense-names", help="comma-separated defense names (default: bastion.defenses.list())")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    args = parser.parse_args(argv)
    names = None if args.defense_names is None else [n for n in args.defense_names.split(",") if n]
    results = run_checks(args.src, names)
    if args.json:
        print(json.dumps({k: [asdict(f) for f in v] for k, v in results.items()}, indent=2))
    else:
        for check, findings in results.items():
            print(f"{check}: {len(findings)} finding(s)")
            for f in findings:
                print("  " + str(f).replace("\n", "\n  "))
    return 1 if any(results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
