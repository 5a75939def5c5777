"""The issuer's signing keys: discovery document, then JWKS, cached and refreshed on demand.

An unknown ``kid`` triggers a refetch at most once per ``min_refresh_interval`` so that a storm of
forged kids cannot hammer the issuer. When the issuer cannot be reached, known keys keep working;
with no keys at all, ``SignalUnavailable`` is raised and the caller fails closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import httpx
import jwt
from jwt import PyJWK, PyJWKSet

from gateway.errors import SignalUnavailable

logger = logging.getLogger(__name__)

MAX_KEYS = 100
MAX_JWKS_BYTES = 256 * 1024


class JwksCache:
    def __init__(
        self,
        issuer: str,
        *,
        cache_seconds: float,
        min_refresh_interval: float,
        timeout: float,
        timer: Callable[[], float] = time.monotonic,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.issuer = issuer
        self._cache_seconds = cache_seconds
        self._min_refresh_interval = min_refresh_interval
        self._timeout = timeout
        self._timer = timer
        self._transport = transport
        self._keys: dict[str, PyJWK] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._lock = asyncio.Lock()

    @property
    def fetched_at(self) -> float | None:
        return self._fetched_at

    async def key(self, kid: str) -> PyJWK | None:
        """The key with this kid, refreshing the set if it is stale or the kid is new."""
        if self._stale() or kid not in self._keys:
            await self._refresh(force=kid not in self._keys)
        return self._keys.get(kid)

    async def refresh(self) -> None:
        """Fetch now (at start-up), raising SignalUnavailable if the issuer cannot be reached."""
        async with self._lock:
            await self._fetch()

    def _stale(self) -> bool:
        return self._fetched_at is None or self._timer() - self._fetched_at > self._cache_seconds

    async def _refresh(self, *, force: bool) -> None:
        async with self._lock:
            now = self._timer()
            if self._attempted_at is not None and now - self._attempted_at < self._min_refresh_interval:
                return  # rate limit: unknown kids do not reach the issuer more often than this
            if not force and not self._stale():
                return
            try:
                await self._fetch()
            except SignalUnavailable:
                if not self._keys:
                    raise
                logger.warning("JWKS refresh from %s failed; keeping %d known keys", self.issuer, len(self._keys))

    async def _fetch(self) -> None:
        self._attempted_at = self._timer()
        async with httpx.AsyncClient(timeout=self._timeout, transport=self._transport,
                                     follow_redirects=False) as client:
            discovery = await _get_json(client, f"{self.issuer}/.well-known/openid-configuration")
            if discovery.get("issuer") != self.issuer:
                raise SignalUnavailable(
                    f"discovery document names issuer {discovery.get('issuer')!r}, expected {self.issuer!r}"
                )
            jwks_uri = discovery.get("jwks_uri")
            if not isinstance(jwks_uri, str):
                raise SignalUnavailable("discovery document has no jwks_uri")
            jwks = await _get_json(client, jwks_uri)
        self._keys = _signing_keys(jwks)
        self._fetched_at = self._timer()
        logger.info("fetched %d signing keys from %s", len(self._keys), jwks_uri)


async def _get_json(client: httpx.AsyncClient, url: str) -> dict[str, object]:
    try:
        response = await client.get(url)
    except httpx.HTTPError as error:
        raise SignalUnavailable(f"cannot fetch {url}: {type(error).__name__}") from error
    if response.status_code != 200:
        raise SignalUnavailable(f"{url} answered {response.status_code}")
    if len(response.content) > MAX_JWKS_BYTES:
        raise SignalUnavailable(f"{url} answered more than {MAX_JWKS_BYTES} bytes")
    try:
        body = response.json()
    except ValueError as error:
        raise SignalUnavailable(f"{url} did not answer JSON") from error
    if not isinstance(body, dict):
        raise SignalUnavailable(f"{url} did not answer a JSON object")
    return body


def _signing_keys(jwks: dict[str, object]) -> dict[str, PyJWK]:
    """Keys with a kid meant for signatures; symmetric keys are dropped (an issuer never shares one)."""
    usable = [
        k for k in jwks.get("keys", []) if isinstance(k, dict)  # type: ignore[union-attr]  (JSON)
        and isinstance(k.get("kid"), str) and k.get("use", "sig") == "sig" and k.get("kty") != "oct"
    ][:MAX_KEYS]
    try:
        key_set = PyJWKSet.from_dict({"keys": usable})
    except jwt.PyJWKSetError as error:
        raise SignalUnavailable(f"JWKS holds no usable key: {error}") from error
    return {k.key_id: k for k in key_set.keys if k.key_id}
