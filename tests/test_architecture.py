"""The shape of the code: no import cycles between the modules of memcontrol/, tasks/ and flows/
(module- and function-level imports, read with ast), dvc.yaml lists the code each stage runs, and
every Markdown file the code and docs cite is in the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("memcontrol", "tasks", "flows")

# The library modules each dvc.yaml stage's flow calls (docs/architecture.md draws the same map); a
# stage must list them, everything they import, and the flow and task files that call them.
STAGE_CODE = {
    "prepare": ("memcontrol.prepare",),
    "base": ("memcontrol.base_model",),
    "reference": ("memcontrol.reference",),
    "search": ("memcontrol.arms", "memcontrol.selection", "memcontrol.search"),
    "finetune": ("memcontrol.arms", "memcontrol.compare"),
    "compare": ("memcontrol.arms", "memcontrol.compare"),
    "audit": ("memcontrol.audit.run",),
    "transfer": ("memcontrol.audit.transfer",),
    "release": ("memcontrol.release",),
}
STAGE_FLOWS = {**dict.fromkeys(("search", "finetune", "compare"), ("flows/pipeline.py", "tasks/stages.py")),
               **dict.fromkeys(("audit", "transfer", "release"), ("flows/audit.py",))}
GENERATED_REPORTS = {"audit.md", "compare.md", "transfer.md"}  # written by the pipeline, not committed


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    files = {}
    for package in packages:
        for f in (root / package).rglob("*.py"):
            parts = f.relative_to(root).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return files


def import_graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file (top level or in a function)."""
    files = module_files(root, packages)

    def known(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {known(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
                targets |= {known(f"{node.module}.{alias.name}") for alias in node.names}
        graph[module] = {t for t in targets if t and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    """The longest import chain of an acyclic graph (its length is the graph's depth)."""
    memo: dict[str, list[str]] = {}

    def chain(module: str) -> list[str]:
        if module not in memo:
            memo[module] = [module] + max((chain(t) for t in sorted(graph[module])), key=len, default=[])
        return memo[module]

    return max((chain(m) for m in sorted(graph)), key=len)


def closure(graph: dict[str, set[str]], entries) -> set[str]:
    """`entries`, every module they import transitively, and the parent packages on the way."""
    seen: set[str] = set()
    todo = list(entries)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += graph[module]
            todo += [p for p in (module.rpartition(".")[0],) if p]
    return seen


def has_code(path: Path) -> bool:
    """False for a module of only a docstring and constants (a package's __init__.py, say)."""
    return any(not isinstance(node, (ast.Expr, ast.Assign)) for node in ast.parse(path.read_text()).body)


def test_no_import_cycles_between_modules(record_property):
    graph = import_graph()
    assert len(graph) > 50 and "memcontrol.arms" in graph["tasks.stages"]
    assert cycles(graph) == []
    assert "memcontrol.tuning.blocks" not in graph["memcontrol.tuning.mask"]
    chain = longest_chain(graph)
    record_property("import_graph_depth", len(chain))
    record_property("longest_import_chain", " -> ".join(chain))


def test_the_graph_sees_function_level_imports_and_finds_their_cycles(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.c import g\n    return g\n")
    (pkg / "c.py").write_text("import pkg.a\n\ndef g():\n    pass\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.b"] == {"pkg.c"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    (pkg / "c.py").write_text("def g():\n    pass\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert cycles(graph) == [] and longest_chain(graph) == ["pkg.a", "pkg.b", "pkg.c"]


def test_every_dvc_stage_lists_the_code_it_runs():
    graph = import_graph()
    files = module_files(ROOT)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGE_CODE)
    for stage, entries in STAGE_CODE.items():
        deps = [next(iter(d)) if isinstance(d, dict) else d for d in stages[stage]["deps"]]
        code_deps = [d for d in deps if d.split("/")[0] in PACKAGES]
        assert all((ROOT / d).exists() for d in code_deps), f"{stage}: a code dep does not exist: {code_deps}"
        needed = sorted(str(files[m].relative_to(ROOT)) for m in closure(graph, entries) if has_code(files[m]))
        needed += STAGE_FLOWS.get(stage, ())
        missing = [f for f in needed if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in code_deps)]
        assert not missing, f"dvc.yaml stage {stage!r} runs code it does not list as deps: {missing}"


def test_every_cited_markdown_file_is_in_the_repository():
    pattern = re.compile(r"\b[A-Za-z_][A-Za-z0-9_-]*\.md\b")
    present = {f.name for f in ROOT.rglob("*.md") if ".venv" not in f.parts}
    cited = {}
    for f in ROOT.rglob("*"):
        if f.suffix in (".py", ".md", ".yaml", ".sh") and not {".venv", ".git"} & set(f.parts) and f.is_file():
            for name in pattern.findall(f.read_text(errors="replace")):
                cited.setdefault(name, str(f.relative_to(ROOT)))
    assert "paper.md" in cited and "architecture.md" in cited
    dangling = {name: where for name, where in cited.items() if name not in present | GENERATED_REPORTS}
    assert not dangling, f"cited Markdown files that are not in the repository (name: first citing file): {dangling}"
