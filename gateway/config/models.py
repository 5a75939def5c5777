"""Typed models of the YAML files under a config directory.

Keys use Entra's spelling (``grantControls``, ``builtInControls``); Python uses snake_case.
Every model forbids unknown keys, so a typo is an error rather than a silently ignored rule.

Files:
    portcullis.yaml   gateway listener, identity provider, protected hosts, resources, apps
    policies.yaml     Conditional Access policies
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated
from urllib.parse import parse_qsl, urlsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    IPvAnyNetwork,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.config.base import Model
from gateway.config.device_certificates import DeviceCertificateSettings
from gateway.http import headers
from gateway.policy.device_filter import Rule, RuleSyntaxError, parse_rule
from gateway.policy.model import (
    ALL,
    BuiltInControl,
    ClientAppType,
    ComplianceSettings,
    DeviceFilterMode,
    DevicePlatform,
    DeviceThreatLevel,
    GrantOperator,
    Listener,
    PersistentBrowser,
    PolicyState,
)

HOST_NAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
NAME_HELP = "lower-case letters, digits, '.', '_' and '-', starting with a letter or digit"


AUTHENTICATION_CONTEXT_ID = r"^c([1-9]|[1-9][0-9])$"  # Entra: c1 to c99

class SigningAlgorithm(StrEnum):
    """Asymmetric JWS algorithms only: ``none`` and HMAC are never accepted for an issuer."""

    RS256 = "RS256"
    RS384 = "RS384"
    RS512 = "RS512"
    PS256 = "PS256"
    PS384 = "PS384"
    PS512 = "PS512"
    ES256 = "ES256"
    ES384 = "ES384"
    ES512 = "ES512"
    EdDSA = "EdDSA"


class PlatformOrAll(StrEnum):
    all = "all"
    android = "android"
    ios = "iOS"
    windows = "windows"
    macos = "macOS"
    linux = "linux"


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_url(value: str, *, what: str) -> str:
    """https everywhere; plain http only on loopback (demo issuer, backends on the same host)."""
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"{value!r} is not an absolute http(s) URL")
    if parts.scheme == "http" and not _is_loopback_host(parts.hostname):
        raise ValueError(f"{what} {value!r} must use https (plain http is allowed on loopback only)")
    return value


class Listen(Model):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8443


class ClientLimitSettings(Model):
    """How long a client may take (docs/deployment.md, "Limits and timeouts"); mitmproxy itself
    has no deadline for a request head, so slow clients would hold connections for ever."""

    header_timeout_seconds: Annotated[float, Field(gt=0, le=300)] = 10.0
    keep_alive_timeout_seconds: Annotated[float, Field(gt=0, le=3600)] = 60.0
    body_grace_seconds: Annotated[float, Field(gt=0, le=3600)] = 20.0
    body_min_bytes_per_second: Annotated[float, Field(gt=0, le=1e9)] = 500.0
    # Keep-alive connections end after this many requests or this age (nginx's keepalive_requests
    # and keepalive_time), so clients reconnect and the kernel spreads them across workers again.
    max_requests_per_connection: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    max_connection_age_seconds: Annotated[float, Field(gt=0, le=86_400)] = 3600.0


class CertificateFile(Model):
    """A PEM file holding a certificate chain and its private key, served for these host names."""

    hosts: Annotated[list[str], Field(min_length=1)]
    file: Path


def proxy_networks(value: object) -> object:
    """Each entry a network with its prefix length; never every address, or any client could
    name its own address (and with it a trusted named location)."""
    for item in value if isinstance(value, list) else []:
        if not isinstance(item, str) or "/" not in item:
            raise ValueError(f"{item!r} needs a prefix length, like 10.0.1.0/24 (or /32 for one address)")
        try:
            network = ipaddress.ip_network(item)
        except ValueError as error:
            raise ValueError(f"{item!r}: {error}") from None
        if network.prefixlen == 0:
            raise ValueError(f"{item!r} trusts every address, so any client could choose the address the "
                             "gateway sees; list only your load balancers' addresses")
    return value


class GatewaySettings(Model):
    listen: Listen = Listen()
    certificates: Annotated[list[CertificateFile], Field(min_length=1)]
    state_dir: Path = Path("../.portcullis")
    remediation_url: str = "https://portal.manage.microsoft.com/"
    service_host: str | None = None  # the gateway's own endpoints (MTD webhook); list it in a certificate
    trusted_proxies: list[IPvAnyNetwork] = []  # load balancers whose X-Forwarded-For names the client
    client_limits: ClientLimitSettings = ClientLimitSettings()

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _proxy_networks(cls, value: object) -> object:
        return proxy_networks(value)

    @field_validator("remediation_url")
    @classmethod
    def _remediation_url(cls, value: str) -> str:
        """It becomes a link on block pages: an http(s) URL, never ``javascript:`` or relative."""
        return _check_url(value, what="remediationUrl")


def _no_symmetric(value: object) -> object:
    if isinstance(value, list):
        for item in value:
            if isinstance(item, str) and (item.lower() == "none" or item.upper().startswith("HS")):
                raise ValueError(
                    f"{item!r} is never accepted: tokens must be signed with the issuer's "
                    "private key (use RS*, PS*, ES* or EdDSA)"
                )
    return value


Algorithms = Annotated[list[SigningAlgorithm], Field(min_length=1), BeforeValidator(_no_symmetric)]
CLAIM_NAME = re.compile(r"^[A-Za-z0-9_:.-]{1,64}$")
DEFAULT_ISSUER_NAME = "default"  # the single ``identity.issuer`` form's name in policies, logs and readiness


def _claim_names(value: object) -> object:
    """``userName: preferred_username`` is short for a list of one; the first present claim wins."""
    return [value] if isinstance(value, str) else value


ClaimNames = Annotated[list[Annotated[str, Field(pattern=CLAIM_NAME.pattern)]], Field(min_length=1, max_length=4),
                       BeforeValidator(_claim_names)]


class ClaimSettings(Model):
    """Where an issuer puts what policy reads (Entra's names by default; Keycloak: ``userName:
    preferred_username``). Each is a claim name or a list of them, the first present one used."""

    user_name: ClaimNames = ["upn", "preferred_username"]
    client_id: ClaimNames = ["azp", "appid"]  # v2 tokens: azp; v1: appid
    device_id: ClaimNames = ["deviceid"]
    groups: ClaimNames = ["groups"]


class IssuerSettings(Model):
    """One trusted OIDC issuer. ``issuer`` is the exact ``iss`` of its tokens and the issuer its
    discovery document must name; ``additionalIssuers`` are more exact ``iss`` values signed with
    the same keys (Entra's v1 ``https://sts.windows.net/<tid>/`` beside its v2 issuer), verified
    with the one JWKS fetched for ``issuer``."""

    name: str
    issuer: str
    additional_issuers: Annotated[list[str], Field(max_length=8)] = []
    discovery_url: str | None = None  # default: <issuer>/.well-known/openid-configuration
    algorithms: Algorithms = [SigningAlgorithm.RS256]
    audiences: list[Annotated[str, Field(min_length=1)]] = []  # empty: the host's; else only these of the host's
    tenant_ids: list[uuid.UUID] = []  # empty: any tid; else the token's tid must be one of them
    claims: ClaimSettings = ClaimSettings()

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError(f"{value!r} is not a valid name ({NAME_HELP})")
        return value

    @field_validator("issuer")
    @classmethod
    def _issuer_url(cls, value: str) -> str:
        """Kept exactly as written: ``iss`` is compared byte for byte, and Entra v1 issuers
        (``https://sts.windows.net/<tenant>/``) end with a slash."""
        return _check_url(value, what="issuer")

    @field_validator("additional_issuers")
    @classmethod
    def _additional_urls(cls, value: list[str]) -> list[str]:
        return [_check_url(item, what="additionalIssuers entry") for item in value]

    @field_validator("discovery_url")
    @classmethod
    def _discovery_url(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value, what="discoveryUrl")

    @field_validator("tenant_ids", mode="before")
    @classmethod
    def _tenant_ids(cls, value: object) -> object:
        if not isinstance(value, list):
            return value
        try:
            return [uuid.UUID(item) if isinstance(item, str) else item for item in value]
        except ValueError as error:
            raise ValueError(f"a tenant id is a GUID: {error}") from None

    @property
    def issued_as(self) -> tuple[str, ...]:
        """Every exact ``iss`` this issuer's tokens may carry."""
        return (self.issuer, *self.additional_issuers)

    @property
    def discovery(self) -> str:
        return self.discovery_url or f"{self.issuer.rstrip('/')}/.well-known/openid-configuration"


class IdentitySettings(Model):
    """Either ``issuer`` (one issuer, named ``default``) or ``issuers`` (a list); the JWKS cache
    settings apply to every issuer."""

    issuer: str | None = None
    algorithms: Algorithms = [SigningAlgorithm.RS256]  # of the single ``issuer``; with ``issuers``, each its own
    issuers: list[IssuerSettings] = []
    clock_skew_seconds: Annotated[int, Field(ge=0, le=300)] = 30
    jwks_cache_seconds: Annotated[int, Field(ge=60, le=86400)] = 3600
    jwks_refresh_min_interval_seconds: Annotated[int, Field(ge=1, le=3600)] = 30
    jwks_max_stale_seconds: Annotated[int, Field(ge=0, le=7 * 86400)] = 86400
    http_timeout_seconds: Annotated[float, Field(gt=0, le=30)] = 5.0

    @field_validator("issuer")
    @classmethod
    def _issuer_url(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value, what="issuer")

    @model_validator(mode="after")
    def _one_form(self) -> IdentitySettings:
        if (self.issuer is None) == (not self.issuers):
            raise ValueError("give either 'issuer' (one issuer) or 'issuers' (a list), not both or neither")
        if self.issuers and "algorithms" in self.model_fields_set:
            raise ValueError("with 'issuers', give each issuer its own 'algorithms'")
        return self

    @property
    def trusted(self) -> tuple[IssuerSettings, ...]:
        """Every trusted issuer: the single ``issuer`` form is a list of one, named ``default``."""
        if self.issuer is not None:
            return (IssuerSettings.model_construct(
                name=DEFAULT_ISSUER_NAME, issuer=self.issuer, additional_issuers=[], discovery_url=None,
                algorithms=self.algorithms, audiences=[], tenant_ids=[], claims=ClaimSettings()),)
        return tuple(self.issuers)


AUTH_PARAM_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")  # an RFC 9110 token
QUOTABLE = re.compile(r"^[\x20\x21\x23-\x5b\x5d-\x7e]{0,512}$")  # printable ASCII without '"' and '\\'
SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]{1,256}$")  # RFC 6749 §3.3
RESERVED_CHALLENGE_PARAMETERS = frozenset({"realm", "error", "error_description", "error_uri", "scope",
                                           "resource_metadata"})


class ChallengePreset(StrEnum):
    exchange = "exchange"  # what Exchange with Entra (hybrid modern authentication) announces


class ChallengeSettings(Model):
    """What a 401 tells a client about where to sign in (gateway/identity/discovery.py): the
    parameters Exchange's clients read, and the RFC 9728 protected resource metadata."""

    preset: ChallengePreset | None = None
    tenant_id: uuid.UUID | None = None  # Entra tenant (directory) id: the preset's trusted_issuers
    authorization_uri: str | None = None  # the preset's default: https://login.windows.net/common/oauth2/authorize
    scopes: Annotated[list[str], Field(max_length=32)] = []  # scopes_supported in the metadata document
    parameters: Annotated[dict[str, str], Field(max_length=16)] = {}  # more auth-params, or the preset's replaced

    @field_validator("tenant_id", mode="before")
    @classmethod
    def _tenant_id(cls, value: object) -> object:
        return uuid.UUID(value) if isinstance(value, str) else value

    @field_validator("authorization_uri")
    @classmethod
    def _authorization_uri(cls, value: str | None) -> str | None:
        return None if value is None else _quotable(_check_url(value, what="authorizationUri"))

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: list[str]) -> list[str]:
        for scope in value:
            if not SCOPE_TOKEN.match(scope):
                raise ValueError(f"{scope!r} is not an OAuth scope (printable ASCII, no space, '\"' or '\\')")
        return value

    @field_validator("parameters")
    @classmethod
    def _parameters(cls, value: dict[str, str]) -> dict[str, str]:
        for name, parameter in value.items():
            if not AUTH_PARAM_NAME.match(name):
                raise ValueError(f"{name!r} is not an auth-param name (RFC 9110 token characters)")
            if name.lower() in RESERVED_CHALLENGE_PARAMETERS:
                raise ValueError(f"{name!r} is set by the gateway itself")
            _quotable(parameter)
        return value

    @model_validator(mode="after")
    def _preset_needs_tenant(self) -> ChallengeSettings:
        if self.preset is ChallengePreset.exchange and self.tenant_id is None and \
                "trusted_issuers" not in self.parameters:
            raise ValueError("preset exchange needs tenantId (your Entra tenant id, for trusted_issuers)")
        return self


