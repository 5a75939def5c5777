"""Property-based tests (hypothesis) of the request -> decision path: whatever a client sends,
the gateway never raises and never forwards what no policy grants.

Three layers, each checked against an oracle written here from the shipped config and
inventory files (``portcullis.yaml``, ``policies.yaml``, ``devices.yaml``), never by asking the
matcher or ``evaluate`` under test:

1. Pure units. ``canonical_path``: never raises; what it accepts is the plain percent-decoding
   of the path, absolute, without dot or empty inner segments, control characters, ``\\`` or
   ``;``, idempotent when re-quoted, and matched to resources exactly as a whole-segment,
   ASCII-case-insensitive prefix oracle matches it. ``headers_to_strip``: every case, ``_`` and
   ``.`` spelling of an identity, forwarding, rewrite or hop-by-hop header (the module's lists
   and an independent list of what identity-aware proxies set) is stripped; ``Connection:``
   strips what it names but never framing or the credential. ``bearer_token``: never raises,
   returns a token only for one ``Bearer <token68>`` value, and always for RFC 6750's form.
2. The core decision, ``AccessService.authorize`` on a copy of the demo config, with random
   requests (hosts served or not, odd and encoded paths, ActiveSync queries plain and base64,
   methods, user agents, client addresses, the kiosk listener, forged session cookies) and
   credentials (none, garbage, unsigned, HMAC keyed with the issuer's public key, an attacker's
   RSA key with and without the issuer's ``kid``, RS512, a tampered payload, and RS256 tokens
   of the demo issuer with random or nearly-valid claims). Forwarded implies: the path is a
   configured public resource, or the token is the issuer's, valid now, for this host's
   audience, and every enforced grant policy the oracle finds applicable holds for the device
   (in the inventory, compliant or in grace, risk at or under the policy's level) and client id
   (on the policy's allow-list), and an ActiveSync DeviceId is the token's device. The
   decision's explanation names each of those policies as satisfied, a block names a policy
   the oracle finds failing, the What If tool explains the request the same way, and the
   same token at the other host is judged by that host's audience. Conversely a request the
   oracle grants outside any session control is forwarded, so a gateway that blocks
   everything fails too. Every decision is logged once; the token is in neither the answer
   nor the log.
3. The real listener (session ``gateway`` fixture), a small budget: the answer is never a 5xx
   but 503 from a signal outage, the upstream is reached only when the oracle grants (and by
   the Host it was decided for, reading the path the oracle judged), granted requests reach
   it, and forged identity headers never arrive there.

Budget and reproducibility: every property runs with ``derandomize=True`` (examples come from a
seed derived from the test itself, so CI draws the same examples on every run and a red build
means the code changed, not that a lucky draw found something), ``database=None`` (no example
database to replay stale failures from; hypothesis's own cache in ``.hypothesis/`` ignores
itself in git), ``deadline=None`` (per-example times on a loaded 2-core machine are noise; the
whole file's time is what is bounded: about 15 s here) and a modest ``max_examples`` per property.
``@example`` pins the legitimate twins and the attacks that matter most, whatever the draw.
``PORTCULLIS_EXPLORE_PROPERTIES=1`` draws fresh random examples, 20 times as many, for a
developer or a nightly job hunting for new counterexamples; pin what it finds with ``@example``.

Findings are pinned here once fixed, so they stay fixed:

- F1 (fixed in ``gateway/http/headers.py``): a header spelled as a framing header with ``_`` or ``.``
  (``Transfer_Encoding: chunked``, ``Content_Length``) was forwarded to the upstream, although WSGI/CGI
  servers read it as ``HTTP_TRANSFER_ENCODING`` (gunicorn 22 refuses such names, CVE-2024-1135).
"""
from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote, unquote_plus

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, event, example, given, reject, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from gateway.app.demo import (
    ALEX_IPHONE,
    BLAKE_ANDROID,
    CASEY_IPAD,
    DREW_IPHONE,
    EXCHANGE,
    OFFICE,
    ONEDRIVE,
    OUTLOOK_MOBILE,
    SHAREPOINT,
    TEAMS,
)
from gateway.config import load_config
from gateway.config.compile import compile_policies
from gateway.decision.service import AccessService, Outcome
from gateway.http.headers import (
    FORWARDING_HEADERS,
    HOP_BY_HOP,
    IDENTITY_HEADERS,
    IDENTITY_PREFIXES,
    REWRITE_HEADERS,
    headers_to_strip,
)
from gateway.http.paths import canonical_path
from gateway.identity.tokens import RejectedToken, bearer_token
from gateway.ops.whatif import GUID, Question, WhatIf
from gateway.policy.model import AccessRequest, Decision, Listener
from gateway.web.demo_idp import DemoIdentityProvider
from tests.conftest import REPO, Gateway, Ports, gateway_config, operations_for
from tests.helpers.http import raw_exchange
from tests.helpers.tokens import _hmac_token

EXPLORE = os.environ.get("PORTCULLIS_EXPLORE_PROPERTIES") == "1"


