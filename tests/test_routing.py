"""gateway.routing on its own: the route each request line, Host, SNI and listener gets (the live
listener tests in test_security_routing.py and test_kiosk_proxy.py cover the wiring)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.routing import (
    BROWSER_ENDPOINTS,
    MTD_ENDPOINTS,
    Refused,
    RouteQuery,
    Router,
    ServiceEndpoint,
    Unprotected,
    Upstream,
)

MAIL = "mail.contoso.test"
GET = RouteQuery(kiosk=False, tls=True, target_host=MAIL, target_port=443, http1=True, authority="", hosts=(MAIL,),
                 host_header=MAIL, path="/owa/", method="GET", listener_port=8443, sni=MAIL)
KIOSK = replace(GET, kiosk=True, connect_target=(MAIL, 443))


@pytest.fixture(scope="module")
def router() -> Router:
    return Router(load_config(Path(__file__).parent.parent / "config").gateway_file)


def test_a_protected_host_goes_to_its_upstream(router: Router) -> None:
    assert router.route(GET) == Upstream(MAIL, "http", "127.0.0.1", 9401)
    assert router.route(replace(GET, hosts=("MAIL.contoso.test.:8443",))) == Upstream(MAIL, "http", "127.0.0.1", 9401)


@pytest.mark.parametrize(("change", "status", "reason"), [
    ({"tls": False}, 400, "plaintext"),
    ({"hosts": (MAIL, MAIL)}, 400, "exactly one Host"),
    ({"authority": f"{MAIL}:443"}, 400, "absolute-form"),
    ({"path": "*"}, 400, "not a path"),
    ({"method": "get"}, 400, "upper-case tokens"),
    ({"hosts": ("user@mail.contoso.test",)}, 400, "not a host name"),
    ({"method": "TRACE"}, 501, "cross-site tracing"),
    ({"hosts": (f"{MAIL}:444",)}, 421, "another port"),
    ({"hosts": ("other.contoso.test",), "sni": "other.contoso.test"}, 421, "does not serve"),
    ({"sni": ""}, 421, "SNI and Host differ"),
    ({"http1": False, "authority": MAIL, "hosts": ("docs.contoso.test",)}, 400, ":authority and Host"),
])
def test_what_routing_refuses(router: Router, change: dict[str, object], status: int, reason: str) -> None:
    route = router.route(replace(GET, **change))  # type: ignore[arg-type]  # fields by name, as in the table
    assert isinstance(route, Refused) and route.status == status and reason in route.reason


def test_the_gateways_own_endpoints_are_routed_to_them_with_a_declared_small_body(router: Router) -> None:
    service = replace(GET, hosts=("portcullis.contoso.test",), sni="portcullis.contoso.test", method="POST",
                      path="/mtd/demo/events", content_length="10")
    assert router.route(service) == ServiceEndpoint(MTD_ENDPOINTS, "portcullis.contoso.test")
    assert router.route(replace(GET, path="/.portcullis/callback")) == ServiceEndpoint(BROWSER_ENDPOINTS, MAIL)
    assert router.route(replace(service, content_length=None, transfer_encoding=True)).status == 411  # type: ignore[union-attr]
    assert router.route(replace(service, content_length=str(10**9))).status == 413  # type: ignore[union-attr]


def test_the_kiosk_names_one_destination_and_passes_through_only_exact_entries(router: Router) -> None:
    assert router.route(KIOSK) == Upstream(MAIL, "http", "127.0.0.1", 9401)
    mismatch = router.route(replace(KIOSK, connect_target=("docs.contoso.test", 443)))
    assert isinstance(mismatch, Refused) and mismatch.status == 421
    assert router.route(replace(KIOSK, tls=False, target_host="127.0.0.1", target_port=9400)) == Unprotected()
    plain = router.route(replace(KIOSK, tls=False, target_host="127.0.0.1", target_port=9401))
    assert isinstance(plain, Refused) and plain.error == "tls_required"
    assert router.kiosk_destination("127.0.0.1", 9400) == "pass"
    assert router.kiosk_destination(MAIL, 443) == "intercept"
    assert router.kiosk_destination(MAIL, 8443) == "deny"
    assert router.kiosk_destination("example.org", 443) == "deny"