def _quotable(value: str) -> str:
    if not QUOTABLE.match(value):
        raise ValueError(f"{value!r} cannot be sent in a challenge (printable ASCII without '\"' or '\\', "
                         "at most 512 characters)")
    return value


class ProtectedHost(Model):
    """A host name the gateway answers for, the upstream it forwards to, and the token audiences
    that are valid for it (a SharePoint token must not open Exchange)."""

    upstream: str
    audiences: Annotated[list[str], Field(min_length=1)]
    challenge: ChallengeSettings = ChallengeSettings()
    # Basic authentication on ActiveSync, believed only with a device certificate naming a compliant
    # device of that user (gateway/identity/legacy_activesync.py); off: Basic is refused
    legacy_active_sync: bool = False
    device_certificates: DeviceCertificateSettings | None = None  # None: no client certificate is asked for

    @model_validator(mode="after")
    def _legacy_needs_certificates(self) -> ProtectedHost:
        if self.legacy_active_sync and self.device_certificates is None:
            raise ValueError("legacyActiveSync needs deviceCertificates on the same host: Basic is believed only "
                             "on a connection whose device certificate names the user's compliant device")
        return self

    @field_validator("upstream")
    @classmethod
    def _upstream_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"{value!r}: an upstream is scheme://host[:port] with no path")
        return _check_url(value, what="upstream").rstrip("/")


