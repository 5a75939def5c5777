"""Runtime values of an access decision: the request, its signals and the decision with its
explanation. Frozen dataclasses and StrEnums whose values are Entra's strings."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import IntEnum, StrEnum

# Entra's keywords in a condition's include and exclude lists (resources, users, locations)
ALL = "All"
ALL_TRUSTED = "AllTrusted"  # locations: every named location marked trusted


MAX_UNREAD_PATH = 1024  # of a request refused before its head was parsed, recorded
_TOKEN = re.compile(rb"[A-Z][A-Z0-9_-]{0,31}")
_PATH = re.compile(rb"/[!-~]*")

class PolicyState(StrEnum):
    enabled = "enabled"
    disabled = "disabled"
    report_only = "reportOnly"


class BuiltInControl(StrEnum):
    """In the order Entra asks for missing controls (MFA first)."""

    block = "block"
    mfa = "mfa"
    compliant_device = "compliantDevice"
    approved_application = "approvedApplication"
    compliant_application = "compliantApplication"  # "Require app protection policy" (Intune MAM)


class DevicePlatform(StrEnum):
    android = "android"
    ios = "iOS"
    windows = "windows"
    macos = "macOS"
    linux = "linux"


class GrantOperator(StrEnum):
    AND = "AND"
    OR = "OR"


class DeviceFilterMode(StrEnum):
    include = "include"
    exclude = "exclude"


class PersistentBrowser(StrEnum):
    always = "always"
    never = "never"


class DeviceThreatLevel(StrEnum):
    """MTD risk, ordered secured < low < medium < high (Intune's device threat level)."""

    secured = "secured"
    low = "low"
    medium = "medium"
    high = "high"

    @property
    def rank(self) -> int:
        return THREAT_RANKS[self]


THREAT_RANKS = {level: rank for rank, level in enumerate(DeviceThreatLevel)}


class ComplianceState(StrEnum):
    """Intune ``complianceState`` values."""

    unknown = "unknown"
    compliant = "compliant"
    noncompliant = "noncompliant"
    conflict = "conflict"
    error = "error"
    in_grace_period = "inGracePeriod"
    config_manager = "configManager"


class ClientAppType(StrEnum):
    all = "all"  # in conditions only: every client app type
    browser = "browser"
    mobile_apps_and_desktop_clients = "mobileAppsAndDesktopClients"
    exchange_active_sync = "exchangeActiveSync"
    other = "other"


class ErrorCode(IntEnum):
    """Sign-in error codes helpdesks recognise."""

    mfa_required = 50076
    device_not_compliant = 53000
    app_not_approved = 53002
    blocked_by_conditional_access = 53003
    blocked_due_to_risk = 53004
    app_protection_required = 53005  # "Require app protection policy": no current, unflagged registration
    # Portcullis's own, not Entra's (Entra has none for it; its codes all have five or more digits):
    # the request named a host this listener does not serve (HTTP 421), so no policy was asked.
    misdirected_request = 421
    # the gateway failed on the request (HTTP 500): no policy decided it either.
    internal_error = 500
    # the token lacks an authentication context the resource needs (HTTP 401 with Entra's claims
    # challenge): the client signs in again for it; Entra answers the resource's challenge, no code.
    insufficient_claims = 401


class PolicyResultKind(StrEnum):
    success = "success"
    failure = "failure"
    not_applied = "notApplied"
    not_enabled = "notEnabled"
    report_only_success = "reportOnlySuccess"
    report_only_failure = "reportOnlyFailure"
    report_only_not_applied = "reportOnlyNotApplied"


class Listener(StrEnum):
    """Where a request came in: the TLS reverse proxy, the kiosk forward proxy, or an edge proxy
    asking the forward-auth listener (it sees neither the answer nor the client's certificate)."""

    gateway = "gateway"
    kiosk = "kiosk"
    forward_auth = "forwardAuth"


class RolloutCohort(StrEnum):
    """Why a policy with a rollout was enforced for this request (the first cohort test that
    matched), or that it was report-only because the request is outside the cohort."""

    group = "inCohort:group"
    percent_of_users = "inCohort:percentOfUsers"
    listener = "inCohort:listener"
    outside = "outsideCohort"


class Restriction(StrEnum):
    """What refused a request besides the policies' grant controls: the ActiveSync device binding
    (before policy), or a session control that refuses the request itself once policy allowed it."""

    activesync_device_id_mismatch = "activeSyncDeviceIdMismatch"  # the URL names another device than the token
    # the connection's device certificate: not believed (unverified, or naming no single inventory device),
    # or missing where the host requires one
    device_certificate = "deviceCertificate"
    token_device_mismatch = "tokenIssuedToAnotherDevice"  # noqa: S105  (the certificate names another device)
    token_protection = "tokenProtection"  # noqa: S105  (the session control: the token is not bound to this device)
    legacy_active_sync = "legacyActiveSync"  # Basic without a certificate of a compliant device of that user
    block_downloads = "blockDownloads"
    block_uploads = "blockUploads"
    # a session control only the reverse proxy enforces, on a request an edge asked about (forward-auth)
    needs_reverse_proxy = "sessionControlNeedsReverseProxy"


class DeviceKey(StrEnum):
    """Which inventory field a device certificate names the device by (an MDM profile puts one of
    them in the certificate: Intune's SAN URI ``IntuneDeviceId://{{DeviceId}}``, or
    ``{{AAD_Device_ID}}``, or the serial number)."""

    azure_ad_device_id = "azureADDeviceId"  # the Entra device id: the inventory's own key
    intune_device_id = "intuneDeviceId"  # Intune's managed device id (Graph managedDevice ``id``)
    serial_number = "serialNumber"


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceCertificate:
    """What the client's TLS certificate says about its device, verified once per connection
    (``gateway/identity/device_certificates.py``). ``problem`` is None only for a certificate that
    chains to a configured device CA, is valid now, is for client authentication, is not revoked,
    and names exactly one device; the rest describes the certificate (never its key: the gateway
    has none) for the decision log."""

    device_key: DeviceKey | None = None  # which inventory field ``device_value`` is
    device_value: str | None = None  # as the certificate names it (normalised: ids lower case)
    subject: str = ""  # RFC 4514
    issuer: str = ""  # RFC 4514
    serial_number: str = ""  # hex, as CRLs and MDM consoles show it
    sha256: str = ""  # the leaf certificate's fingerprint, hex
    not_after: datetime | None = None
    problem: str | None = None  # why it does not name a device the gateway may believe

    @property
    def verified(self) -> bool:
        return self.problem is None and self.device_value is not None


class DecisionResult(StrEnum):
    allow = "allow"
    block = "block"
    unauthenticated = "unauthenticated"


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessRequest:
    """What the gateway knows about one request before looking anything up."""

    correlation_id: str
    host: str
    path: str
    method: str
    client_ip: str
    user_agent: str
    accepts_html: bool
    declared_client_app_type: ClientAppType | None = None  # What If only; never set from a request
    target: str | None = None  # the original request target (path and query), once the path is canonical
    content_type: str = ""
    content_length: str = ""
    chunked: bool = False
    authority: str = ""  # host[:port] as the client addressed it (the Host header, validated)
    kiosk_location: str | None = None  # set for requests through the kiosk proxy: an unmanaged browser
    # the connection's client certificate (reverse listener only; None: none was presented)
    device_certificate: DeviceCertificate | None = None
    forward_auth: bool = False  # an edge proxy asked (forward-auth): the gateway never sees the answer

    @classmethod
    def unread(cls, *, correlation_id: str, client_ip: str, request_line: bytes,
               kiosk_location: str | None = None) -> AccessRequest:
        """A request refused before its head could be parsed (the strict reader's 400, 414, 431):
        no host, and of the request line only a method and a path that read as such (never the
        query: it may carry a token). Its record names no resource; replay skips it."""
        method, _, rest = request_line.partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0][:MAX_UNREAD_PATH]
        return cls(correlation_id=correlation_id, host="", client_ip=client_ip, user_agent="", accepts_html=False,
                   method=method.decode("ascii") if _TOKEN.fullmatch(method) else "",
                   path=path.decode("ascii") if _PATH.fullmatch(path) else "", kiosk_location=kiosk_location)


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """Claims of a validated access token."""

    subject: str
    user_principal_name: str | None
    object_id: str | None
    tenant_id: str | None
    client_id: str | None
    device_id: str | None
    groups: frozenset[str]
    audience: str
    expires_at: float
    authentication_methods: frozenset[str] = frozenset()  # the amr claim
    authenticated_at: float | None = None  # the auth_time claim (ID tokens)
    authentication_context: str | None = None  # the acr claim
    # the acrs claim: the authentication context ids (c1..c99) the sign-in satisfied (Entra's step-up)
    authentication_contexts: frozenset[str] = frozenset()
    issued_at: float | None = None  # the iat claim: how old the token's view of the user is
    roles: frozenset[str] = frozenset()  # app roles (the roles claim), for the admin API
    issuer: str | None = None  # the name of the trusted issuer that signed it (identity.issuers)


