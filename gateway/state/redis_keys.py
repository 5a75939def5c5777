"""What every Redis backend shares: key names (the layout is drawn in ``gateway.state.redis_state``),
connection limits, and how a Redis failure reaches callers (``SignalUnavailable``, no password)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import redis

from gateway.errors import SignalUnavailable

CONNECT_TIMEOUT = 1.0  # seconds: a dead Redis fails a request fast, and the request fails closed
READ_TIMEOUT = 2.0
EVERY_DEVICE = "*"  # a device change message listing it (``["*"]``) concerns every device


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str

    def device(self, device_id: str) -> str:
        return f"{self.prefix}device:{device_id}"

    def threats(self, device_id: str) -> str:
        return f"{self.prefix}threats:{device_id}"

    def reports(self, partner: str) -> str:
        return f"{self.prefix}reports:{partner}"

    def session(self, key_hash: str) -> str:
        return f"{self.prefix}session:{key_hash}"

    def pending(self, key_hash: str) -> str:
        return f"{self.prefix}pending:{key_hash}"

    def nonce(self, key: str) -> str:
        return f"{self.prefix}nonce:{key}"

    @property
    def device_ids(self) -> str:
        return f"{self.prefix}device-ids"

    @property
    def partners(self) -> str:
        return f"{self.prefix}partners"

    @property
    def partner_names(self) -> str:
        """Every partner with a verdict or a contact (the key keeps its first name: hosts share it)."""
        return f"{self.prefix}vendors"

    @property
    def devices_channel(self) -> str:
        return f"{self.prefix}devices"

    @property
    def apps_channel(self) -> str:
        """App protection registration changes: a JSON list of the users they concern."""
        return f"{self.prefix}app-registrations"

    @property
    def revoked_channel(self) -> str:
        return f"{self.prefix}revoked"


def redacted(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


@contextlib.contextmanager
def unavailable(location: str) -> Iterator[None]:
    """Redis errors and timeouts as ``SignalUnavailable``, naming the server without its password."""
    try:
        yield
    except (redis.RedisError, OSError) as error:
        raise SignalUnavailable(f"shared state {location}: {error or type(error).__name__}") from error