class Resource(Model):
    """A named part of protected hosts: host names and path patterns. A pattern is a path prefix
    matched on whole segments; ``*`` stands for exactly one segment
    (``/sites/*/_layouts/15/download.aspx``). ``public: true`` lets requests through without a
    token; it is never the default and covers only the paths listed."""

    hosts: Annotated[list[str], Field(min_length=1)]
    paths: Annotated[list[str], Field(min_length=1)]
    display_name: str | None = None
    public: bool = False
    downloads: bool = False  # every response of it saves a file: blockDownloads refuses the request itself
    # Entra's authentication contexts (c1..c99): policies that target one apply here (a step-up)
    authentication_contexts: list[Annotated[str, Field(pattern=AUTHENTICATION_CONTEXT_ID)]] = []

    @field_validator("paths")
    @classmethod
    def _absolute_paths(cls, value: list[str]) -> list[str]:
        for path in value:
            if not path.startswith("/") or any(c in path for c in "?#%;\\"):
                raise ValueError(f"{path!r} must be a plain absolute path like '/owa/' (no query, %, ; or \\)")
            segments = path.split("/")
            if any(segment in (".", "..") for segment in segments):
                raise ValueError(f"{path!r} must not contain '.' or '..' segments")
            if any("*" in segment and segment != "*" for segment in segments):
                raise ValueError(f"{path!r}: '*' stands for a whole segment ('/sites/*/...'), not part of one")
        return value


class ResourcePreset(StrEnum):
    exchange = "exchange"
    sharepoint = "sharepoint"


# The widest range a named location may hold without ``allowWideRanges``: IPv4 /8 (Entra itself
# accepts no wider mask in a named location), IPv6 /32 (what a registry allocates to a whole
# provider; an organisation's site is a /48). Wider, a location covers far more than any one
# organisation's network, and excluding it (or AllTrusted) switches a policy off for most clients.
WIDEST_PREFIX = {4: 8, 6: 32}


def _cidr(item: object) -> object:
    if not isinstance(item, str) or "/" not in item:
        raise ValueError(f"{item!r} needs a prefix length, like 10.20.0.0/16 (or /32 for one address)")
    try:
        ipaddress.ip_network(item)
    except ValueError as error:
        raise ValueError(f"{item!r}: {error}") from None
    return item