@dataclass(frozen=True, slots=True, kw_only=True)
class ManagedDevice:
    """A device record from the inventory, with its MTD threat level."""

    device_id: str
    display_name: str | None
    user_principal_name: str | None
    operating_system: str | None
    compliance_state: ComplianceState
    compliance_grace_period_expiration: datetime | None
    threat_level: DeviceThreatLevel | None
    threat_source: str | None  # the partner whose verdict this is (``threatSource`` in logs and imports)
    eas_device_id: str | None = None  # the ActiveSync DeviceId registered for this device
    management_agent: str | None = None
    jail_broken: bool | None = None
    last_sync: datetime | None = None
    threat_reported_at: datetime | None = None
    device_ownership: str | None = None  # "Company" | "Personal"
    manufacturer: str | None = None
    model: str | None = None
    operating_system_version: str | None = None
    trust_type: str | None = None
    extension_attributes: tuple[tuple[str, str], ...] = ()
    intune_device_id: str | None = None  # Intune's managed device id (Graph managedDevice ``id``), lower case
    serial_number: str | None = None  # trimmed, upper case


@dataclass(frozen=True, slots=True, kw_only=True)
class ComplianceSettings:
    """Intune's tenant-wide compliance settings. ``unknown`` is how a device with no compliance
    policy assigned reports; Intune's default ("secure by default") marks it not compliant."""

    devices_without_policy_compliant: bool = False
    validity: timedelta | None = timedelta(days=30)  # a device not synced within it is noncompliant
    block_without_partner_data: bool = False  # no current MTD verdict: not compliant