def budget(examples: int) -> settings:
    """The settings of one property (see the module docstring for why these)."""
    return settings(max_examples=examples * (20 if EXPLORE else 1), deadline=None, derandomize=not EXPLORE,
                    database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- the oracle's data: read from the shipped files, not from the code under test ---------------

YAML_SAFE = YAML(typ="safe")
GATEWAY_FILE: dict[str, Any] = YAML_SAFE.load(REPO / "config" / "portcullis.yaml")
POLICIES: list[dict[str, Any]] = YAML_SAFE.load(REPO / "config" / "policies.yaml")["policies"]
DEVICES: dict[str, dict[str, Any]] = {d["azureADDeviceId"].lower(): d
                                      for d in YAML_SAFE.load(REPO / "config" / "devices.yaml")["devices"]}
CONFIG = load_config(REPO / "config")  # only for the resource names, hosts and paths it lists (presets expanded)
RESOURCES = {name: (tuple(r.hosts), tuple(r.paths), bool(r.public)) for name, r in CONFIG.resources.items()}
PUBLIC = frozenset(name for name, (_, _, public) in RESOURCES.items() if public)
AUDIENCES = {host: frozenset(h["audiences"]) for host, h in GATEWAY_FILE["protectedHosts"].items()}
SERVED = tuple(sorted(AUDIENCES))
MAIL, DOCS = "mail.contoso.test", "docs.contoso.test"
APPLICATIONS = {name: {ids.lower()} if isinstance(ids, str) else {i.lower() for i in ids}
                for name, ids in GATEWAY_FILE["applications"].items()}
THREAT_RANK = {"secured": 0, "low": 1, "medium": 2, "high": 3}
NOW = datetime.now(UTC)


def segments_match(pattern: str, path: str) -> bool:
    """A resource path is a prefix on whole segments, ``*`` one non-empty segment, compared
    ASCII-case-insensitively (IIS)."""
    wanted = pattern.rstrip("/").split("/")[1:]
    got = path.split("/")[1:]
    return len(got) >= len(wanted) and all(
        (w == "*" and g != "") or (w != "*" and g.encode().lower() == w.encode().lower())
        for w, g in zip(wanted, got, strict=False))


def oracle_resources(host: str, path: str) -> dict[str, int]:
    """Every resource naming the decoded path, with the segment count of its longest matching pattern."""
    found = {}
    for name, (hosts, patterns, _) in RESOURCES.items():
        lengths = [len(p.rstrip("/").split("/")) - 1 for p in patterns if host in hosts and segments_match(p, path)]
        if lengths:
            found[name] = max(lengths)
    return found


def oracle_public(host: str, path: str) -> bool:
    """A public resource is a carve-out: it wins only when strictly more specific than every
    protected resource that also names the path."""
    found = oracle_resources(host, path)
    public = [n for name, n in found.items() if name in PUBLIC]
    return bool(public) and all(max(public) > n for name, n in found.items() if name not in PUBLIC)


@dataclass(frozen=True)
class GrantPolicy:
    """An enabled policy with grant controls, as far as the demo's policies use them."""

    name: str
    resources: frozenset[str]  # "All" or names
    kiosk_excluded: bool
    compliant_device: bool
    approved_clients: frozenset[str] | None
    max_threat: str | None

    def applies(self, resources: set[str], kiosk: bool) -> bool:
        return bool("All" in self.resources or resources & self.resources) and not (kiosk and self.kiosk_excluded)

    def holds(self, identity: OracleIdentity, kiosk: bool) -> bool:
        device = None if kiosk or identity.device_id is None else DEVICES.get(identity.device_id)
        if self.compliant_device and not compliant(device):
            return False
        if self.approved_clients is not None and identity.client_id not in self.approved_clients:
            return False
        return self.max_threat is None or (
            device is not None and device.get("threatLevel") in THREAT_RANK
            and THREAT_RANK[device["threatLevel"]] <= THREAT_RANK[self.max_threat])


def compliant(device: dict[str, Any] | None) -> bool:
    """Intune, with the demo's tenant settings (checked below): compliant, or in a grace period
    that has not ended."""
    if device is None or device.get("jailBroken"):
        return False
    if device["complianceState"] == "compliant":
        return True
    end = device.get("complianceGracePeriodExpirationDateTime")
    return device["complianceState"] == "inGracePeriod" and end is not None and _aware(end) > NOW


def _aware(value: object) -> datetime:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@functools.cache
def grant_policies() -> tuple[GrantPolicy, ...]:
    """The enabled policies with grant controls. The oracle reads only what the demo's policies
    use; anything else fails here, so a config change cannot silently outgrow the oracle."""
    compliance = GATEWAY_FILE["deviceSignals"]["compliance"]
    assert compliance == {"devicesWithoutCompliancePolicy": "notCompliant", "validityDays": None}, compliance
    found = []
    for policy in POLICIES:
        if policy.get("state") != "enabled" or "grantControls" not in policy:
            continue
        conditions, grant = policy["conditions"], policy["grantControls"]
        assert set(conditions) <= {"users", "resources", "clientAppTypes", "locations"}, policy["name"]
        assert conditions.get("users", {"includeUsers": ["All"]}) == {"includeUsers": ["All"]}, policy["name"]
        assert conditions.get("clientAppTypes", ["all"]) == ["all"], policy["name"]
        assert set(conditions["resources"]) == {"include"}, policy["name"]
        locations = conditions.get("locations", {"include": ["All"]})
        assert locations["include"] == ["All"] and set(locations.get("exclude", [])) <= {"kiosk"}, policy["name"]
        assert grant.get("operator", "AND") == "AND", policy["name"]
        controls = set(grant["builtInControls"])
        assert controls <= {"compliantDevice", "approvedApplication"}, policy["name"]
        approved = frozenset().union(*(APPLICATIONS[a] for a in grant.get("approvedApplications", [])))
        found.append(GrantPolicy(policy["name"], frozenset(conditions["resources"]["include"]),
                                 "kiosk" in locations.get("exclude", []), "compliantDevice" in controls,
                                 approved if "approvedApplication" in controls else None,
                                 grant.get("maxDeviceThreatLevel")))
    assert found, "the oracle found no grant policy: it would grant everything"
    return tuple(found)


POLICY_SET = compile_policies(CONFIG)  # under test


# --- layer 1: pure units ------------------------------------------------------------------------------

ATOMS = ("owa", "OWA", "auth", "ecp", "sites", "_api", "x", "..", ".", "", "%2e", "%2E%2e", "%2f", "%2F", "%5c",
         "%25", "%252e", "%00", "%0a", "%09", "%20", " ", ";", "..;", "\\", "%", "%u002e", "%c0%af", "%ef%bc%8f",
         "\uff0f", "\u017f", "\u212a", "\u0130", "\u00e9", "%C3%A9", "%ff", "~1", "::$DATA", "?", "#", "x.", "x ",
         "Microsoft-Server-ActiveSync", "autodiscover", "EWS", "mapi", "_vti_bin", "_layouts", "15", "download.aspx",
         "service.svc", "s", "GetFileAttachment", "(S(abc))", "*", ".portcullis", "%2e%2e%2f", "\x7f", "\t")
segments = st.one_of(st.sampled_from(ATOMS), st.text(max_size=5),
                     st.lists(st.sampled_from(ATOMS), min_size=2, max_size=3).map("".join))
plain_segments = st.sampled_from(("x", "inbox", "a.b", "Team Site", "report.docx", "15", "_api", "auth",
                                  "\u00e9t\u00e9", "(S(abc))", "GetFileAttachment", "download.aspx"))
EAS_IDS = tuple(d["easDeviceId"] for d in DEVICES.values())


def activesync_base64(device_id: bytes) -> str:
    """The base64 form of an ActiveSync Sync query (protocol 14.1, en-US, an iPhone)."""
    raw = bytes((141, 0, 9, 4, len(device_id))) + device_id + b"\x04\x01\x02\x03\x04" + b"\x06iPhone"
    return "?" + base64.b64encode(raw).decode()


CLIENT_QUERIES = st.one_of(  # what Exchange and SharePoint clients send
    st.just(""), st.just("?"), st.just("?Cmd=Sync"),
    st.sampled_from(EAS_IDS + ("SomeoneElsesPhone", "")).map(
        lambda eas: f"?Cmd=Sync&User=u&DeviceId={eas}&DeviceType=iPhone"),
    st.tuples(st.sampled_from(EAS_IDS), st.sampled_from(EAS_IDS)).map(lambda p: f"?DeviceId={p[0]}&deviceid={p[1]}"),
    st.binary(max_size=24).map(lambda b: "?" + base64.b64encode(b).decode().rstrip("=")),
    st.one_of(st.sampled_from(EAS_IDS + ("SomeoneElsesPhone",)).map(str.encode), st.binary(max_size=20))
    .map(lambda device: activesync_base64(device)),
)
QUERIES = st.one_of(CLIENT_QUERIES, st.text(max_size=12).map(lambda text: "?" + text))
VISIBLE_ASCII = "".join(chr(c) for c in range(0x21, 0x7F))


@st.composite
def spelled(draw: st.DrawFn, text: str) -> str:
    """The same decoded text, spelled differently: random case and random percent-encoding."""
    out = []
    for char in text:
        how = draw(st.integers(0, 15)) if char != "/" else 15
        if how < 2:
            char = "".join(f"%{b:02X}" if how else f"%{b:02x}" for b in char.encode())
        elif how < 8 and char.isascii():
            char = char.swapcase()
        out.append(char)
    return "".join(out)


@st.composite
def resource_targets(draw: st.DrawFn, hostile: bool = True) -> tuple[str, str]:
    """A host and a target under one of the configured resource paths (or its neighbour);
    ``hostile``: the rest of the path may hold any of the ambiguous spellings."""
    _, (hosts, patterns, _) = draw(st.sampled_from(sorted(RESOURCES.items()) + 3 * sorted(  # carve-outs weigh more
        (name, r) for name, r in RESOURCES.items() if name in PUBLIC)))
    host, pattern = draw(st.sampled_from(hosts)), draw(st.sampled_from(patterns))
    parts = [draw(st.sampled_from(("x", "finance", "Team Site", "\u00e9t\u00e9"))) if p == "*" else p
             for p in pattern.strip("/").split("/")]
    if draw(st.booleans()):
        parts[-1] += draw(st.sampled_from(("x", ".aspx", "-old", "~1")))  # a neighbour, not the resource
    parts += draw(st.lists(st.one_of(plain_segments, plain_segments, plain_segments, segments) if hostile
                           else plain_segments, max_size=3))
    path = "/" + "/".join(parts) + ("/" if draw(st.booleans()) else "")
    if hostile:
        return host, draw(spelled(path)) + draw(QUERIES)
    return host, quote(draw(spelled(path)), safe=VISIBLE_ASCII) + draw(CLIENT_QUERIES)  # as an HTTP client sends it


random_targets = st.one_of(
    st.builds(lambda parts, slash, query: "/" + "/".join(parts) + slash + query,
              st.lists(segments, max_size=6), st.sampled_from(("", "/")), QUERIES),
    st.text(max_size=40),
    st.sampled_from(("*", "", "owa/", "//owa/auth/", "/./owa/auth/", "https://mail.contoso.test/owa/auth/",
                     "https://docs.contoso.test/sites/x/", "//docs.contoso.test/owa/auth/",
                     "/owa/auth/..%2f..%2fecp/", "/owa/auth/\uff0e\uff0e\uff0f\uff0e\uff0e\uff0fecp/")),
)
targets = st.one_of(resource_targets().map(lambda pair: pair[1]), random_targets)


@given(targets)
@budget(600)
def test_canonical_path_never_raises_and_yields_only_unambiguous_paths(target: str) -> None:
    """What it accepts decodes one way only: the path matched is the path an upstream serves."""
    path = canonical_path(target)
    if path is None:
        return
    assert path.startswith("/")
    assert path == unquote(target.split("?", 1)[0])  # decoding is all it does: nothing else is rewritten
    assert "\\" not in path and ";" not in path
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in path)
    parts = path.split("/")[1:]
    assert all(p not in (".", "..") and (p or i == len(parts) - 1) for i, p in enumerate(parts)), path
    assert not any(p.endswith((".", " ")) for p in parts), path  # IIS strips them: another name upstream
    assert canonical_path(quote(path, safe="/")) == path  # re-quoting the canonical path is idempotent