def _bounded(network: ipaddress.IPv4Network | ipaddress.IPv6Network,
             info: ValidationInfo) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """Never every address; nothing wider than ``WIDEST_PREFIX`` unless the location says so."""
    if network.prefixlen == 0:
        raise ValueError(f"'{network}' is every IPv{network.version} address: a location holding it matches every "
                         "client, so excluding it (or AllTrusted) switches a policy off for everyone; a policy for "
                         "every address says All")
    widest = WIDEST_PREFIX[network.version]
    if network.prefixlen < widest and not info.data.get("allow_wide_ranges"):
        raise ValueError(f"'{network}' is wider than /{widest}, far more than one organisation's network: list your "
                         "own ranges, or set allowWideRanges: true on this location if you mean it")
    return network


class NamedLocation(Model):
    """IP ranges the gateway sees clients come from; ``trusted`` ones make up ``AllTrusted``."""

    allow_wide_ranges: bool = False  # before ipRanges: their check reads it
    ip_ranges: Annotated[list[Annotated[IPvAnyNetwork, BeforeValidator(_cidr), AfterValidator(_bounded)]],
                         Field(min_length=1)]
    trusted: bool = False


class DeviceCacheSettings(Model):
    """Lookups are cached per device; a failing source is answered from cache up to
    ``maxStalenessSeconds``, then requests are blocked."""

    ttl_seconds: Annotated[float, Field(gt=0, le=3600)] = 60
    miss_ttl_seconds: Annotated[float, Field(gt=0, le=600)] = 5
    max_staleness_seconds: Annotated[float, Field(ge=0, le=86400)] = 300
    max_entries: Annotated[int, Field(ge=100, le=10_000_000)] = 100_000


class NoPolicyDevices(StrEnum):
    compliant = "compliant"
    not_compliant = "notCompliant"


class ComplianceTenantSettings(Model):
    """Intune's tenant settings: how devices with no compliance policy count, and the compliance
    status validity period (a device that has not synced within it is noncompliant)."""

    devices_without_compliance_policy: NoPolicyDevices = NoPolicyDevices.not_compliant
    validity_days: Annotated[int, Field(ge=1, le=120)] | None = 30
    block_without_partner_data: bool = False  # Intune's "block when no data from the MTD partner"

    def settings(self) -> ComplianceSettings:
        return ComplianceSettings(
            devices_without_policy_compliant=self.devices_without_compliance_policy is NoPolicyDevices.compliant,
            validity=timedelta(days=self.validity_days) if self.validity_days else None,
            block_without_partner_data=self.block_without_partner_data,
        )


class GraphConnectorSettings(Model):
    """Intune's managed devices from Microsoft Graph, with OAuth 2.0 client credentials."""

    tenant_id: Annotated[str, Field(min_length=1)]
    client_id: Annotated[str, Field(min_length=1)]
    client_secret_env: Annotated[str, Field(pattern=r"^[A-Z_][A-Z0-9_]*$")]
    authority: str = "https://login.microsoftonline.com"
    graph_url: str = "https://graph.microsoft.com/v1.0"
    sync_interval_seconds: Annotated[int, Field(ge=60, le=86400)] = 900
    lookups_per_second: Annotated[float, Field(gt=0, le=100)] = 5

    @field_validator("authority", "graph_url")
    @classmethod
    def _https(cls, value: str) -> str:
        return _check_url(value, what="URL").rstrip("/")


class AppProtectionSettings(Model):
    """Intune app protection (MAM) registrations, read by the ``compliantApplication`` grant
    control. ``registrations``: a YAML seed (written into the device store's database at every start,
    or read alone without one). ``appIdentifiers``: per application (a name of ``applications``),
    its iOS bundle ids and Android package ids (Graph's ``appIdentifier``), which registrations name
    apps by. ``maxSyncAgeSeconds``: a registration whose app has not checked in with Intune for
    longer no longer counts (Intune's own "Offline grace period" blocks access after 720 minutes;
    24 hours leaves a phone that was off overnight its access); null: check-ins are not looked at."""

    registrations: Path | None = None
    app_identifiers: dict[str, Annotated[list[Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,255}$")]],
                                         Field(min_length=1)]] = {}
    max_sync_age_seconds: Annotated[int, Field(ge=60, le=30 * 86400)] | None = 86400


class DeviceSignalsSettings(Model):
    """``inventory``: a YAML file read at start. ``database``: the SQLite store (``portcullis
    devices ...``). With both, the YAML file seeds the store each time the gateway starts."""

    inventory: Path | None = None
    database: Path | None = None
    graph: GraphConnectorSettings | None = None
    cache: DeviceCacheSettings = DeviceCacheSettings()
    compliance: ComplianceTenantSettings = ComplianceTenantSettings()
    app_protection: AppProtectionSettings = AppProtectionSettings()



class StateSettings(Model):
    """Where the state every worker and host must agree on lives: devices and MTD verdicts,
    browser sessions and their revocation, webhook nonces. ``state: redis://host:6379/0`` is short
    for ``{redis: ...}``. The password comes from the environment (``passwordEnv``), never from
    the URL in a config file."""

    redis: str
    password_env: Annotated[str | None, Field(pattern=r"^[A-Z_][A-Z0-9_]*$")] = None
    key_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")] = "portcullis:"

    @model_validator(mode="before")
    @classmethod
    def _url_alone(cls, value: object) -> object:
        return {"redis": value} if isinstance(value, str) else value

    @field_validator("redis")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018  (raises on a bad port)
        except ValueError as error:
            raise ValueError(f"{value!r} is not a URL ({error})") from None
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"{value!r}: state is a redis://, rediss:// or unix:// URL")
        query = {name for name, _ in parse_qsl(parts.query, keep_blank_values=True)}
        if parts.password or "password" in query:
            raise ValueError("the Redis password does not belong in a config file: name an environment variable "
                             "in state.passwordEnv")
        if query - {"db"}:
            raise ValueError(f"{value!r}: the only URL parameter accepted is db (TLS checks and the rest are not "
                             "for a config file to turn off)")
        if parts.scheme == "redis" and parts.hostname and not _is_loopback_host(parts.hostname):
            raise ValueError(f"{value!r}: plain redis:// is allowed on loopback only; use rediss:// (TLS)")
        return value