DEFAULT_COMPLIANCE = ComplianceSettings()


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceSignals:
    """The device as policy sees it. ``device`` is None for an unknown or absent device: it is
    not compliant and has no threat level (fail closed)."""

    device_id: str | None
    device: ManagedDevice | None
    source: str
    compliance: ComplianceSettings = DEFAULT_COMPLIANCE


DEFAULT_APP_SYNC_AGE = timedelta(hours=24)


@dataclass(frozen=True, slots=True, kw_only=True)
class AppRegistration:
    """An Intune app protection (MAM) registration: one app (its bundle or package id, Graph's
    ``appIdentifier``) of one user on one device, as Graph's ``managedAppRegistration`` says it.
    A personal phone that is not enrolled has one too: ``device_id`` is then None."""

    registration_id: str
    app_identifier: str  # bundleId (iOS) or packageId (Android), lower case
    platform: str  # "iOS" | "android"
    user_id: str | None  # the user's Entra object id (Graph's ``userId``), lower case
    user_principal_name: str | None  # lower case
    device_id: str | None = None  # the Entra device id (``azureADDeviceId``) when known, lower case
    device_tag: str | None = None  # Intune's ``deviceTag``
    device_name: str | None = None
    applied_policies: tuple[str, ...] = ()  # the app protection policies applied (their ids or names)
    flagged_reasons: tuple[str, ...] = ()  # e.g. rootedDevice, androidBootloaderUnlocked
    last_sync: datetime | None = None  # when the app last checked in with Intune


