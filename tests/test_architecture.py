"""The core stays pure: importing every gateway module loads neither mitmproxy nor the addons;
``gateway/policy`` imports neither the config layer nor stores, identity, web or I/O; no gateway
module imports, through any chain, a module that imports it back."""

from __future__ import annotations

import ast
import graphlib
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# What gateway/policy may import besides itself: the canonical request path (pure, no I/O).
POLICY_MAY_IMPORT = frozenset({"gateway", "gateway.http", "gateway.http.paths"})
POLICY_THIRD_PARTY = frozenset({"cachetools"})
# Standard library that would make evaluation read the outside world: I/O, the clock, randomness.
POLICY_NEVER_USES = frozenset({"asyncio", "http", "os", "random", "secrets", "socket", "sqlite3", "ssl",
                               "subprocess", "time", "urllib"})


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def _imported_names(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it: at the top, in functions (lazy imports) and
    under ``if TYPE_CHECKING`` (a cycle hidden from the interpreter is still a cycle)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def _import_graph() -> dict[str, set[str]]:
    """Each gateway module and the gateway modules it imports (a name imported from a module is
    kept only when it is a module itself); other imports under their top-level name."""
    files = {_module_name(path): path for path in (REPO / "gateway").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        graph[module] = set()
        for name in _imported_names(path):
            if name in files:
                graph[module].add(name)
            elif name.split(".")[0] != "gateway":
                graph[module].add(name.split(".")[0])
    return graph


def test_gateway_never_imports_mitmproxy() -> None:
    modules = sorted(_module_name(path) for path in (REPO / "gateway").rglob("*.py"))
    assert "gateway.policy.evaluate" in modules
    script = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
              "print(sorted(n for n in sys.modules if n.split('.')[0] in ('mitmproxy', 'addons')))")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_policy_imports_neither_config_nor_stores_nor_io() -> None:
    """gateway/policy reads its own types, compiled from the config by gateway/config/compile.py.
    It reaches, directly or through another module, only itself, ``POLICY_MAY_IMPORT``, the
    standard library without I/O, clock or randomness, and ``cachetools``: not the config models,
    stores, identity, web or mitmproxy. Package ``__init__`` modules count: importing a module runs them."""
    graph = _import_graph()
    policy = sorted(m for m in graph if _in_policy(m))
    assert "gateway.policy.evaluate" in policy
    reached: set[str] = set()
    pending = list(policy)
    while pending:
        module = pending.pop()
        parents = [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)]
        for name in [*graph.get(module, ()), *parents]:
            if name not in reached:
                reached.add(name)
                pending.append(name)
    gateway = {m for m in reached if m.split(".")[0] == "gateway"}
    assert {m for m in gateway if not _in_policy(m) and m not in POLICY_MAY_IMPORT} == set()
    third_party = {m for m in reached - gateway if m not in sys.stdlib_module_names}
    assert third_party <= POLICY_THIRD_PARTY
    assert reached & POLICY_NEVER_USES == set()


def _in_policy(module: str) -> bool:
    return module == "gateway.policy" or module.startswith("gateway.policy.")


def test_no_import_cycles_among_gateway_modules() -> None:
    """A module never imports, through any chain, a module that imports it back: the layers read
    one way. The cycle found is shown, first module last as well."""
    graph = _import_graph()
    assert "gateway.identity.browser" in graph
    gateway_only = {module: {name for name in names if name in graph} for module, names in graph.items()}
    try:
        graphlib.TopologicalSorter(gateway_only).prepare()
    except graphlib.CycleError as error:
        cycle = error.args[1]
    else:
        cycle = []
    assert cycle == [], " imports ".join(cycle)


def test_only_the_decision_pipeline_imports_the_evaluator() -> None:
    """Every consumer decides through ``gateway.decision.pipeline.authorize``: a module that imported
    ``evaluate`` itself could decide another way (What If and the gateway once disagreed so).
    bench/ measures the evaluator alone, on purpose, and is not product code."""
    importers = set()
    for path in [*(REPO / "gateway").rglob("*.py"), *(REPO / "addons").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = {alias.name for alias in node.names} if isinstance(node, ast.ImportFrom | ast.Import) else set()
            if (isinstance(node, ast.ImportFrom) and node.module == "gateway.policy.evaluate" and "evaluate" in names) \
                    or (isinstance(node, ast.ImportFrom) and node.module == "gateway.policy" and "evaluate" in names) \
                    or (isinstance(node, ast.Import) and "gateway.policy.evaluate" in names):
                importers.add(path.relative_to(REPO).as_posix())
    assert importers == {"gateway/decision/pipeline.py"}


def test_no_test_module_imports_another_test_module() -> None:
    """Shared helpers live in tests/helpers/ and shared fixtures in tests/conftest.py: a test module
    importing another couples the two and registers that module's fixtures by side effect."""
    test_modules = {_module_name(path) for path in (REPO / "tests").glob("test_*.py")}
    importers = {
        f"{_module_name(path)} imports {imported}"
        for path in (REPO / "tests").glob("test_*.py")
        for imported in {".".join(name.split(".")[:2]) for name in _imported_names(path)}
        if imported in test_modules - {_module_name(path)}
    }
    assert not importers, sorted(importers)


MODULE_PATH = re.compile(r"`((?:gateway|addons)/[\w/]+\.py)`")


def test_the_module_map_names_every_module_and_only_modules_that_exist() -> None:
    """docs/architecture.md is the module map: a module added, moved or removed shows up here."""
    named = set(MODULE_PATH.findall((REPO / "docs" / "architecture.md").read_text()))
    modules = {str(path.relative_to(REPO)) for top in ("gateway", "addons") for path in (REPO / top).rglob("*.py")}
    assert "gateway/decision/pipeline.py" in modules
    assert modules - named == set(), "modules the map does not name"
    assert named - modules == set(), "the map names modules that do not exist"


def test_the_readme_and_docs_name_only_modules_that_exist() -> None:
    modules = {str(path.relative_to(REPO)) for top in ("gateway", "addons") for path in (REPO / top).rglob("*.py")}
    for document in [REPO / "README.md", REPO / "SECURITY.md", *(REPO / "docs").glob("*.md")]:
        missing = set(MODULE_PATH.findall(document.read_text())) - modules
        assert missing == set(), f"{document.name} names modules that do not exist"
