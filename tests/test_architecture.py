"""The core stays pure: importing every gateway module loads neither mitmproxy nor the addons."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gateway_never_imports_mitmproxy() -> None:
    modules = sorted(
        ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for path in (REPO / "gateway").rglob("*.py")
    )
    assert "gateway.policy.evaluate" in modules
    script = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
              "print(sorted(n for n in sys.modules if n.split('.')[0] in ('mitmproxy', 'addons')))")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


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
