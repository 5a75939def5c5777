"""Text shown on a terminal. Logged paths, user agents, names and recorded traffic come from
clients: none of their control, format or bidi characters (terminal escapes, U+202E) may reach an
operator's screen."""

from __future__ import annotations


def printable(text: str) -> str:
    """One line of untrusted text with every non-printable character replaced by ``?``."""
    return "".join(c if c.isprintable() else "?" for c in text)


def printable_lines(text: str) -> str:
    """Several lines: line breaks kept, everything else as ``printable``."""
    return "\n".join(printable(line) for line in text.split("\n"))
