"""Who may import whom, read from the source (ast: nothing is imported or run).

* tools/ holds the commands users run and never imports benchmarks/, which only measures;
* a benchmark shares code with the others through benchmarks/common.py only, never by
  importing another benchmark;
* a group of repeats' statistics are computed in one module (tools/repeat_stats.py), so that
  MLflow's group runs and the results table cannot drift apart.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

COMMON = "benchmarks.common"


def sources(package: str) -> list[Path]:
    return sorted((REPO / package).glob("*.py"))


def imported(path: Path) -> set[str]:
    """Every module name `path` imports, at its top or inside a function, made absolute.
    `from benchmarks import x` gives both `benchmarks` and `benchmarks.x` (x may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative to the file's own package
                base = ".".join(filter(None, [path.parent.name, base]))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def within(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def test_no_benchmark_imports_another_except_through_common():
    benchmarks = {f"benchmarks.{path.stem}" for path in sources("benchmarks")} - {"benchmarks.__init__"}
    offenders = {}
    for path in sources("benchmarks"):
        others = benchmarks - {COMMON, f"benchmarks.{path.stem}"}
        found = sorted(name for name in imported(path) if any(within(name, b) for b in others))
        if found:
            offenders[path.relative_to(REPO).as_posix()] = found
    assert offenders == {}, f"benchmarks importing another benchmark (share it in {COMMON}): {offenders}"
    # The check reads real imports: the benchmarks do use the shared module.
    assert any(COMMON in imported(path) for path in sources("benchmarks"))


def test_tools_never_import_benchmarks():
    offenders = {path.relative_to(REPO).as_posix(): sorted(n for n in names if within(n, "benchmarks"))
                 for path in sources("tools") for names in [imported(path)]
                 if any(within(n, "benchmarks") for n in names)}
    assert offenders == {}, f"tools importing benchmarks: {offenders}"
    assert any(within(n, "stages") for path in sources("tools") for n in imported(path))


def calls_stdev(path: Path) -> bool:
    """Whether `path` computes a standard deviation (statistics.stdev, under any import)."""
    return any(isinstance(node, ast.Attribute) and node.attr in ("stdev", "pstdev")
               or isinstance(node, ast.Name) and node.id in ("stdev", "pstdev")
               for node in ast.walk(ast.parse(path.read_text(), filename=str(path))))


def test_repeat_statistics_are_computed_in_one_module():
    computing = {path.relative_to(REPO).as_posix()
                 for package in ("stages", "tools", "benchmarks") for path in sources(package)
                 if calls_stdev(path)}
    assert computing == {"tools/repeat_stats.py"}
