"""What the session stores keep: a pending sign-in and a browser session. Defined here, beside the
stores and their codec, so that browser sign-in (``gateway.identity.browser``) depends on the
stores and the stores never depend back on it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from gateway.policy.model import Identity


@dataclass(frozen=True, slots=True)
class PendingLogin:
    authority: str  # host[:port] as the browser addressed it: the callback must be the same
    return_url: str
    code_verifier: str
    nonce: str
    browser_binding: str  # a hash of the pre-sign-in cookie: the callback must come from that browser


@dataclass(frozen=True, slots=True)
class BrowserSession:
    identity: Identity
    host: str
    signed_in_at: datetime
    # signed in on a connection whose device certificate named ``identity.device_id``: the session is
    # honoured only on a connection whose certificate names that device again (a copied cookie is not)
    certificate_bound: bool = False
