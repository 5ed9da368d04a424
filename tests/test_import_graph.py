"""The package's imports form no cycle (those inside functions included: a lazy import back into
a module that imports you is still a tangle), the backends import nothing above themselves
(loading, methods, testing and synth sit above them), the sweep never imports the report and
reaches lmms/ only to construct the adapter."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "visionzip_eval"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """visionzip_eval modules that ``path`` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import sub` imports the submodule when there is one
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:  # importing a.b.c runs a/__init__ and a/b/__init__ first
            parts = name.split(".")
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules
    return found


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: imports(path, modules) - {name} for name, path in paths.items()}


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for target in sorted(edges[node]):
            if node.startswith(target + "."):
                continue  # a module importing its own package: the package is mid-import already
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target] if target in path else [node, target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if state.get(target) is None:
                visit(target, path + [target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_backends_import_nothing_above_themselves():
    edges = graph()
    allowed = ("visionzip_eval.backends", "visionzip_eval.selection", "visionzip_eval.profiling")
    for module, targets in edges.items():
        if module.startswith("visionzip_eval.backends"):
            # its own ancestor packages (run first by any import) are not "above" it
            above = sorted(t for t in targets if not t.startswith(allowed) and not module.startswith(t + "."))
            assert not above, f"{module} imports {above}"


def test_the_sweep_never_imports_the_report():
    """Data flows config -> runs -> report: the sweep writes what the report reads, never the reverse."""
    edges = graph()
    for module, targets in edges.items():
        if module.startswith("visionzip_eval.sweep"):
            report = sorted(t for t in targets if t.startswith("visionzip_eval.report"))
            assert not report, f"{module} imports {report}"


def test_the_sweep_reaches_lmms_only_to_construct_the_adapter():
    edges = graph()
    allowed = {"visionzip_eval.lmms", "visionzip_eval.lmms.adapter"}  # the package runs first on any import
    for module, targets in edges.items():
        if module.startswith("visionzip_eval.sweep"):
            lmms = sorted(t for t in targets if t.startswith("visionzip_eval.lmms") and t not in allowed)
            assert not lmms, f"{module} imports {lmms}: the sweep uses lmms/ only through lmms.adapter"


def test_only_the_cli_reaches_the_demos_and_testing_imports_no_model_code():
    edges = graph()
    for module, targets in edges.items():
        if not module.startswith(("visionzip_eval.demos", "visionzip_eval.cli")):
            demos = sorted(t for t in targets if t.startswith("visionzip_eval.demos"))
            assert not demos, f"{module} imports the demos {demos}"
    assert edges["visionzip_eval.testing"] == set()  # sample images only: the tiny models live with their families


def test_every_import_of_the_package_resolves_lazy_ones_included():
    """A name imported inside a function is looked up only when that function runs: after a move
    (tiny builders into the backends, demos/) such an import broke ``bench serve --realsize``
    and no test ran it. Every ``from visionzip_eval... import name`` in the package, scripts and
    tests must name a module or an attribute that exists."""
    import importlib

    root = PACKAGE.parent
    missing = []
    for folder in (PACKAGE, root / "scripts", root / "tests"):
        for path in sorted(folder.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not (isinstance(node, ast.ImportFrom) and node.level == 0
                        and (node.module or "").startswith("visionzip_eval")):
                    continue
                where = f"{path.relative_to(root)}:{node.lineno}"
                try:
                    module = importlib.import_module(node.module)
                except ModuleNotFoundError as error:
                    missing.append(f"{where}: {error}")
                    continue
                for alias in node.names:
                    if alias.name == "*" or hasattr(module, alias.name):
                        continue
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ModuleNotFoundError:
                        missing.append(f"{where}: {node.module} has no {alias.name}")
    assert not missing, "\n".join(missing)
