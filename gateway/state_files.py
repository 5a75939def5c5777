"""Secrets the gateway makes once and keeps in its state directory (session key, pseudonym key,
assertion signing key)."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)


def write_once(path: Path, make: Callable[[], bytes]) -> None:
    """Create ``path`` (mode 0600) holding ``make()``, unless it exists. Several workers may start
    at once, and one may crash mid-write: the content is written under a private name and linked
    into place, so every reader sees a whole secret, the same one."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(make())
            file.flush()
            os.fsync(file.fileno())
        with contextlib.suppress(FileExistsError):  # another worker made it first: theirs is the secret
            os.link(temporary, path)
    finally:
        temporary.unlink()


def warn_if_readable_by_others(path: Path) -> None:
    """A key others can read is a key others may hold. Warned, not refused: secret mounts
    (Kubernetes' default 0644) would otherwise stop the gateway."""
    mode = path.stat().st_mode
    if mode & 0o077:
        logger.warning("%s is readable by other users (mode %s): chmod 600 it, and consider the key leaked",
                       path, oct(mode & 0o777))