class MtdPartnerSettings(Model):
    """An MTD partner that pushes device risk to the gateway (see gateway/signals/mtd.py)."""

    secret_env: Annotated[str, Field(pattern=r"^[A-Z_][A-Z0-9_]*$")]  # the shared secret's environment variable
    timestamp_tolerance_seconds: Annotated[int, Field(ge=30, le=3600)] = 300
    unresponsive_after_seconds: Annotated[int, Field(ge=60, le=90 * 86400)] = 7 * 86400


class KioskSettings(Model):
    """A forward proxy for kiosk browsers (they trust the gateway's CA). Requests through it are
    unmanaged browsers, from the named location ``location``, whatever they claim."""

    listen: Listen
    location: Annotated[str, Field(pattern=NAME.pattern)] = "kiosk"
    pass_through: list[str] = []  # host:port tunnelled untouched (e.g. the identity provider)
    allow: list[str] = []  # host names intercepted and forwarded without policy; the rest is denied

    @field_validator("pass_through")
    @classmethod
    def _host_ports(cls, value: list[str]) -> list[str]:
        for entry in value:
            host, _, port = entry.rpartition(":")
            if not port.isdigit() or not (HOST_NAME.match(host) or _is_ip(host)):
                raise ValueError(f"{entry!r} must be host:port (the exact destination to tunnel, e.g. "
                                 "login.microsoftonline.com:443)")
        return value

    @field_validator("allow")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        for host in value:
            if not HOST_NAME.match(host) and not _is_ip(host):
                raise ValueError(f"{host!r} is not a lower-case host name or an IP address")
        return value


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class BrowserSignInSettings(Model):
    """Browsers sign in with the OIDC code flow (PKCE) and get a gateway session cookie."""

    client_id: Annotated[str, Field(min_length=1)]
    session_lifetime_seconds: Annotated[int, Field(ge=300, le=7 * 86400)] = 8 * 3600
    session_key_env: Annotated[str, Field(pattern=r"^[A-Z_][A-Z0-9_]*$")] | None = None  # else stateDir/session.key
    issuer: str | None = None  # the name of the issuer browsers sign in with; default the first of identity


HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")  # an RFC 9110 token
GATEWAY_HEADERS = frozenset(headers.fold(h) for h in (headers.CORRELATION_ID, headers.USER, headers.CLIENT_APP,
                                                      headers.DEVICE_ID))


class UpstreamAssertionSettings(Model):
    """The signed identity assertion on every forwarded request (gateway/identity/assertion.py).
    Its header must be one the gateway strips from client requests, so an upstream never sees a
    copy a client made up."""

    enabled: bool = True
    header: str = "X-Portcullis-Assertion"
    lifetime_seconds: Annotated[int, Field(ge=10, le=600)] = 60
    key_file: Path | None = None  # an ES256 (P-256) private key, PEM; default <stateDir>/assertion-key.pem

    @field_validator("header")
    @classmethod
    def _stripped_header(cls, value: str) -> str:
        if not HEADER_NAME.match(value):
            raise ValueError(f"{value!r} is not a header name")
        if not headers.is_client_identity_header(value):
            raise ValueError(f"{value!r} is not a header the gateway strips from client requests, so a client could "
                             "send its own copy; use an X-Portcullis-* name")
        if headers.fold(value) in GATEWAY_HEADERS:
            raise ValueError(f"{value!r} is already one of the gateway's own headers")
        return value


class DecisionLogSettings(Model):
    path: Path = Path("../.portcullis/decisions.jsonl")
    max_file_bytes: Annotated[int, Field(ge=64 * 1024, le=2**40)] = 100 * 1024 * 1024  # then rotate
    keep_files: Annotated[int, Field(ge=1, le=1000)] = 10  # rotated files kept: decisions.jsonl.1 ... .N
    queue_size: Annotated[int, Field(ge=100, le=1_000_000)] = 10_000  # beyond it records are dropped, counted
    pseudonymize_users: bool = False  # user names and ids replaced by a keyed hash (data minimisation)
    pseudonym_key_env: Annotated[str, Field(pattern=r"^[A-Z_][A-Z0-9_]*$")] | None = None  # else stateDir/pseudonym.key


class AdminListen(Listen):
    port: Annotated[int, Field(ge=0, le=65535)] = 9090


class ForwardAuthListen(Listen):
    port: Annotated[int, Field(ge=0, le=65535)] = 9404


