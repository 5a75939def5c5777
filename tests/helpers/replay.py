"""Running `portcullis replay` and reading its totals."""

from __future__ import annotations

import pytest

from gateway.app.cli import main


def replay(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main(["replay", *(str(a) for a in args)])
    out, err = capsys.readouterr()
    return code, out, err


def totals(out: str) -> dict[str, int]:
    """``same result: 9 (3 of them blocked for another reason)   allow→block: 2 ...``"""
    line = out.splitlines()[3]
    found = {name.strip(): int(count.split(" (")[0]) for name, count in (part.split(": ", 1)
                                                                          for part in line.split("   "))}
    found["blocked for another reason"] = int(line.split("(", 1)[1].split(" ", 1)[0])
    return found
