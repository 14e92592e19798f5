"""Who may import whom, read from the source (ast: nothing is imported or run).

* mnistlab/ is the library: it never imports the stages, the tools or the benchmarks, and
  its modules import each other without a circle;
* stages/ holds the four stage entry points: each imports the library, never another stage;
* dvc.yaml lists, for each stage, exactly the repo's modules its entry point imports;
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
    assert any(within(n, "mnistlab") for path in sources("tools") for n in imported(path))


def test_the_library_never_imports_what_is_built_on_it():
    above = ("stages", "tools", "benchmarks")
    offenders = {path.relative_to(REPO).as_posix(): found for path in sources("mnistlab")
                 for found in [sorted(n for n in imported(path) if any(within(n, a) for a in above))]
                 if found}
    assert offenders == {}, f"library modules importing stages, tools or benchmarks: {offenders}"


def test_a_stage_imports_the_library_never_another_stage():
    for path in sources("stages"):
        others = {f"stages.{p.stem}" for p in sources("stages")} - {f"stages.{path.stem}", "stages.__init__"}
        found = sorted(n for n in imported(path) if any(within(n, o) for o in others))
        assert not found, f"{path.relative_to(REPO)} imports another stage: {found}"
    assert {p.stem for p in sources("stages")} == {"__init__", "validate", "download", "train", "evaluate"}


def library_graph() -> dict[str, set[str]]:
    """mnistlab module -> the mnistlab modules it imports (at the top or in a function)."""
    modules = {f"mnistlab.{path.stem}" for path in sources("mnistlab")} - {"mnistlab.__init__"}
    return {f"mnistlab.{path.stem}": {n for n in imported(path) if n in modules} - {f"mnistlab.{path.stem}"}
            for path in sources("mnistlab") if path.stem != "__init__"}


def cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of `graph` (a path that comes back to its start), or []."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = "done"
        return []

    return next((found for node in sorted(graph) if node not in state
                 for found in [visit(node, [node])] if found), [])


def test_the_library_has_no_import_circles():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check finds one
    assert cycle(library_graph()) == []


def calls_stdev(path: Path) -> bool:
    """Whether `path` computes a standard deviation (statistics.stdev, under any import)."""
    return any(isinstance(node, ast.Attribute) and node.attr in ("stdev", "pstdev")
               or isinstance(node, ast.Name) and node.id in ("stdev", "pstdev")
               for node in ast.walk(ast.parse(path.read_text(), filename=str(path))))


def test_repeat_statistics_are_computed_in_one_module():
    computing = {path.relative_to(REPO).as_posix()
                 for package in ("mnistlab", "stages", "tools", "benchmarks") for path in sources(package)
                 if calls_stdev(path)}
    assert computing == {"tools/repeat_stats.py"}


def test_each_stage_depends_on_exactly_the_code_it_imports():
    """dvc.yaml lists a stage's code dependencies; every module of the repo that the stage's
    entry point imports, directly or through another, must be among them (or a change to it
    would not rerun the stage), and no other module (or a change to it would rerun the stage
    for nothing)."""
    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        entry = stage["cmd"].split("python -m ")[-1].split()[0]  # stages.train
        deps = {dep if isinstance(dep, str) else next(iter(dep)) for dep in stage.get("deps", [])}
        needed, todo = set(), [entry]
        while todo:
            module = todo.pop()
            path = REPO / (module.replace(".", "/") + ".py")
            if module in needed or not path.is_file():
                continue
            needed.add(module)
            todo.extend(imported(path))
        files = {module.replace(".", "/") + ".py" for module in needed}
        missing = sorted(files - deps)
        assert not missing, f"dvc.yaml stage {name} imports {missing} without listing them in deps"
        listed = {dep for dep in deps if dep.endswith(".py")}
        stale = sorted(listed - files)
        assert not stale, f"dvc.yaml stage {name} lists {stale} in deps, which it does not import"
