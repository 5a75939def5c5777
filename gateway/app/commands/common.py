"""What several commands share."""

from __future__ import annotations

from pathlib import Path

DEFAULT_CONFIG = Path("config")
