"""The trusted issuers (``identity.issuers``, or the single ``identity.issuer``): which issuer a
token claims, and that issuer's keys.

A token is matched to its issuer by the exact ``iss`` of its unverified claims, before any key is
looked up: a token naming no trusted issuer is refused without a fetch, and one issuer's keys never
verify another's tokens (two issuers may use the same ``kid``). Each issuer has one JWKS, fetched
from its discovery document; the ``iss`` values it lists in ``additionalIssuers`` (Entra's v1
issuer beside its v2 one) share it, so one tenant's keys are fetched once. An issuer whose
discovery fails fails closed for its own tokens only (503); the others keep working.

A reload hands a new list to ``use``: an issuer whose ``issuer`` and discovery URL are unchanged
keeps its keys (no refetch), a new one gets a cache of its own, and a removed one is gone for the
next token. The validator forgets the tokens it verified, so no cached identity outlives its
issuer's removal or a change of its audiences, tenants or claim names.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass

import httpx

from gateway.config import Config
from gateway.config.models import IdentitySettings, IssuerSettings
from gateway.errors import SignalUnavailable
from gateway.identity.jwks import JwksCache

logger = logging.getLogger(__name__)

ISSUER_NOT_ACCEPTED = "token issuer not accepted"
TENANT_NOT_ACCEPTED = "token tenant not accepted"


class IssuersUnavailable(SignalUnavailable):
    """Some issuers' discovery or keys could not be fetched: ``failed`` names each, with why."""

    def __init__(self, failed: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{name}: {why}" for name, why in failed))
        self.failed = failed


@dataclass(frozen=True, slots=True)
class TrustedIssuer:
    settings: IssuerSettings
    keys: JwksCache

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def algorithms(self) -> frozenset[str]:
        return frozenset(a.value for a in self.settings.algorithms)


def accepted_audiences(settings: IssuerSettings, host_audiences: frozenset[str]) -> frozenset[str]:
    """The host's audiences, narrowed to the issuer's own when it lists some: an issuer's
    ``audiences`` can only take audiences away from a host, never add one."""
    return host_audiences & frozenset(settings.audiences) if settings.audiences else host_audiences


def tenant_problem(settings: IssuerSettings, claims: dict[str, object]) -> str | None:
    """With ``tenantIds``, the token's ``tid`` must be one of them (compared as GUIDs)."""
    if not settings.tenant_ids:
        return None
    tid = claims.get("tid")
    try:
        tenant = uuid.UUID(tid) if isinstance(tid, str) and len(tid) <= 64 else None
    except ValueError:
        tenant = None
    return None if tenant in settings.tenant_ids else TENANT_NOT_ACCEPTED


def issuer_of(trusted: Iterable[IssuerSettings], iss: object) -> IssuerSettings | None:
    """The configured issuer whose tokens carry exactly this ``iss`` (for replay, without keys)."""
    return next((entry for entry in trusted if isinstance(iss, str) and iss in entry.issued_as), None)


class TrustedIssuers:
    """The issuers in force and their keys; ``use`` swaps them on reload."""

    def __init__(self, identity: IdentitySettings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._identity = identity  # the cache settings (restart-only) every issuer's keys share
        self._transport = transport
        self._entries: tuple[TrustedIssuer, ...] = ()
        self._by_iss: dict[str, TrustedIssuer] = {}
        self.use(identity)

    @classmethod
    def with_keys(cls, identity: IdentitySettings, keys: JwksCache) -> TrustedIssuers:
        """The first issuer of ``identity`` with keys built elsewhere (a clock or transport of its own)."""
        issuers = cls(identity)
        issuers._entries = (TrustedIssuer(identity.trusted[0], keys),)
        issuers._by_iss = dict.fromkeys(identity.trusted[0].issued_as, issuers._entries[0])
        return issuers

    @property
    def entries(self) -> tuple[TrustedIssuer, ...]:
        return self._entries

    @property
    def algorithms(self) -> frozenset[str]:
        """Every issuer's algorithms: what a header may name before its issuer is known."""
        return frozenset().union(*(entry.algorithms for entry in self._entries))

    def of(self, iss: object) -> TrustedIssuer | None:
        return self._by_iss.get(iss) if isinstance(iss, str) else None

    def named(self, name: str) -> TrustedIssuer | None:
        return next((entry for entry in self._entries if entry.name == name), None)

    def use(self, identity: IdentitySettings) -> list[TrustedIssuer]:
        """Trust exactly these issuers from now on; returns the ones whose keys must be fetched."""
        kept = {(e.settings.issuer, e.settings.discovery): e.keys for e in self._entries}
        entries, new = [], []
        for settings in identity.trusted:
            keys = kept.get((settings.issuer, settings.discovery))
            entry = TrustedIssuer(settings, keys if keys is not None else self._keys(settings))
            entries.append(entry)
            if keys is None:
                new.append(entry)
        self._entries = tuple(entries)
        self._by_iss = {iss: entry for entry in entries for iss in entry.settings.issued_as}
        return new

    async def refresh(self, entries: Iterable[TrustedIssuer] | None = None) -> None:
        """Fetch every issuer's keys now (at start, or the new ones after a reload); every issuer
        is tried, and SignalUnavailable names those that failed."""
        failed = []
        for entry in self._entries if entries is None else entries:
            try:
                await entry.keys.refresh()
            except SignalUnavailable as error:
                failed.append((entry.name, str(error)))
        if failed:
            raise IssuersUnavailable(failed)

    def _keys(self, settings: IssuerSettings) -> JwksCache:
        identity = self._identity
        return JwksCache(settings.issuer, discovery_url=settings.discovery,
                         cache_seconds=identity.jwks_cache_seconds,
                         min_refresh_interval=identity.jwks_refresh_min_interval_seconds,
                         timeout=identity.http_timeout_seconds, transport=self._transport,
                         max_stale_seconds=identity.jwks_max_stale_seconds)


async def fetch_issuer_keys(refresh: Awaitable[None], config: Config, context: str = "") -> None:
    """Fetch the issuers' keys; each that fails is logged at its issuer's line (which one to look
    at), and its tokens get 503 until a later fetch succeeds."""
    try:
        await refresh
    except IssuersUnavailable as error:
        for name, why in error.failed:
            logger.warning("%s%s", context, config.issuer_problem(
                name, f"discovery or signing keys not fetched ({why}); this issuer's tokens get 503 until they are"))
