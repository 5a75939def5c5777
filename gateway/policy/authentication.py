"""Authentication strength and authentication context (Entra's step-up), judged on the token.

- **Authentication strength** (``grantControls.authenticationStrength``): the sign-in used one of
  the strength's method combinations, read from the token's ``amr`` (RFC 8176 values, as Entra
  writes them), or the issuer says so in ``acr`` (a custom strength's ``acrValues``). Entra's
  built-ins, as this gateway reads them: ``mfa`` (``mfa``, ``ngcmfa``, or a phishing-resistant
  method), ``passwordlessMfa`` (``fido``, ``hwk``, ``sc``, ``ngcmfa``), ``phishingResistantMfa``
  (``fido``, ``hwk``, ``sc``: FIDO2 and hardware-bound or smart-card keys).
- **Authentication context** (``c1``..``c99``): a resource may carry ids, and a policy targeting
  them applies to it; the token must carry each id in ``acrs`` (the issuer put it there when the
  sign-in satisfied that context's policies), else the client is challenged to sign in for it.

Both failures are step-ups: a new sign-in can satisfy them (the pipeline answers 401 or sends a
browser to sign in again instead of showing a block page).
"""

from __future__ import annotations

from gateway.policy.model import ControlFailure, ErrorCode, Identity
from gateway.policy.types import AuthenticationStrength

AUTHENTICATION_STRENGTH = "authenticationStrength"
AUTHENTICATION_CONTEXT = "authenticationContext"
STEP_UP_CONTROLS = frozenset({AUTHENTICATION_STRENGTH, AUTHENTICATION_CONTEXT})

_PHISHING_RESISTANT = (frozenset({"fido"}), frozenset({"hwk"}), frozenset({"sc"}))
BUILT_IN_STRENGTHS = {
    "mfa": AuthenticationStrength(name="mfa", combinations=(frozenset({"mfa"}), frozenset({"ngcmfa"}),
                                                            *_PHISHING_RESISTANT)),
    "passwordlessMfa": AuthenticationStrength(name="passwordlessMfa",
                                              combinations=(*_PHISHING_RESISTANT, frozenset({"ngcmfa"}))),
    "phishingResistantMfa": AuthenticationStrength(name="phishingResistantMfa", combinations=_PHISHING_RESISTANT),
}


def strength_failure(strength: AuthenticationStrength, identity: Identity) -> ControlFailure | None:
    methods = identity.authentication_methods
    if any(combination <= methods for combination in strength.combinations):
        return None
    if identity.authentication_context is not None and identity.authentication_context in strength.acr_values:
        return None
    # the methods used are in the decision record (evaluationInput), not in the reason: a challenge
    # header quotes the reason, and amr values come from the token
    return ControlFailure(control=AUTHENTICATION_STRENGTH, error_code=ErrorCode.mfa_required,
                          reason=f"authentication strength {strength.name} required", step_up=strength.acr_values)


def context_failure(required: frozenset[str], identity: Identity) -> ControlFailure | None:
    """The token must carry every context the resource needs from this policy (Entra's claims challenge)."""
    missing = sorted(required - identity.authentication_contexts, key=lambda c: int(c[1:]))
    if not missing:
        return None
    return ControlFailure(control=AUTHENTICATION_CONTEXT, error_code=ErrorCode.insufficient_claims,
                          reason=f"authentication context {', '.join(missing)} required: sign in again for it",
                          step_up=tuple(missing))