@given(st.one_of(resource_targets(), st.tuples(st.sampled_from(SERVED), random_targets)))
@budget(500)
def test_an_accepted_path_is_matched_as_the_segment_oracle_matches_it(host_and_target: tuple[str, str]) -> None:
    """Public carve-outs included; and an upstream comparing case char by char reads the same resources."""
    host, target = host_and_target
    path = canonical_path(target)
    if path is None:
        return
    found = POLICY_SET.match(host, path)
    expected = oracle_resources(host, path)
    if not expected:
        assert found is None, (path, found)
    elif oracle_public(host, path):
        assert found is not None and found.public and set(found.names) <= PUBLIC, (path, found)
    else:
        assert found is not None and not found.public, (path, found)
        assert set(found.names) == set(expected) - PUBLIC, (path, found, expected)
    # a char-by-char case-insensitive upstream (.NET, Java) compares as the ASCII oracle does
    upper = "".join(c.upper() if len(c.upper()) == 1 else c for c in path)
    assert oracle_resources(host, upper) == expected, (path, upper)

# Headers an identity-aware proxy, TLS terminator or Exchange front end sets and an upstream may
# trust (oauth2-proxy, Authelia, Pomerium, authentik, Vouch, mod_auth_openidc, Azure App Service,
# AWS ALB, Google IAP, Cloudflare Access, Envoy, IIS ARR, Traefik), or that make it rewrite the
# request: written here from those products' documentation, independent of gateway/http/headers.py.
KNOWN_IDENTITY = (
    "X-Forwarded-User", "X-Forwarded-Email", "X-Forwarded-Preferred-Username", "X-Forwarded-Groups",
    "X-Forwarded-Access-Token", "X-Auth-Request-User", "X-Auth-Request-Email", "X-Auth-Request-Groups",
    "X-Auth-Request-Access-Token", "Remote-User", "X-Remote-User", "X-WebAuth-User", "X-MS-CLIENT-PRINCIPAL",
    "X-MS-CLIENT-PRINCIPAL-NAME", "X-MS-CLIENT-PRINCIPAL-ID", "X-MS-TOKEN-AAD-ID-TOKEN", "x-amzn-oidc-data",
    "x-amzn-oidc-identity", "x-amzn-oidc-accesstoken", "X-Goog-Authenticated-User-Email",
    "Cf-Access-Jwt-Assertion", "Cf-Access-Authenticated-User-Email", "X-Portcullis-User", "X-Portcullis-Client-App",
    "X-Portcullis-Device-Id", "X-Portcullis-Correlation-Id", "X-Portcullis-Anything",
)
KNOWN_REWRITE = ("X-Original-URL", "X-Rewrite-URL", "X-Original-URI", "X-HTTP-Method-Override", "X-HTTP-Method",
                 "X-Method-Override")
KNOWN_FORWARDING = ("Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Forwarded-Port",
                    "X-Forwarded-Prefix", "X-Forwarded-Server", "X-Real-IP", "X-Client-IP", "True-Client-IP",
                    "X-Cluster-Client-IP")
KNOWN_HOP_BY_HOP = ("Connection", "Keep-Alive", "Proxy-Connection", "TE", "Proxy-Authorization")
MUST_STRIP = tuple(sorted({*KNOWN_IDENTITY, *KNOWN_REWRITE, *KNOWN_FORWARDING, *KNOWN_HOP_BY_HOP, *IDENTITY_HEADERS,
                           *REWRITE_HEADERS, *FORWARDING_HEADERS, *HOP_BY_HOP}))
ORDINARY = ("Host", "Authorization", "User-Agent", "Accept", "Content-Type", "Content-Length", "Cookie",
            "MS-ASProtocolVersion", "X-AnchorMailbox", "X-Custom")
FRAMING_NAMES = ("Content-Length", "Transfer-Encoding")  # the request's framing: mitmproxy and the upstream own it


@st.composite
def fold_variant(draw: st.DrawFn, name: str) -> str:
    """A spelling some upstream stack reads as ``name``: any case, ``-`` as ``_`` or ``.``."""
    out = []
    for char in name:
        if char == "-":
            char = draw(st.sampled_from("-_."))
        elif draw(st.booleans()):
            char = char.swapcase()
        out.append(char)
    return "".join(out)


must_strip_names = st.one_of(
    st.sampled_from(MUST_STRIP).flatmap(fold_variant),
    st.tuples(st.sampled_from(IDENTITY_PREFIXES), st.from_regex(r"[A-Za-z0-9-]{1,12}", fullmatch=True))
    .map("".join).flatmap(fold_variant),
)
connection_values = st.lists(st.lists(st.sampled_from(ORDINARY + ("close", "keep-alive", "X-Custom", " ", "")),
                                      max_size=3).map(", ".join), max_size=2)


@given(st.lists(must_strip_names, min_size=1, max_size=4), st.lists(st.sampled_from(ORDINARY), max_size=4),
       connection_values)
