"""The package's modules import each other without circles, and its light command modules stay light.

Every `import` and `from ... import` of every module under `modeling_selfie/` and of `selfie_segment.py` counts,
module-level and inside functions alike (`ast`), so a circle closed only when a command runs is found too. The light
command modules (argument parsers that answer `--help` without torch) are checked by running them:
tests/test_command_help.py."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "modeling_selfie"


def module_names() -> dict[str, Path]:
    """{dotted module name: file} of the package (packages by their `__init__.py`) and `selfie_segment`."""
    modules = {"selfie_segment": REPO / "selfie_segment.py"}
    for path in sorted((REPO / PACKAGE).rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `module` imports anywhere in its file (a `from X import name` of a submodule
    `X.name` counts as importing it; a package `X` imported for a name counts as X)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module
            targets = [f"{origin}.{alias.name}" for alias in node.names]
            targets = [target if target in known else origin for target in targets]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a module in `known`, or one of its parents
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imported(name, path, set(modules)) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_graph_sees_relative_absolute_and_function_level_imports():
    graph = import_graph()
    assert "modeling_selfie.evaluation" in graph["modeling_selfie.evaluate"]  # inside main()
    assert "modeling_selfie.io_utils" in graph["modeling_selfie.data.common"]  # `from ..io_utils import`
    assert "modeling_selfie.vqa_benchmarks" in graph["modeling_selfie.data.vqa"]
    assert "modeling_selfie.modeling_selfie" in graph["modeling_selfie"]  # `from .modeling_selfie import` in a function
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_of_the_package_imports_itself_back_through_others():
    found = cycles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(cycle) for cycle in found)


# Command modules: argument parsers (light, no torch) and the modules whose `main` they are. Work modules import
# none of them: shared names live where the work is, or in a light module of their own.
COMMAND_MODULES = {
    "modeling_selfie.evaluate", "modeling_selfie.evaluate_vqa", "modeling_selfie.training", "modeling_selfie.convert",
    "selfie_segment",
}  # fmt: skip


def test_work_modules_import_no_command_module():
    graph = import_graph()
    offenders = {
        module: sorted(graph[module] & COMMAND_MODULES)
        for module in graph
        if module not in COMMAND_MODULES and module != PACKAGE and graph[module] & COMMAND_MODULES
    }
    assert not offenders, offenders

