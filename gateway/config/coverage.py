"""Who reaches a resource with any valid token although enabled policies cover it: the users every
policy covering it leaves out (excluded, or outside its inclusions), per client app type, and the
client app types no such policy names. ``portcullis check`` warns about them (``lint``).

A policy covers a user unless its users condition leaves the user out. Group memberships and user
names are unknown here, so each excluded or included group and user is a yes/no question about a
user, and a cohort is left uncovered when some answers leave the user out of every policy: a
policy for All but ``excludeGroups: [staff]`` beside one for ``includeGroups: [staff]`` covers
everyone; the first alone leaves out the members of staff. Locations, platforms and device filters
are not weighed (a policy for every address but the kiosks' still counts as covering).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import combinations

from gateway.config.compile import users as policy_users
from gateway.config.models import ConditionalAccessPolicy
from gateway.policy.conditions import CompiledUsers
from gateway.policy.model import ALL, ClientAppType

CLIENT_APP_TYPES = [t for t in ClientAppType if t is not ClientAppType.all]
MAX_QUESTIONS = 16  # groups and users weighed at once; beyond, every left-out cohort is reported
NO_USER = "none"  # includeUsers: [None] includes no one


@dataclass(frozen=True, slots=True)
class UsersReach:
    """Whom one policy's users condition covers, over questions like ``group staff``/``user x``."""

    policy: str
    everyone_included: bool
    included: frozenset[str]
    excluded: frozenset[str]
    everyone_excluded: bool

    @classmethod
    def of(cls, policy: ConditionalAccessPolicy) -> UsersReach:
        users = CompiledUsers.of(policy_users(policy.conditions.users))
        included = _questions(users.include_users - {"all", NO_USER}, users.include_groups, users.include_issuers)
        return cls(policy.name, users.include_all, included,
                   _questions(users.exclude_users, users.exclude_groups, users.exclude_issuers), users.exclude_all)

    def leaves_out(self, yes: frozenset[str]) -> bool:
        """Whether a user for whom exactly the questions in ``yes`` are true is left out."""
        if self.everyone_excluded or yes & self.excluded:
            return True
        return not self.everyone_included and not yes & self.included

    def describe(self) -> str:
        """Whom it leaves out, in the policy's own keys."""
        if self.everyone_excluded:
            return "excludeUsers [All]"
        parts = [] if self.everyone_included else [f"users outside {', '.join(sorted(self.included)) or 'None'}"]
        return " or ".join([*parts, *sorted(self.excluded)])


def uncovered_cohorts(resource: str, enforced: Iterable[ConditionalAccessPolicy], resources: set[str]) -> list[str]:
    """The cohorts that reach ``resource`` with any valid token, described for a warning; empty when
    every user with every client app type is covered by one of ``enforced`` (enforced for everyone)."""
    covering = [p for p in enforced if resource in resources_of(p, resources)]
    gaps: dict[str, list[ClientAppType]] = {}
    for app_type in CLIENT_APP_TYPES:
        naming = [UsersReach.of(p) for p in covering if ClientAppType.all in p.conditions.client_app_types
                  or app_type in p.conditions.client_app_types]
        gap = _left_out_of_all(naming) if naming else "every user (no enabled policy covering it names them)"
        if gap is not None:
            gaps.setdefault(gap, []).append(app_type)
    return [gap + ("" if len(types) == len(CLIENT_APP_TYPES) else
                   f" with clientAppTypes {', '.join(t.value for t in types)}") for gap, types in gaps.items()]


def resources_of(policy: ConditionalAccessPolicy, resources: set[str]) -> set[str]:
    """The resources a policy's assignment includes, exclusions taken off."""
    include, exclude = policy.conditions.resources.include, policy.conditions.resources.exclude
    if ALL in exclude:
        return set()
    return (resources if ALL in include else set(include)) - set(exclude)


def _questions(users: frozenset[str], groups: frozenset[str], issuers: frozenset[str] = frozenset()) -> frozenset[str]:
    """Issuers are questions like groups (a user of issuer x): weighed apart, never as exclusive."""
    return frozenset({*(f"user {u}" for u in users), *(f"group {g}" for g in groups),
                      *(f"issuer {i}" for i in issuers)})


def _left_out_of_all(reaches: list[UsersReach]) -> str | None:
    """A cohort every policy leaves out (the smallest set of yes answers that does it), or None."""
    if any(r.everyone_included and not r.excluded and not r.everyone_excluded for r in reaches):
        return None  # one policy covers everyone
    questions = sorted({q for r in reaches for q in r.included | r.excluded})
    names = ", ".join(repr(r.policy) for r in reaches)
    if len(questions) > MAX_QUESTIONS:
        return "users left out of every policy covering it (" + "; ".join(
            f"{r.policy!r}: {r.describe()}" for r in reaches) + ")"
    for count in range(len(questions) + 1):
        for yes in map(frozenset, combinations(questions, count)):
            if all(r.leaves_out(yes) for r in reaches):
                included = sorted({q for r in reaches for q in r.included})
                who = "users in " + " and ".join(sorted(yes)) if yes else "users outside " + ", ".join(included)
                return f"{who} (left out of {names})"
    return None