@budget(400)
def test_every_spelling_of_an_identity_forwarding_or_rewrite_header_is_stripped(
        forged: list[str], ordinary: list[str], connection: list[str]) -> None:
    """Upstream stacks fold case, ``_`` and ``.`` into ``-``: every spelling is the header."""
    stripped = headers_to_strip([*ordinary, *forged], connection)
    assert set(forged) <= stripped, set(forged) - stripped


@given(st.lists(st.sampled_from(ORDINARY).flatmap(fold_variant), min_size=1, max_size=5), connection_values)
@budget(300)
def test_connection_nominates_only_what_is_not_framing_or_the_credential(
        names: list[str], connection: list[str]) -> None:
    """Framing and Authorization stay, so the upstream sees the request that was decided on."""
    stripped = headers_to_strip(names, connection)
    nominated = {t.strip().lower() for value in connection for t in value.split(",") if t.strip()}
    for name in names:
        spelled_as = name.lower()
        if spelled_as in ("host", "content-length", "transfer-encoding", "authorization"):
            assert name not in stripped, name  # removing them would change the request that was decided on
        elif spelled_as in nominated:
            assert name in stripped, name


@given(st.sampled_from(FRAMING_NAMES).flatmap(fold_variant).filter(lambda n: n.lower() not in ("content-length",
                                                                                                 "transfer-encoding")))
@example("Transfer_Encoding")
@budget(50)
def test_a_framing_header_in_another_spelling_never_reaches_the_upstream(name: str) -> None:
    """WSGI and CGI servers read ``Transfer_Encoding`` as ``HTTP_TRANSFER_ENCODING`` (gunicorn
    22 refuses such names for that reason, CVE-2024-1135): an upstream that does would frame the
    body differently from mitmproxy."""
    assert name in headers_to_strip(["Host", name, "Content-Length"], [])


BEARER_SCHEMES = ("Bearer", "bearer", "BEARER", "bEaReR", "Basic", "Negotiate", "Bearerx", "Bear", "", "B\u0435arer")
TOKEN68 = r"[A-Za-z0-9\-._~+/]+=*"
token_texts = st.one_of(st.from_regex(TOKEN68, fullmatch=True), st.text(max_size=20),
                        st.sampled_from(("a.b.c", "abc==", "=abc", "a b", "a\tb", "a,b", "a\nb", "x" * 16385)))
authorization_values = st.lists(
    st.one_of(
        st.builds(lambda lead, scheme, gap, token, trail: f"{lead}{scheme}{gap}{token}{trail}",
                  st.sampled_from(("", " ", "\t")), st.sampled_from(BEARER_SCHEMES),
                  st.sampled_from((" ", "  ", "\t", "", "\u00a0", " \t")), token_texts,
                  st.sampled_from(("", " ", "\t", "\n", "\u3000"))),
        st.text(max_size=30),
    ),
    max_size=3,
)
STRICT_BEARER = re.compile(rf"[ \t]*bearer +({TOKEN68})[ \t]*", re.IGNORECASE)


@given(authorization_values)
@budget(500)
def test_bearer_token_is_returned_only_for_one_well_formed_bearer_value(values: list[str]) -> None:
    """RFC 6750: one ``Bearer <token68>``, whatever whitespace surrounds it; nothing else yields a token."""
    result = bearer_token(values)
    strict = STRICT_BEARER.fullmatch(values[0]) if len(values) == 1 else None
    if strict is not None and len(strict.group(1)) <= 16 * 1024:
        assert result == strict.group(1)  # RFC 6750's form is always understood
    if isinstance(result, RejectedToken):
        return
    assert len(values) == 1
    assert re.fullmatch(TOKEN68, result) and len(result) <= 16 * 1024
    scheme, token = values[0].split()  # exactly two words, whatever whitespace is around them
    assert scheme.lower() == "bearer" and token == result


# --- layer 2: the core decision ------------------------------------------------------------------

MISSING = "<missing>"
ISSUER = "<issuer>"  # the running issuer's URL, put in when the token is made
HOST_AUDIENCE = "<audience>"  # the audience of the host the token is sent to (Exchange's elsewhere)
OUTLOOK_DESKTOP = next(iter(APPLICATIONS["outlook-desktop"]))
CLIENTS = (OUTLOOK_MOBILE, OUTLOOK_MOBILE.upper(), OUTLOOK_DESKTOP, TEAMS, OFFICE, ONEDRIVE,
           "0b7a5e1c-0000-4000-8000-0000000000aa", "", "outlook-mobile")
DEVICE_CLAIMS = (ALEX_IPHONE, ALEX_IPHONE.upper(), BLAKE_ANDROID, CASEY_IPAD, DREW_IPHONE,
                 "9f9f9f9f-0000-4000-8000-000000000001", "", EAS_IDS[0])
AUDIENCE_CLAIMS = (HOST_AUDIENCE, EXCHANGE, SHAREPOINT, "api://portcullis-admin", "portcullis-demo", EXCHANGE.upper(),
                   "https://outlook.office.com", "")
USERS = ("alex@contoso.test", "blake@contoso.test", "casey@contoso.test", "drew@contoso.test",
         "kiosk@contoso.test", "ceo@contoso.test")
SIGNERS = ("issuer", "issuer", "issuer", "issuer", "attacker", "attacker-same-kid", "none", "hmac-public-key",
           "issuer-rs512", "tampered", "garbage")
LAYOUTS = ("Bearer {}", "Bearer {}", "Bearer {}", "bearer {}", "Bearer  {}", "Basic {}", "{}", "Bearer {} {}",
           "twice")


