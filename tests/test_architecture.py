"""The core stays pure: importing every gateway module loads neither mitmproxy nor the addons."""

from __future__ import annotations

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
