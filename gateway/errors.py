"""Exceptions that stop work. Expected outcomes (a rejected token, a failed control) are values.

    PortcullisError
     ├── ConfigError          the configuration cannot be used; carries every problem found
     └── SignalUnavailable    a signal source cannot answer; callers fail closed
          └── SessionStoreUnavailable   the browser session store, in particular
"""

from __future__ import annotations

from dataclasses import dataclass


class PortcullisError(Exception):
    """Base of every error Portcullis raises on purpose."""


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong in one config file, with where it is and what is accepted."""

    file: str
    line: int | None
    column: int | None
    key: str
    message: str

    def __str__(self) -> str:
        place = self.file
        if self.line is not None:
            place += f":{self.line}"
            if self.column is not None:
                place += f":{self.column}"
        key = f"{self.key}: " if self.key else ""
        return f"{place}: {key}{self.message}"


class ConfigError(PortcullisError):
    """The configuration is invalid; ``problems`` lists all of them, not just the first."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class SignalUnavailable(PortcullisError):
    """A signal source (JWKS, device inventory, threat feed) cannot answer right now."""


class SessionStoreUnavailable(SignalUnavailable):
    """The browser session store cannot answer: a 503 like any source, logged under its own name."""