def present(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually the claim, sometimes no such claim."""
    return st.one_of(strategy, strategy, strategy, st.just(MISSING))


claim_sets = st.fixed_dictionaries({
    "iss": st.sampled_from((ISSUER, ISSUER, ISSUER, ISSUER + "/", "https://login.microsoftonline.com/x/v2.0", MISSING)),
    "aud": st.one_of(st.sampled_from(AUDIENCE_CLAIMS), st.lists(st.sampled_from(AUDIENCE_CLAIMS), max_size=3),
                     st.just(MISSING)),
    "exp": st.sampled_from((3600, 3600, 3600, -3600, MISSING)),  # seconds from now: far from any leeway
    "nbf": st.sampled_from((0, 0, 3600, MISSING)),
    "sub": present(st.sampled_from(("user-sub",))),
    "azp": present(st.sampled_from(CLIENTS)),
    "appid": st.sampled_from((MISSING, MISSING) + CLIENTS),
    "deviceid": present(st.sampled_from(DEVICE_CLAIMS)),
    "upn": present(st.sampled_from(USERS)),
    "groups": st.sampled_from(((), ("kiosk-users",), ("sales",), ("KIOSK-USERS",))),
    "amr": st.sampled_from((("pwd",), ("pwd", "mfa"))),
})


@dataclass(frozen=True)
class CredentialSpec:
    """How a client presents (or fakes) a credential."""

    signer: str
    claims: dict[str, Any]
    layout: str
    garbage: tuple[str, ...] = ()


sound_claim_sets = st.fixed_dictionaries({  # a token the issuer would mint: only who, which app and device vary
    "iss": st.just(ISSUER), "aud": st.sampled_from((HOST_AUDIENCE, HOST_AUDIENCE, EXCHANGE, SHAREPOINT)),
    "exp": st.just(3600), "nbf": st.just(0), "sub": st.just("user-sub"),
    "azp": present(st.sampled_from(CLIENTS)),
    "appid": st.sampled_from((MISSING, MISSING) + CLIENTS),
    "deviceid": present(st.sampled_from(DEVICE_CLAIMS)), "upn": present(st.sampled_from(USERS)),
    "groups": st.sampled_from(((), ("kiosk-users",), ("sales",))), "amr": st.sampled_from((("pwd",), ("pwd", "mfa"))),
})
legitimate_claim_sets = sound_claim_sets.map(lambda claims: claims | {"aud": HOST_AUDIENCE}).flatmap(
    lambda claims: st.builds(lambda device, client: claims | {"deviceid": device, "azp": client},
                             st.sampled_from((ALEX_IPHONE, CASEY_IPAD, DREW_IPHONE, BLAKE_ANDROID,
                                              ALEX_IPHONE.upper())),
                             st.sampled_from((OUTLOOK_MOBILE, OUTLOOK_DESKTOP, OUTLOOK_MOBILE.upper(), TEAMS, OFFICE))))
legitimate_credentials = st.builds(CredentialSpec, st.just("issuer"), legitimate_claim_sets,
                                   st.sampled_from(("Bearer {}", "bearer {}")))
ALEX_OUTLOOK = CredentialSpec("issuer", {  # the demo's legitimate user: Outlook on a compliant, low-risk iPhone
    "iss": ISSUER, "aud": HOST_AUDIENCE, "exp": 3600, "nbf": 0, "sub": "user-sub", "azp": OUTLOOK_MOBILE,
    "appid": MISSING, "deviceid": ALEX_IPHONE, "upn": "alex@contoso.test", "groups": (), "amr": ("pwd",)}, "Bearer {}")
DREW_OUTLOOK = replace(ALEX_OUTLOOK, claims=ALEX_OUTLOOK.claims | {"deviceid": DREW_IPHONE, "upn": "drew@contoso.test"})
NO_CREDENTIAL = CredentialSpec("garbage", {}, "", ())
NEAR_MISSES = (  # a legitimate token with one thing wrong
    {"exp": -3600}, {"exp": MISSING}, {"nbf": 3600}, {"iss": ISSUER + "/"}, {"iss": MISSING}, {"sub": MISSING},
    {"aud": "api://portcullis-admin"}, {"aud": "portcullis-demo", "nonce": "n"}, {"aud": (HOST_AUDIENCE, "other")},
    {"aud": MISSING}, {"nonce": "n"}, {"exp": "9999999999"}, {"exp": True}, {"nbf": "0"}, {"exp": 1e300},
)
near_miss_credentials = st.builds(CredentialSpec, st.just("issuer"), st.tuples(
    legitimate_claim_sets, st.sampled_from(NEAR_MISSES)).map(lambda pair: pair[0] | pair[1]), st.just("Bearer {}"))
credentials = st.one_of(
    legitimate_credentials,
    near_miss_credentials,
    st.builds(CredentialSpec, st.just("issuer"), sound_claim_sets, st.sampled_from(("Bearer {}", "bearer {}"))),
    st.builds(CredentialSpec, st.sampled_from(SIGNERS), st.one_of(claim_sets, sound_claim_sets),
              st.sampled_from(LAYOUTS), authorization_values.map(tuple)),
)
no_credential = st.just(NO_CREDENTIAL)


@dataclass(frozen=True)
class Credential:
    values: list[str]  # the Authorization header values sent
    token: str | None  # the JWT inside them, if any (never to be echoed)
    claims: dict[str, Any] | None  # set only for an untampered RS256 token signed by the issuer's key


@dataclass
class Signers:
    idp: DemoIdentityProvider
    attacker: rsa.RSAPrivateKey = field(default_factory=lambda: rsa.generate_private_key(65537, 2048))

    def credential(self, spec: CredentialSpec, host: str) -> Credential:
        if spec.signer == "garbage":
            return Credential(list(spec.garbage), None, None)
        now = int(time.time())
        claims = {name: value for name, value in spec.claims.items() if value != MISSING}
        claims.update({"iat": now, "tid": "c0a7e1d5-0000-4000-8000-00000000c0de"})
        claims["iss"] = claims["iss"].replace(ISSUER, self.idp.issuer) if "iss" in claims else None
        audience = min(AUDIENCES.get(host, {EXCHANGE}))
        if "aud" in claims:
            aud = claims["aud"]
            claims["aud"] = audience if aud == HOST_AUDIENCE else [audience if a == HOST_AUDIENCE else a for a in aud] \
                if isinstance(aud, tuple | list) else aud
        claims = {k: list(v) if isinstance(v, tuple) else v for k, v in claims.items() if v is not None}
        for name in ("exp", "nbf"):
            if type(claims.get(name)) is int:  # seconds from now; other types are sent as drawn
                claims[name] += now
        kid = self.idp.kid
        if spec.signer in ("issuer", "tampered"):
            token = jwt.encode(claims, self.idp.key, algorithm="RS256", headers={"kid": kid})
        elif spec.signer == "issuer-rs512":
            token = jwt.encode(claims, self.idp.key, algorithm="RS512", headers={"kid": kid})
        elif spec.signer in ("attacker", "attacker-same-kid"):
            token = jwt.encode(claims, self.attacker, algorithm="RS256",
                               headers={"kid": kid if spec.signer == "attacker-same-kid" else "attacker"})
        elif spec.signer == "none":
            token = jwt.encode(claims, None, algorithm="none", headers={"kid": kid})
        else:  # the classic confusion: HMAC keyed with the issuer's public key
            public = self.idp.key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
            token = _hmac_token(claims, public, kid)
        if spec.signer == "tampered":  # the payload of a real token, changed: Alex's device claimed
            header, _, signature = token.split(".")
            payload = base64.urlsafe_b64encode(json.dumps({**claims, "deviceid": ALEX_IPHONE,
                                                           "azp": OUTLOOK_MOBILE}).encode()).rstrip(b"=").decode()
            token = f"{header}.{payload}.{signature}"
        values = [f"Bearer {token}"] * 2 if spec.layout == "twice" else [spec.layout.format(token, token)]
        return Credential(values, token, claims if spec.signer == "issuer" else None)


@dataclass(frozen=True)
class OracleIdentity:
    user: str
    client_id: str | None
    device_id: str | None
    groups: frozenset[str]


def oracle_identity(credential: Credential, host: str, issuer: str) -> OracleIdentity | None:
    """Who a request is, if its one Authorization value is ``Bearer <token>`` and the token is
    the issuer's access token (no ``nonce``: that is an ID token), unexpired and already valid
    (times as JSON numbers), with a subject and one audience (a string, as Entra issues it), the
    host's."""
    claims, now = credential.claims, time.time()
    if claims is None or len(credential.values) != 1:
        return None
    words = credential.values[0].split()
    if len(words) != 2 or words[0].lower() != "bearer" or words[1] != credential.token:
        return None
    times = {name: claims.get(name, 0) for name in ("exp", "nbf")}
    if not all(type(t) in (int, float) and t < 253402300800 for t in times.values()) or "nonce" in claims:
        return None
    if (claims.get("iss") != issuer or times["exp"] <= now or times["nbf"] > now
            or "sub" not in claims or not isinstance(claims.get("aud"), str)
            or claims["aud"] not in AUDIENCES.get(host, ())):
        return None

    def text(name: str) -> str | None:
        value = claims.get(name)
        return value if isinstance(value, str) and value else None

    client = text("azp") or text("appid")
    device = text("deviceid")
    return OracleIdentity(text("upn") or str(claims["sub"]), client.lower() if client else None,
                          device.lower() if device else None, frozenset(g.lower() for g in claims["groups"]))


def named_activesync_devices(target: str) -> set[str]:
    """The DeviceIds an ActiveSync query names, lower case (MS-ASHTTP): ``DeviceId=`` pairs of a
    plain query, or the length-prefixed DeviceId of the base64 form (version, command, locale,
    length, DeviceId, ...). A query that cannot be read names a device no phone has."""
    query = target.partition("?")[2]
    if not query:
        return set()
    if "=" in query.rstrip("=") or "&" in query:
        pairs = (pair.partition("=") for pair in query.split("&") if pair)
        return {unquote_plus(value).lower() for key, _, value in pairs if unquote_plus(key).lower() == "deviceid"}
    try:
        raw = base64.b64decode(query + "=" * (-len(query) % 4), validate=True)
    except ValueError:  # binascii.Error
        return {"<unreadable>"}
    return {raw[5:5 + raw[4]].decode("latin-1").lower()} if len(raw) >= 5 and len(raw) >= 5 + raw[4] \
        else {"<unreadable>"}


@dataclass(frozen=True)
class Verdict:
    """What the oracle says of one request whose path the gateway accepted."""

    public: bool
    resources: frozenset[str]
    applicable: tuple[GrantPolicy, ...]
    failing: frozenset[str]  # applicable policies whose grant does not hold
    binding: bool  # an ActiveSync DeviceId, if the query names one, is the token's device

    @property
    def grants(self) -> bool:
        return self.public or (bool(self.resources) and not self.failing and self.binding)


def verdict(host: str, target: str, path: str, identity: OracleIdentity | None, kiosk: bool) -> Verdict:
    found = oracle_resources(host, path)
    resources = frozenset(found)
    if oracle_public(host, path) or identity is None:
        return Verdict(oracle_public(host, path), resources if identity else frozenset(), (), frozenset(), True)
    applicable = tuple(g for g in grant_policies() if g.applies(set(resources), kiosk))
    failing = frozenset(g.name for g in applicable if not g.holds(identity, kiosk))
    binding = True
    if "exchange-activesync" in resources:
        named = named_activesync_devices(target)
        device = None if kiosk or identity.device_id is None else DEVICES.get(identity.device_id)
        registered = str(device.get("easDeviceId", "")).lower() if device else ""
        binding = not named or named == {registered}
    return Verdict(False, resources, applicable, failing, binding)


def check_decision(outcome: Outcome, host: str, target: str, identity: OracleIdentity | None, kiosk: bool,
                   session_controls_possible: bool) -> Verdict | None:
    """The properties every decision must have, whatever was asked; returns the oracle's verdict
    (None when the path was refused as ambiguous)."""
    status = outcome.decision.status_code if outcome.forward else outcome.response.status_code  # type: ignore[union-attr]
    assert status in (200, 302, 400, 401, 403), status
    assert outcome.forward == outcome.decision.allowed
    path = canonical_path(target)
    if path is None:
        assert not outcome.forward and status == 400
        event("400 ambiguous path")
        return None
    judged = verdict(host, target, path, identity, kiosk)
    event(f"{status} {'public' if judged.public else 'granted' if judged.grants else 'not granted'}")
    if outcome.forward:
        assert judged.public or identity is not None, "forwarded a protected resource without a valid token"
        assert judged.grants, ("forwarded what no policy grants", judged)
        if not judged.public:  # the explanation What If shows names every policy that had to hold
            results = {p.name: p.result.value for p in outcome.decision.policies}
            assert all(results.get(g.name) == "success" for g in judged.applicable), (results, judged)
    elif outcome.decision.failed_policy_id is not None:
        assert outcome.decision.failed_policy_id in judged.failing, (outcome.decision.failed_policy_id, judged)
    if judged.public:
        assert outcome.forward, "a public resource must be reachable without a token"
    elif judged.grants and not session_controls_possible:
        assert outcome.forward, ("the oracle grants this request but it was refused", outcome.decision.reason)
    return judged


@dataclass
class Decisions:
    """An access service on a copy of the demo config, run in an event loop of its own."""

    service: AccessService
    loop: asyncio.AbstractEventLoop
    signers: Signers
    whatif: WhatIf

    def authorize(self, request: AccessRequest, values: list[str], cookies: list[str]) -> Outcome:
        return self.loop.run_until_complete(self.service.authorize(request, values, cookies))

    def explain(self, request: AccessRequest, identity: OracleIdentity, mfa: bool) -> Decision:
        """What the What If tool answers for the same user, app, device, URL, address and listener."""
        app = identity.client_id if identity.client_id and GUID.match(identity.client_id) else None
        question = Question(user=identity.user, url=f"https://{request.host}{request.path.split('?', 1)[0]}", app=app,
                            device=identity.device_id, ip=request.client_ip, groups=tuple(identity.groups), mfa=mfa,
                            listener=Listener.kiosk if request.kiosk_location else Listener.gateway)
        return self.loop.run_until_complete(self.whatif.ask(question, datetime.now(UTC)))


@pytest.fixture(scope="module")
def signers(gateway: Gateway) -> Signers:
    """Tokens the session gateway's demo issuer signs, and an attacker's key."""
    return Signers(gateway.idp)


@pytest.fixture(scope="module")
def decisions(gateway: Gateway, signers: Signers, tmp_path_factory: pytest.TempPathFactory,
              demo_ports: Ports) -> Iterator[Decisions]:
    """Tokens are checked against the session gateway's demo issuer (its JWKS)."""
    config_dir = gateway_config(tmp_path_factory.mktemp("properties"), gateway.ca,
                                Ports(0, demo_ports.idp, demo_ports.mail, demo_ports.docs))
    loop = asyncio.new_event_loop()
    operations = loop.run_until_complete(operations_for(config_dir))
    yield Decisions(operations.service, loop, signers,
                    WhatIf(operations.service.config, operations.whatif_inventory))
    operations.service.close()
    loop.close()


ACTIVESYNC = "/Microsoft-Server-ActiveSync?Cmd=Sync&User=alex&DeviceId=ApplF17XK2ALEX1&DeviceType=iPhone"
TWIN = {"method": "POST", "client_ip": "203.0.113.7", "user_agent": "Outlook-iOS-Android/1.0", "accepts_html": False,
        "content_type": "", "content_length": "0", "chunked": False, "kiosk": None, "cookies": []}
UNSERVED = ("intranet.contoso.test", "portcullis.contoso.test", "MAIL.CONTOSO.TEST", "mail.contoso.test.", "")
requests = st.fixed_dictionaries({
    "host_target": st.one_of(resource_targets(hostile=False), resource_targets(hostile=False), resource_targets(),
                             st.tuples(st.sampled_from(SERVED + UNSERVED), random_targets)),
    "method": st.sampled_from(("GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD", "PROPFIND", "PATCH", "get")),
    "client_ip": st.one_of(st.ip_addresses().map(str),
                           st.sampled_from(("10.20.3.4", "127.0.0.1", "not-an-address", "", "::ffff:10.20.1.1"))),
    "user_agent": st.one_of(st.sampled_from(("Mozilla/5.0 (Windows NT 10.0) Chrome/126.0", "Outlook-iOS-Android/1.0",
                                             "", "Mozilla/5.0 Outlook-iOS-Android")), st.text(max_size=20)),
    "accepts_html": st.booleans(),
    "content_type": st.sampled_from(("", "application/json", "multipart/form-data; boundary=x",
                                     "application/octet-stream")),
    "content_length": st.sampled_from(("", "0", "12", "-1", "abc")),
    "chunked": st.booleans(),
    "kiosk": st.sampled_from((None, None, None, "kiosk")),
    "cookies": st.one_of(st.just([]), st.lists(st.text(max_size=30), max_size=2),
                         st.just(["__Host-portcullis-session=forged-session-id"])),
})


@given(requests, st.one_of(credentials, no_credential))
@example(TWIN | {"host_target": (MAIL, ACTIVESYNC)}, ALEX_OUTLOOK)  # forwarded
@example(TWIN | {"host_target": (MAIL, ACTIVESYNC)}, DREW_OUTLOOK)  # high risk: refused
@example(TWIN | {"host_target": (MAIL, ACTIVESYNC.replace("ApplF17XK2ALEX1", "ApplF17DREW001"))},
         ALEX_OUTLOOK)  # Alex's token syncing Drew's phone: refused
@example(TWIN | {"host_target": (MAIL, "/Microsoft-Server-ActiveSync" + activesync_base64(b"ApplF17DREW001"))},
         ALEX_OUTLOOK)  # the same in the base64 form
@example(TWIN | {"host_target": (MAIL, ACTIVESYNC), "kiosk": "kiosk"}, ALEX_OUTLOOK)  # a kiosk is unmanaged
@example(TWIN | {"host_target": (MAIL, ACTIVESYNC)}, replace(ALEX_OUTLOOK, signer="attacker-same-kid"))  # forged
@example(TWIN | {"host_target": (MAIL, ACTIVESYNC)}, replace(ALEX_OUTLOOK, claims=ALEX_OUTLOOK.claims | {
    "exp": -3600}))  # expired an hour ago
@example(TWIN | {"host_target": (MAIL, "/owa/auth/logon.aspx")}, NO_CREDENTIAL)  # public: forwarded
@example(TWIN | {"host_target": (MAIL, "/owa/")}, NO_CREDENTIAL)  # its neighbour: refused
@budget(300)
def test_authorize_never_raises_and_forwards_only_what_a_policy_grants(
        decisions: Decisions, fields: dict[str, Any], spec: CredentialSpec) -> None:
    """Layer 2 (see the module docstring): the oracle, What If, the other host, the log."""
    host, target = fields["host_target"]
    credential = decisions.signers.credential(spec, host)
    request = AccessRequest(correlation_id=str(uuid.uuid4()), host=host, path=target, method=fields["method"],
                            client_ip=fields["client_ip"], user_agent=fields["user_agent"],
                            accepts_html=fields["accepts_html"], content_type=fields["content_type"],
                            content_length=fields["content_length"], chunked=fields["chunked"], authority=host,
                            kiosk_location=fields["kiosk"])
    outcome = decisions.authorize(request, credential.values, fields["cookies"])
    identity = oracle_identity(credential, host, decisions.signers.idp.issuer)
    strict = len(credential.values) == 1 and STRICT_BEARER.fullmatch(credential.values[0]) is not None
    session_controls_possible = fields["kiosk"] is not None or "kiosk-users" in (identity.groups if identity else ())
    judged = check_decision(outcome, host, target, identity if strict or identity is None else None,
                            fields["kiosk"] is not None, session_controls_possible or not strict)
    if identity is not None and judged is not None and not judged.public and outcome.decision.policies:
        explained = decisions.explain(request, identity, "mfa" in spec.claims.get("amr", ()))
        event("explained by What If")
        assert explained.failed_policy_id == outcome.decision.failed_policy_id
        assert {p.name: p.result for p in explained.policies} == {p.name: p.result for p in outcome.decision.policies}
    other = DOCS if host == MAIL else MAIL  # the same token at the other host: its audience decides, cached or not
    elsewhere = replace(request, correlation_id=str(uuid.uuid4()), host=other, authority=other)
    check_decision(decisions.authorize(elsewhere, credential.values, fields["cookies"]), other, target,
                   oracle_identity(credential, other, decisions.signers.idp.issuer) if strict else None,
                   fields["kiosk"] is not None, True)
    if outcome.forward:  # its record waits for the answer (DecisionRecords writes it then): here, none came
        decisions.service.record_answer(outcome.record, None, None)
    records = [r for r in decisions.service.decision_log.recent() if r.get("correlationId") == request.correlation_id]
    assert len(records) == 1, "every decision is logged exactly once"
    if credential.token is not None:  # never echoed: not in the answer, not in the log
        assert credential.token not in json.dumps(records[0])
        if outcome.response is not None:
            assert credential.token.encode() not in outcome.response.body
            assert all(credential.token not in value for _, value in outcome.response.headers)


# --- layer 3: the real listener ------------------------------------------------------------------

FORGED_NAMES = tuple(n for n in MUST_STRIP if n.lower() not in ("connection", "te", "keep-alive"))
OWN_NAMES = tuple(n for n in FORGED_NAMES if n.lower().startswith("x-portcullis-"))  # the upstream trusts these most
forged_headers = st.lists(st.sampled_from(FORGED_NAMES).flatmap(fold_variant) | st.sampled_from(OWN_NAMES).flatmap(
    fold_variant), min_size=1, max_size=4, unique_by=str.lower)
ordinary_headers = st.lists(st.sampled_from((
    ("User-Agent", "Outlook-iOS-Android/1.0"), ("User-Agent", "Mozilla/5.0 (Windows NT 10.0) Chrome/126.0"),
    ("Accept", "text/html,application/xhtml+xml"), ("Accept", "application/json"), ("X-Custom", "ordinary"),
    ("MS-ASProtocolVersion", "16.1"), ("Content-Length", "0"), ("Cookie", "a=b"), ("Host", DOCS))),
    max_size=4, unique_by=lambda h: h[0])
nominations = st.lists(st.sampled_from(("X-Custom", "X-Portcullis-User", "Authorization", "Content-Length",
                                        "X-Forwarded-For")), max_size=2)


def one_quick_line(target: str) -> str:
    """The target as one request line the demo backend answers at once (an ActiveSync Ping waits
    for its heartbeat)."""
    return re.sub("ping", "pong", target, flags=re.IGNORECASE).replace(" ", "%20").replace("\r", "").replace("\n", "")


def without_line_breaks(values: list[str]) -> list[str]:
    return [v.replace("\r", "").replace("\n", "") for v in values]


@dataclass(frozen=True)
class Answer:
    status: int | None  # None: the connection closed without an answer
    headers: dict[str, str]
    body: str

    @property
    def reached_upstream(self) -> bool:
        """The demo backends are uvicorn (its Server header) and echo what they received."""
        return "uvicorn" in self.headers.get("server", "") or '"backend"' in self.body

    def echo(self) -> dict[str, Any] | None:
        """What a demo backend says it received (also on its 404 and 405), if it answered."""
        if '"backend"' not in self.body:
            return None
        return json.loads(self.body[self.body.index("{"):self.body.rindex("}") + 1])


def parsed(answer: str) -> Answer:
    head, _, body = answer.partition("\r\n\r\n")
    lines = head.split("\r\n")
    if not lines[0].startswith("HTTP/"):
        return Answer(None, {}, answer)
    fields = (line.partition(":") for line in lines[1:])
    return Answer(int(lines[0].split()[1]), {n.strip().lower(): v.strip() for n, _, v in fields}, body)


BACKENDS = {MAIL: "exchange", DOCS: "sharepoint"}
ECHOED = ((MAIL, "/owa/"), (MAIL, "/owa/auth/logon.aspx"), (MAIL, "/Microsoft-Server-ActiveSync"),
          (MAIL, "/EWS/Exchange.asmx"), (MAIL, "/autodiscover/autodiscover.xml"), (DOCS, "/sites/finance/"),
          (DOCS, "/_api/web"), (DOCS, "/sites/finance/_api/web"))  # what the demo backends answer with an echo
echoed_targets = st.sampled_from(ECHOED).flatmap(  # starlette routes by exact case: mostly as written
    lambda pair: st.tuples(st.just(pair[0]), st.one_of(st.just(pair[1]), st.just(pair[1]), spelled(pair[1])))).flatmap(
    lambda pair: CLIENT_QUERIES.map(lambda query: (pair[0], quote(pair[1], safe=VISIBLE_ASCII) + query)))
listener_targets = st.one_of(echoed_targets, echoed_targets, resource_targets(hostile=False), resource_targets(),
                             st.tuples(st.just(MAIL), random_targets)).map(
    lambda pair: (pair[0], one_quick_line(pair[1])))


def host_headers(host: str) -> st.SearchStrategy[str]:
    """The Host header a client sends for ``host``: usually that host in some spelling, sometimes another."""
    return st.sampled_from((host, host, host, host.upper(), f"{host}:443", f"{host}.", "intranet.contoso.test",
                            "portcullis.contoso.test", DOCS if host == MAIL else MAIL))


def send(gateway: Gateway, method: str, target: str, fields: list[tuple[str, str]]) -> tuple[Answer, str, list[str]]:
    """Over TLS with the Host's SNI: the mail host as raw bytes (targets as written), the others
    with httpx. Returns the answer, the target and the Authorization values actually sent."""
    host_header = fields[0][1]
    if host_header.lower() != DOCS:
        request = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in fields) + "\r\n"
        return parsed(raw_exchange(gateway, request)), target, [v for n, v in fields if n == "Authorization"]
    headers = {n: v.encode("ascii", "replace").decode().strip() for n, v in fields[1:] if n != "Host"}
    try:
        response = gateway.request(DOCS, target if target.startswith("/") else f"/{target}", method=method,
                                   headers=headers)
    except (httpx.InvalidURL, httpx.LocalProtocolError):
        reject()  # httpx will not send it: nothing to learn
    answer = Answer(response.status_code, {k.lower(): v for k, v in response.headers.items()}, response.text)
    return answer, response.request.url.raw_path.decode(), response.request.headers.get_list("authorization")


