"""One issuer's signing keys: discovery document (at ``<issuer>/.well-known/openid-configuration``
unless another URL is given; it must name the issuer), then JWKS, cached and refreshed on demand.

An unknown ``kid`` triggers a refetch at most once per ``min_refresh_interval`` so that a storm of
forged kids cannot hammer the issuer. When the issuer cannot be reached, known keys keep working
(a warning is logged); with no keys at all, ``SignalUnavailable`` is raised and the caller fails
closed with a 503, never a 401 that would make clients discard good tokens.

Keys are bound to one algorithm each: a JWK's own ``alg`` must equal the token's, and a JWK without
``alg`` (Entra publishes none) is used only with the pinned algorithm the token names.

An issuer that answers garbage fails closed the same way: each document must arrive whole within
``timeout`` (a total deadline, not httpx's per-read one, so a JWKS dripping a byte at a time cannot
hold the key lock), unencoded, at most ``MAX_JWKS_BYTES`` (reading stops there), as JSON with one
reading (``gateway.http.strict_json``: UTF-8, no member named twice, bounded nesting), and hold at least
one asymmetric signing key. Known keys outlive failed refreshes for ``max_stale_seconds`` past
``cache_seconds`` only: keys the issuer may have withdrawn long ago are not trusted for ever, and
tokens then get a 503, never a pass.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import httpx
import jwt
from jwt import PyJWK

from gateway.errors import SignalUnavailable
from gateway.http.strict_json import JsonRefused
from gateway.http.strict_json import loads as strict_json

logger = logging.getLogger(__name__)

MAX_KEYS = 100
MAX_JWKS_BYTES = 256 * 1024
MAX_STALE_SECONDS = 24 * 3600  # Entra: check for new keys at least daily; beyond that, refuse


class JwksCache:
    def __init__(
        self,
        issuer: str,
        *,
        discovery_url: str | None = None,
        cache_seconds: float,
        min_refresh_interval: float,
        timeout: float,
        timer: Callable[[], float] = time.monotonic,
        transport: httpx.AsyncBaseTransport | None = None,
        max_stale_seconds: float = MAX_STALE_SECONDS,
    ) -> None:
        self.issuer = issuer
        self.discovery_url = discovery_url or f"{issuer.rstrip('/')}/.well-known/openid-configuration"
        self._cache_seconds = cache_seconds
        self._max_stale_seconds = max_stale_seconds
        self._min_refresh_interval = min_refresh_interval
        self._timeout = timeout
        self._timer = timer
        self._transport = transport
        self._keys: dict[str, dict[str, object]] = {}
        self.discovery: dict[str, object] = {}
        self._bound: dict[tuple[str, str], PyJWK] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._failed = False
        self._lock = asyncio.Lock()

    @property
    def fetched_at(self) -> float | None:
        return self._fetched_at

    @property
    def refresh_failing(self) -> bool:
        """The last fetch that finished failed (the keys in use, if any, are older than it)."""
        return self._failed

    async def key(self, kid: str, algorithm: str) -> PyJWK | None:
        """The key with this kid for this algorithm, refreshing the set if it is stale or the kid
        is new; None if the issuer has no such key or the key is for another algorithm."""
        if self._stale() or kid not in self._keys:
            await self._refresh(force=kid not in self._keys)
        if self._fetched_at is not None and \
                self._timer() - self._fetched_at > self._cache_seconds + self._max_stale_seconds:
            raise SignalUnavailable(f"signing keys from {self.issuer} could not be refreshed for too long")
        if kid not in self._keys:
            return None
        bound = self._bound.get((kid, algorithm))
        if bound is None:
            bound = _bind(self._keys[kid], algorithm)
            if bound is not None and len(self._bound) < 4 * MAX_KEYS:
                self._bound[(kid, algorithm)] = bound
        return bound

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
                if not self._keys:
                    raise SignalUnavailable(f"no signing keys from {self.issuer} yet; next fetch after the interval")
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
        try:
            await self._fetch_keys()
        except SignalUnavailable:
            self._failed = True
            raise
        self._failed = False

    async def _fetch_keys(self) -> None:
        async with httpx.AsyncClient(timeout=self._timeout, transport=self._transport,
                                     follow_redirects=False) as client:
            discovery = await _get_json(client, self.discovery_url, self._timeout)
            if discovery.get("issuer") != self.issuer:
                raise SignalUnavailable(
                    f"discovery document names issuer {discovery.get('issuer')!r}, expected {self.issuer!r}"
                )
            jwks_uri = discovery.get("jwks_uri")
            if not isinstance(jwks_uri, str):
                raise SignalUnavailable("discovery document has no jwks_uri")
            jwks = await _get_json(client, jwks_uri, self._timeout)
        self.discovery = discovery
        self._keys = _signing_keys(jwks)
        self._bound = {}
        self._fetched_at = self._timer()
        logger.info("fetched %d signing keys from %s", len(self._keys), jwks_uri)


async def _get_json(client: httpx.AsyncClient, url: str, deadline: float) -> dict[str, object]:
    try:
        async with asyncio.timeout(deadline):
            content = await _read_capped(client, url)
    except TimeoutError as error:
        raise SignalUnavailable(f"{url} did not answer within {deadline} s") from error
    except httpx.HTTPError as error:
        raise SignalUnavailable(f"cannot fetch {url}: {type(error).__name__}") from error
    try:
        body = strict_json(content, max_bytes=MAX_JWKS_BYTES)
    except JsonRefused as error:
        raise SignalUnavailable(f"the answer of {url} {error}") from error
    if not isinstance(body, dict):
        raise SignalUnavailable(f"{url} did not answer a JSON object")
    return body


async def _read_capped(client: httpx.AsyncClient, url: str) -> bytes:
    """The body, read only up to the cap, and never decompressed (a small gzip can be a huge JWKS)."""
    async with client.stream("GET", url, headers={"Accept-Encoding": "identity"}) as response:
        if response.status_code != 200:
            raise SignalUnavailable(f"{url} answered {response.status_code}")
        if response.headers.get("content-encoding", "identity").lower() != "identity":
            raise SignalUnavailable(f"{url} answered a compressed body")
        content = bytearray()
        async for chunk in response.aiter_bytes():  # not decoded: any Content-Encoding was refused above
            content += chunk
            if len(content) > MAX_JWKS_BYTES:
                raise SignalUnavailable(f"{url} answered more than {MAX_JWKS_BYTES} bytes")
    return bytes(content)


def _signing_keys(jwks: dict[str, object]) -> dict[str, dict[str, object]]:
    """Asymmetric keys with a kid meant for signatures; an issuer never shares a symmetric one."""
    keys = jwks.get("keys")
    if not isinstance(keys, list):
        raise SignalUnavailable("JWKS has no 'keys' list")
    usable = [
        k for k in keys
        if isinstance(k, dict) and isinstance(k.get("kid"), str) and k.get("use", "sig") == "sig"
        and k.get("kty") in ("RSA", "EC", "OKP")
    ][:MAX_KEYS]
    if not usable:
        raise SignalUnavailable("JWKS holds no usable signing key")
    return {k["kid"]: k for k in usable}


def _bind(jwk: dict[str, object], algorithm: str) -> PyJWK | None:
    if jwk.get("alg") not in (None, algorithm):
        return None
    try:
        return PyJWK(jwk, algorithm=algorithm)
    except (jwt.PyJWKError, jwt.InvalidKeyError, KeyError, TypeError, ValueError):
        return None  # the key cannot be used with this algorithm (wrong kty or curve)