@dataclass(frozen=True, slots=True, kw_only=True)
class AppProtection:
    """The token's app's registrations for the token's user, as policy sees them: ``registrations``
    is empty when the app has none (or names no bundle/package id). ``max_sync_age``: a
    registration that has not checked in for longer no longer counts (None: check-ins are not looked at)."""

    registrations: tuple[AppRegistration, ...]
    source: str
    max_sync_age: timedelta | None = DEFAULT_APP_SYNC_AGE


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientApp:
    """The client app, from the token's ``azp``/``appid``; ``name`` is None when not configured.
    ``protection``: its app protection registrations for this user (None: not looked up)."""

    client_id: str | None
    name: str | None
    protection: AppProtection | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlFailure:
    control: str
    error_code: ErrorCode
    reason: str
    # what a new sign-in must bring (a step-up): the acr values of an authentication strength, or
    # the authentication context ids (c1..c99) the token's acrs lacks
    step_up: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionControls:
    """Session controls of the policies that applied, merged: the strictest value wins."""

    block_downloads: bool = False
    block_uploads: bool = False
    sign_in_frequency_seconds: int | None = None  # 0 means every time
    persistent_browser: PersistentBrowser | None = None
    # Entra's "require token protection for sign-in sessions": the token or session is honoured only
    # on a connection whose device certificate names the device it was issued to
    token_protection: bool = False

    def merge(self, other: SessionControls) -> SessionControls:
        frequencies = [f for f in (self.sign_in_frequency_seconds, other.sign_in_frequency_seconds) if f is not None]
        browsers = {self.persistent_browser, other.persistent_browser} - {None}
        return SessionControls(
            block_downloads=self.block_downloads or other.block_downloads,
            block_uploads=self.block_uploads or other.block_uploads,
            sign_in_frequency_seconds=min(frequencies) if frequencies else None,
            persistent_browser=(PersistentBrowser.never if PersistentBrowser.never in browsers
                                else next(iter(browsers), None)),
            token_protection=self.token_protection or other.token_protection,
        )

    def names(self) -> tuple[str, ...]:
        return tuple(name for name, on in (
            ("blockDownloads", self.block_downloads),
            ("blockUploads", self.block_uploads),
            ("signInFrequency", self.sign_in_frequency_seconds is not None),
            ("persistentBrowser", self.persistent_browser is not None),
            ("tokenProtection", self.token_protection),
        ) if on)


NO_SESSION_CONTROLS = SessionControls()


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyResult:
    name: str
    display_name: str
    result: PolicyResultKind
    not_applied_because: str | None = None
    enforced_grant_controls: tuple[str, ...] = ()
    enforced_session_controls: tuple[str, ...] = ()
    failures: tuple[ControlFailure, ...] = ()
    rollout: RolloutCohort | None = None  # set for policies with a rollout: in its cohort (and why) or not


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    result: DecisionResult
    status_code: int
    error_code: ErrorCode | None
    reason: str
    resource: str | None
    client_app_type: ClientAppType
    resources: tuple[str, ...] = ()  # every resource the request belongs to; ``resource`` is the most specific
    policies: tuple[PolicyResult, ...] = ()
    not_targeted: tuple[PolicyResult, ...] = ()  # policies whose resources cannot include this one
    failed_policy: str | None = None  # display name, as users see it
    failed_policy_id: str | None = None
    session_controls: SessionControls = NO_SESSION_CONTROLS
    restriction: Restriction | None = None  # set when the binding or a session control refused the request

    def all_policies(self) -> tuple[PolicyResult, ...]:
        return self.policies + self.not_targeted

    @property
    def allowed(self) -> bool:
        return self.result is DecisionResult.allow