@given(listener_targets.flatmap(lambda pair: st.tuples(host_headers(pair[0]), st.just(pair[1]))),
       st.sampled_from(("GET", "POST", "PUT", "PROPFIND", "OPTIONS")),
       st.one_of(legitimate_credentials, credentials, no_credential), forged_headers, ordinary_headers, nominations)
@example((MAIL, "/owa/auth/logon.aspx"), "GET", NO_CREDENTIAL,  # public: no token, forged identity stripped
         ["X-Portcullis-User", "X_Portcullis_Device_Id", "x-portcullis-anything", "X.Auth.Request.Email"], [], [])
@example((MAIL, ACTIVESYNC), "POST", ALEX_OUTLOOK,  # the legitimate twin: forwarded as Alex, nothing forged
         ["X_Portcullis_User", "X-Forwarded-User", "X-Original-URL"], [], ["X-Portcullis-User"])
@example((MAIL, ACTIVESYNC), "POST", DREW_OUTLOOK, [], [], [])  # high risk: never reaches Exchange
@budget(50)
def test_the_listener_reaches_the_upstream_only_when_a_policy_grants_and_never_with_forged_identity(
        gateway: Gateway, signers: Signers, host_target: tuple[str, str], method: str, spec: CredentialSpec,
        forged: list[str], ordinary: list[tuple[str, str]], nominated: list[str]) -> None:
    """Layer 3 (see the module docstring), through TLS to the session gateway."""
    host_header, target = host_target
    host = host_header.lower().rsplit(":", 1)[0].rstrip(".")  # as routing reads Host
    credential = signers.credential(spec, host)
    fields = [("Host", host_header), *ordinary, *((name, f"forged-{i}") for i, name in enumerate(forged)),
              *(("Authorization", v) for v in without_line_breaks(credential.values)),
              ("Connection", ", ".join(["close", *nominated]))]
    answer, target, values = send(gateway, method, target, fields)
    event(f"{answer.status} {'upstream' if answer.reached_upstream else 'gateway'}")
    assert answer.status is None or answer.status < 500 or answer.status == 503, (answer.status, answer.body[:300])
    identity = oracle_identity(Credential(values, credential.token, credential.claims), host, signers.idp.issuer)
    strict = len(values) == 1 and STRICT_BEARER.fullmatch(values[0]) is not None
    sni = DOCS if host_header.lower() == DOCS else MAIL  # what ``send`` connects with; Host and SNI must agree
    path = canonical_path(target) if host in SERVED and host == sni else None
    judged = verdict(host, target, path, identity, False) if path is not None else None
    groups = identity.groups if identity else frozenset()
    one_host = [n.lower() for n, _ in fields].count("host") == 1 or host_header.lower() == DOCS  # httpx sends one
    if judged is not None and judged.grants and strict and one_host and "kiosk-users" not in groups:
        assert answer.reached_upstream, ("the oracle grants this request but it was refused", answer.status,
                                         answer.body[:300])
    if answer.reached_upstream:
        assert judged is not None and judged.grants, ("the upstream was reached but no policy grants it", judged)
        echo = answer.echo()
        if echo is None:
            return
        event("echoed")
        assert echo["backend"] == BACKENDS[host], echo["backend"]  # routed by the Host the decision was made for
        received = echo.get("receivedHeaders", {})
        assert "forged-" not in json.dumps(received), "a client-sent identity header reached the upstream"
        if received:
            assert received.get("x-portcullis-user") == (identity.user if identity and not judged.public else None)
        arrived = unquote(echo["rawPath"]) if "rawPath" in echo else echo["path"]  # decoded here, not by the gateway
        assert verdict(host, target, arrived, identity, False).grants, ("the upstream read another path", arrived)
    elif answer.status == 503:
        assert "temporarily_unavailable" in answer.body  # a signal source down, nothing else


FRAMING_REQUEST = "GET /owa/auth/logon.aspx HTTP/1.1\r\nHost: mail.contoso.test\r\n{extra}Connection: close\r\n\r\n"


@pytest.mark.parametrize("field", [
    pytest.param(field, id=field.split(":")[0])
    for field in ("Transfer_Encoding: chunked", "Content_Length: 5", "Transfer.Encoding: chunked")])
def test_a_framing_header_in_another_spelling_is_not_forwarded(gateway: Gateway, field: str) -> None:
    """F1 through the listener (a public page, so no token is needed to show it)."""
    twin = parsed(raw_exchange(gateway, FRAMING_REQUEST.format(extra="")))
    assert twin.status == 200 and twin.echo() is not None  # the legitimate twin reaches the backend
    answer = parsed(raw_exchange(gateway, FRAMING_REQUEST.format(extra=f"{field}\r\n")))
    echo = answer.echo()
    assert answer.status == 400 or (echo is not None and field.split(":")[0].lower() not in echo["receivedHeaders"])