LOOPBACK_PROXIES = [ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128")]


class ForwardAuthTlsSettings(Model):
    """TLS on the forward-auth listener (docs/forward-auth.md, "TLS and proxy certificates").
    With ``proxyCaFiles`` the handshake requires a client certificate from one of those CAs, and
    with ``proxyNames`` that certificate must name one of them (a SAN DNS name or URI, or the
    subject CN); ``trustedProxies`` still applies on top."""

    certificate_file: Path  # PEM: the certificate chain, and its key unless keyFile names another file
    key_file: Path | None = None
    proxy_ca_files: Annotated[list[Path], Field(max_length=16)] = []  # PEM: the CAs of the edges' certificates
    proxy_names: Annotated[list[Annotated[str, Field(min_length=1, max_length=255)]], Field(max_length=64)] = []

    @model_validator(mode="after")
    def _names_need_a_ca(self) -> ForwardAuthTlsSettings:
        if self.proxy_names and not self.proxy_ca_files:
            raise ValueError("proxyNames needs proxyCaFiles: a name is believed only from a certificate verified "
                             "against the CAs that issue the edges' certificates")
        return self


class ForwardAuthSettings(Model):
    """The forward-auth listener (gateway/web/forward_auth.py): an edge proxy (nginx
    ``auth_request``, Caddy ``forward_auth``, Traefik ``ForwardAuth``) asks it whether a request
    may go upstream. Plain HTTP unless ``tls`` is set, so loopback by default; the original
    request's headers are believed only from ``trustedProxies`` (the edge's addresses), and with
    ``tls.proxyCaFiles`` only from a caller that also presents a proxy certificate."""

    listen: ForwardAuthListen = ForwardAuthListen()
    trusted_proxies: Annotated[list[IPvAnyNetwork], Field(min_length=1)] = LOOPBACK_PROXIES
    hosts: list[str] = []  # the protected hosts decided here; empty: every protected host
    tls: ForwardAuthTlsSettings | None = None  # none: plain HTTP (`check` warns off loopback)

    @property
    def on_loopback(self) -> bool:
        return _is_loopback_host(self.listen.host)

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _proxy_networks(cls, value: object) -> object:
        return proxy_networks(value)


class AdminSettings(Model):
    """The admin API and dashboard (gateway/web/admin.py). Plain HTTP, so loopback by default: put a
    TLS reverse proxy in front to reach it from elsewhere. Callers present access tokens from the
    configured issuer whose ``aud`` is ``audience`` and whose ``roles`` name Portcullis.Reader or
    Portcullis.Operator."""

    listen: AdminListen = AdminListen()
    audience: Annotated[str, Field(min_length=1)]
    audit_log: Path = Path("../.portcullis/admin-audit.jsonl")  # one JSON line per admin request
    public_url: str | None = None  # https://host[:port]: the origin browsers use through a TLS reverse proxy
    issuer: str | None = None  # the name of the only issuer whose tokens it takes; default the first of identity

    @property
    def on_loopback(self) -> bool:
        return _is_loopback_host(self.listen.host)

    @field_validator("public_url")
    @classmethod
    def _public_origin(cls, value: str | None) -> str | None:
        """Kept as an origin (lower case, no default port), the way browsers send ``Origin``."""
        if value is None:
            return None
        usage = "publicUrl is the https origin of the TLS reverse proxy in front, like https://admin.contoso.com"
        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError as error:
            raise ValueError(f"{value!r} is not a URL ({error}): {usage}") from None
        if parts.scheme != "https" or not parts.hostname or "@" in parts.netloc:
            raise ValueError(f"{value!r}: {usage}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"{value!r} has a path: {usage} (the dashboard is served at /)")
        host = parts.hostname.lower()
        host = f"[{host}]" if ":" in host else host
        return f"https://{host}" + (f":{port}" if port not in (None, 443) else "")


class PortcullisFile(Model):
    """``portcullis.yaml``."""

    gateway: GatewaySettings
    identity: IdentitySettings
    protected_hosts: Annotated[dict[str, ProtectedHost], Field(min_length=1)]
    resource_presets: dict[ResourcePreset, Annotated[list[str], Field(min_length=1)]] = {}
    resources: dict[str, Resource] = {}
    authentication_strengths: dict[str, AuthenticationStrengthConfig] = {}  # custom ones, by name
    named_locations: dict[str, NamedLocation] = {}
    applications: dict[str, Annotated[list[str], Field(min_length=1)]] = {}
    device_signals: DeviceSignalsSettings
    mtd_partners: dict[str, MtdPartnerSettings] = {}
    browser_sign_in: BrowserSignInSettings | None = None
    kiosk: KioskSettings | None = None
    decision_log: DecisionLogSettings = DecisionLogSettings()
    upstream_assertion: UpstreamAssertionSettings = UpstreamAssertionSettings()
    admin: AdminSettings | None = None  # no section, no admin listener
    forward_auth: ForwardAuthSettings | None = None  # no section, no forward-auth listener
    state: StateSettings | None = None  # shared by workers and hosts; none: SQLite files and memory

    @field_validator("protected_hosts")
    @classmethod
    def _host_names(cls, value: dict[str, ProtectedHost]) -> dict[str, ProtectedHost]:
        for host in value:
            if not HOST_NAME.match(host):
                raise ValueError(f"{host!r} is not a lower-case DNS host name")
        return value

    @model_validator(mode="after")
    def _settings_agree(self) -> PortcullisFile:
        """Settings that depend on each other, checked in this order: the first problem is reported."""
        self._check_device_stores()
        self._check_hosts()
        self._check_browser_issuer()
        self._check_app_identifiers()
        self._check_forward_auth_hosts()
        return self

    def _check_forward_auth_hosts(self) -> None:
        unknown = [host for host in self.forward_auth.hosts if host not in self.protected_hosts] \
            if self.forward_auth is not None else []
        if unknown:
            raise ValueError(f"forwardAuth.hosts names {', '.join(map(repr, unknown))}, not in protectedHosts")

    def _check_browser_issuer(self) -> None:
        names = [entry.name for entry in self.identity.trusted]
        for key, section in (("browserSignIn", self.browser_sign_in), ("admin", self.admin)):
            if section is not None and section.issuer is not None and section.issuer not in names:
                raise ValueError(f"{key}.issuer {section.issuer!r} is not an issuer of identity; "
                                 f"known: {', '.join(names)}")

    @property
    def admin_issuer(self) -> str:
        """The one issuer the admin API takes tokens from (a partner tenant or a contractors'
        Keycloak could mint any ``roles``): ``admin.issuer``, else the first."""
        wanted = self.admin.issuer if self.admin is not None else None
        return wanted or self.identity.trusted[0].name

    @property
    def browser_issuer(self) -> IssuerSettings:
        """The one issuer browsers sign in with: ``browserSignIn.issuer``, else the first."""
        wanted = self.browser_sign_in.issuer if self.browser_sign_in is not None else None
        return next((e for e in self.identity.trusted if e.name == wanted), self.identity.trusted[0])

    def _check_app_identifiers(self) -> None:
        """Bundle and package ids belong to a configured application, each to one."""
        owners: dict[str, str] = {}
        for name, identifiers in self.device_signals.app_protection.app_identifiers.items():
            if name not in self.applications:
                raise ValueError(f"deviceSignals.appProtection.appIdentifiers: {name!r} is not in applications")
            for identifier in identifiers:
                owner = owners.setdefault(identifier.lower(), name)
                if owner != name:
                    raise ValueError(f"deviceSignals.appProtection.appIdentifiers: {identifier!r} is listed under "
                                     f"{owner!r} and {name!r}")

    def _check_device_stores(self) -> None:
        """Where devices live, and what needs a device store or shared state."""
        signals = self.device_signals
        if self.state is not None and signals.database is not None:
            raise ValueError("deviceSignals.database and state both say where devices live: with state, devices "
                             "live in Redis (remove deviceSignals.database)")
        if signals.inventory is None and signals.database is None and self.state is None:
            raise ValueError("deviceSignals: give 'inventory' (a YAML file), 'database' (SQLite), or both")
        if signals.graph is not None and signals.database is None and self.state is None:
            raise ValueError("deviceSignals.graph syncs into a device store: set deviceSignals.database (or state)")
        if self.state is not None and self.browser_sign_in is not None and not self.browser_sign_in.session_key_env:
            raise ValueError("with state, every host must read every other host's session cookies: set "
                             "browserSignIn.sessionKeyEnv and give every host the same key")
        if self.mtd_partners and signals.database is None and self.state is None:
            raise ValueError("mtdPartners write threat levels into a device store: set deviceSignals.database "
                             "(or state)")

    def _check_hosts(self) -> None:
        """The service host, the kiosk's destinations and the protected hosts stay apart."""
        service_host = self.gateway.service_host
        if service_host is not None and service_host in self.protected_hosts:
            raise ValueError(f"gateway.serviceHost {service_host!r} is also a protected host")
        if self.kiosk is not None:
            upstreams = {urlsplit(p.upstream).netloc for p in self.protected_hosts.values()}
            for entry in [*self.kiosk.pass_through, *self.kiosk.allow]:
                host = entry.rpartition(":")[0] if entry in self.kiosk.pass_through else entry
                if host in self.protected_hosts or entry in upstreams or host == service_host:
                    raise ValueError(f"kiosk destination {entry!r} is a protected host or an upstream: kiosks "
                                     "reach those only through policy")
        certified = {h for c in self.gateway.certificates for h in c.hosts}
        if service_host is not None and service_host not in certified:
            raise ValueError(f"gateway.serviceHost {service_host!r} is in no gateway.certificates entry")

    @field_validator("applications", mode="before")
    @classmethod
    def _one_client_id_or_many(cls, value: object) -> object:
        """``outlook-mobile: <client id>`` is short for a list of one."""
        if isinstance(value, dict):
            return {k: [v] if isinstance(v, str) else v for k, v in value.items()}
        return value

    @field_validator("resources", "applications", "named_locations")
    @classmethod
    def _names(cls, value: dict[str, object]) -> dict[str, object]:
        for name in value:
            if not NAME.match(name):
                raise ValueError(f"{name!r} is not a valid name ({NAME_HELP})")
        return value


class AuthenticationStrengthConfig(Model):
    """A custom authentication strength: the method combinations (``amr`` values, all present)
    that satisfy it, and the ``acr`` values an issuer uses to say it was met."""

    allowed_combinations: Annotated[list[Annotated[list[Annotated[str, Field(min_length=1, max_length=32)]],
                                                   Field(min_length=1)]], Field(min_length=1, max_length=64)]
    acr_values: list[Annotated[str, Field(pattern=r"^[\x21\x23-\x5b\x5d-\x7e]{1,64}$")]] = []


class Include(Model):
    """Entra's include/exclude pair; ``All`` in ``include`` means every named item."""

    include: list[str] = []
    exclude: list[str] = []


class UsersCondition(Model):
    """Users by UPN or object id, ``All`` or ``None``; groups by the names or ids the token's
    ``groups`` claim carries; issuers by their names in ``identity.issuers`` (a partner tenant's
    guests, a Keycloak's contractors). Exclusions beat inclusions. Naming only groups or issuers
    includes only them: ``includeUsers`` is empty unless written (a policy without ``users`` at all
    covers All)."""

    include_users: list[str] = []
    exclude_users: list[str] = []
    include_groups: list[str] = []
    exclude_groups: list[str] = []
    include_issuers: list[str] = []
    exclude_issuers: list[str] = []


class PlatformsCondition(Model):
    include: Annotated[list[PlatformOrAll], Field(min_length=1)]
    exclude: list[DevicePlatform] = []


class DeviceFilter(Model):
    mode: DeviceFilterMode
    rule: str

    @field_validator("rule")
    @classmethod
    def _parses(cls, value: str) -> str:
        try:
            parse_rule(value)
        except RuleSyntaxError as error:
            raise ValueError(f"device filter rule: {error}") from None
        return value

    @property
    def parsed(self) -> Rule:
        return parse_rule(self.rule)


ALL_USERS = UsersCondition.model_construct(include_users=[ALL], exclude_users=[], include_groups=[],
                                           exclude_groups=[], include_issuers=[], exclude_issuers=[])


class PolicyConditions(Model):
    users: UsersCondition = ALL_USERS
    resources: Include = Include()
    # Entra's conditions.applications.includeAuthenticationContextClassReferences: instead of (or beside)
    # resources, every resource carrying one of these contexts
    authentication_contexts: list[Annotated[str, Field(pattern=AUTHENTICATION_CONTEXT_ID)]] = []
    client_app_types: Annotated[list[ClientAppType], Field(min_length=1)] = [ClientAppType.all]
    platforms: PlatformsCondition | None = None
    locations: Include | None = None
    device_filter: DeviceFilter | None = None

    @model_validator(mode="after")
    def _targets_something(self) -> PolicyConditions:
        if not self.resources.include and not self.authentication_contexts:
            raise ValueError("a policy targets resources (resources.include) or authenticationContexts")
        return self


class GrantControls(Model):
    operator: GrantOperator = GrantOperator.AND
    built_in_controls: list[BuiltInControl] = []
    approved_applications: list[str] = []
    max_device_threat_level: DeviceThreatLevel | None = None
    authentication_strength: str | None = None  # mfa | passwordlessMfa | phishingResistantMfa | a custom one

    @model_validator(mode="after")
    def _consistent(self) -> GrantControls:
        controls = set(self.built_in_controls)
        if BuiltInControl.block in controls and (
            len(controls) > 1 or self.max_device_threat_level is not None
        ):
            raise ValueError("'block' cannot be combined with other grant controls")
        if (BuiltInControl.approved_application in controls) != bool(self.approved_applications):
            raise ValueError(
                "'approvedApplication' in builtInControls and a non-empty 'approvedApplications' "
                "list go together"
            )
        if not controls and self.max_device_threat_level is None and self.authentication_strength is None:
            raise ValueError("grantControls needs at least one control (or leave grantControls out)")
        if self.operator is GrantOperator.OR and self.max_device_threat_level is not None:
            raise ValueError("maxDeviceThreatLevel cannot be one alternative of operator OR (any other control would "
                             "waive it); put it in a policy of its own: every applicable policy must hold")
        return self


EVERY_TIME_SECONDS = 300


class FrequencyUnit(StrEnum):
    hours = "hours"
    days = "days"


class SignInFrequency(Model):
    """``{value: 8, type: hours}``, or ``{everyTime: true}``."""

    value: Annotated[int, Field(ge=1, le=365)] | None = None
    type: FrequencyUnit | None = None
    every_time: bool = False

    @model_validator(mode="after")
    def _one_form(self) -> SignInFrequency:
        if self.every_time == (self.value is not None or self.type is not None):
            raise ValueError("give either 'value' and 'type' (hours or days), or 'everyTime: true'")
        if not self.every_time and (self.value is None or self.type is None):
            raise ValueError("'value' and 'type' go together")
        return self

    @property
    def seconds(self) -> int:
        """``everyTime`` asks for a sign-in at most five minutes old (a gateway session cannot be
        re-authenticated per request without sending every request to the issuer)."""
        if self.every_time or self.value is None:
            return EVERY_TIME_SECONDS
        return self.value * (3600 if self.type is FrequencyUnit.hours else 86400)


class SessionControlsConfig(Model):
    block_downloads: bool = False
    block_uploads: bool = False
    sign_in_frequency: SignInFrequency | None = None
    persistent_browser: PersistentBrowser | None = None
    token_protection: bool = False  # Entra: "require token protection for sign-in sessions"


class Rollout(Model):
    """Progressive enforcement: an enabled policy is enforced for this cohort only and is
    report-only for everyone else. The cohort is any request that matches one of the three:
    a member of ``groups`` (names or ids, as in the token's ``groups`` claim), a user among a
    stable ``percentOfUsers`` share (a keyed hash of the policy name and the user's object id),
    or a request through one of ``listeners``."""

    groups: list[str] = []
    percent_of_users: Annotated[int, Field(ge=0, le=100)] = 0
    listeners: list[Listener] = []

    @model_validator(mode="after")
    def _a_cohort(self) -> Rollout:
        if not self.groups and not self.percent_of_users and not self.listeners:
            raise ValueError("a rollout names its cohort: groups, percentOfUsers (1-100) or listeners")
        return self


class ConditionalAccessPolicy(Model):
    name: str
    display_name: str | None = None
    state: PolicyState
    conditions: PolicyConditions
    grant_controls: GrantControls | None = None
    session_controls: SessionControlsConfig | None = None
    rollout: Rollout | None = None  # enforced for this cohort only, report-only for the rest

    @field_validator("rollout")
    @classmethod
    def _rollout_needs_enabled(cls, value: Rollout | None, info: ValidationInfo) -> Rollout | None:
        """Reported at the rollout key: it narrows enforcement, so it only means something when enforced."""
        state = info.data.get("state")  # absent when the state itself is invalid: reported there
        if value is not None and state is not None and state is not PolicyState.enabled:
            raise ValueError(f"a rollout enforces a policy for a cohort and reports only for the rest: it needs "
                             f"state: enabled (this policy is {state.value})")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError(f"{value!r} is not a valid name ({NAME_HELP})")
        return value

    @model_validator(mode="after")
    def _has_controls(self) -> ConditionalAccessPolicy:
        if self.grant_controls is None and self.session_controls is None:
            raise ValueError("a policy needs grantControls, sessionControls or both")
        return self


class PoliciesFile(Model):
    """``policies.yaml``."""

    policies: list[ConditionalAccessPolicy]
