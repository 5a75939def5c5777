"""Progressive enforcement: a policy with a ``rollout`` is enforced for its cohort only and is
report-only for everyone else, so a team can turn a rule on for a pilot group, a share of users
or the kiosk pool before everyone.

The cohort is any request that matches one of:

- ``groups``: the token's ``groups`` claim names one of them (names or ids, any case);
- ``percentOfUsers``: the user falls in a stable share. The user is their object id (``oid``),
  else the token's subject; the share is a keyed hash (BLAKE2b, keyed with the policy name) of
  it, in 10,000 buckets. The same user is always in or out of the same policy's share, on every
  gateway and after a restart; another policy draws its own share; raising the percentage keeps
  everyone who was already in.
- ``listeners``: the request came through one of them (``gateway``: the reverse proxy;
  ``kiosk``: the kiosk forward proxy).

Pure: the hash is deterministic, nothing is read from outside.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from gateway.policy.model import AccessRequest, Identity, Listener, RolloutCohort
from gateway.policy.types import Policy

BUCKETS = 10_000


def user_key(identity: Identity) -> str:
    """The user a share is drawn for: the object id (stable across apps and renames), else ``sub``."""
    return (identity.object_id or identity.subject).lower()


def user_bucket(policy_name: str, user: str) -> int:
    """A stable bucket in [0, 10000) for this user and this policy."""
    digest = hashlib.blake2b(user.encode(), key=policy_name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def in_share(policy_name: str, user: str, percent: int) -> bool:
    return user_bucket(policy_name, user) < percent * BUCKETS // 100


def request_listener(request: AccessRequest) -> Listener:
    if request.forward_auth:
        return Listener.forward_auth
    return Listener.kiosk if request.kiosk_location is not None else Listener.gateway


@dataclass(frozen=True, slots=True)
class CompiledRollout:
    policy_name: str
    groups: frozenset[str]  # folded to lower case, as the request's groups are
    percent_of_users: int
    listeners: frozenset[Listener]

    @classmethod
    def of(cls, policy: Policy) -> CompiledRollout | None:
        rollout = policy.rollout
        if rollout is None:
            return None
        return cls(policy.name, frozenset(g.lower() for g in rollout.groups), rollout.percent_of_users,
                   frozenset(rollout.listeners))

    def cohort(self, request: AccessRequest, identity: Identity, groups: frozenset[str],
               share: bool | None = None) -> RolloutCohort:
        """The first test that puts the request in the cohort, or ``outsideCohort``. ``share``:
        whether the user is in the share, when it is known otherwise than by drawing it (replay of
        a pseudonymised record, whose user id is no longer the one the share was drawn on)."""
        if not self.groups.isdisjoint(groups):
            return RolloutCohort.group
        if self.percent_of_users and (in_share(self.policy_name, user_key(identity), self.percent_of_users)
                                      if share is None else share):
            return RolloutCohort.percent_of_users
        if request_listener(request) in self.listeners:
            return RolloutCohort.listener
        return RolloutCohort.outside
