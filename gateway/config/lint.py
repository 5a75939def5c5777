"""Warnings for a config that loads but probably does not say what its authors meant: policies
that can never apply, resources no policy covers (or only a rollout cohort's, or only some users
or client app types), rollouts whose
cohort names a listener that does not exist, apps listed twice, an admin API off loopback, a
forward-auth listener off loopback in plain HTTP, ``approvedApplication`` without a
``compliantApplication`` alternative (Entra retired it), session controls on a host decided for an
edge proxy that cannot enforce them.
``portcullis check`` prints them; they do not stop the gateway."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from gateway.config import GATEWAY_FILE, POLICIES_FILE, Config
from gateway.config.coverage import resources_of, uncovered_cohorts
from gateway.config.loader import locate
from gateway.config.models import ConditionalAccessPolicy, PlatformOrAll, PolicyState
from gateway.errors import ConfigProblem
from gateway.policy.model import ALL, ALL_TRUSTED, BuiltInControl, GrantOperator, Listener


def config_warnings(config: Config) -> list[ConfigProblem]:
    return [*_policies_that_never_apply(config), *_uncovered_resources(config),
            *_rollouts_without_their_listener(config), *_apps_listed_twice(config), *_admin_off_loopback(config),
            *_forward_auth_in_plain_http(config), *_approved_application_retired(config),
            *_session_controls_an_edge_cannot_enforce(config)]


def public_resources(config: Config) -> list[str]:
    return [f"{name}: {', '.join(r.hosts)} {', '.join(r.paths)}" for name, r in config.resources.items() if r.public]


def _policies_that_never_apply(config: Config) -> Iterator[ConfigProblem]:
    name, data = config.source(POLICIES_FILE)
    for index, policy in enumerate(config.policies):
        if policy.state is PolicyState.disabled:
            continue
        reason = _never_applies(policy, set(config.resources), _carrying(config, policy))
        if reason:
            yield locate(data, ("policies", index, "conditions"), name,
                         f"policy {policy.name!r} can never apply: {reason}", at_value=False)


def _carrying(config: Config, policy: ConditionalAccessPolicy) -> set[str]:
    """The resources that carry an authentication context the policy targets (it applies to them)."""
    contexts = set(policy.conditions.authentication_contexts)
    return {name for name, r in config.resources.items() if contexts & set(r.authentication_contexts)}


def _never_applies(policy: ConditionalAccessPolicy, resources: set[str], carrying: set[str]) -> str | None:
    conditions = policy.conditions
    included = resources if ALL in conditions.resources.include else set(conditions.resources.include) | carrying
    if ALL in conditions.resources.exclude or not included - set(conditions.resources.exclude):
        if conditions.authentication_contexts and not carrying:
            return (f"no resource carries its authentication contexts "
                    f"({', '.join(conditions.authentication_contexts)}) and it includes no other resource")
        return "every resource it includes is excluded (or it includes none)"
    users = conditions.users
    if ALL in users.exclude_users:
        return "excludeUsers has All"
    if not users.include_groups and not users.include_issuers and users.include_users and \
            {u.lower() for u in users.include_users} <= {"none"}:
        return "it includes no users (None)"
    if conditions.platforms is not None:
        included_platforms = {p.value for p in PlatformOrAll if p is not PlatformOrAll.all} \
            if PlatformOrAll.all in conditions.platforms.include else {p.value for p in conditions.platforms.include}
        if not included_platforms - {p.value for p in conditions.platforms.exclude}:
            return "every platform it includes is excluded"
    if conditions.locations is not None:
        excluded = set(conditions.locations.exclude)
        if ALL in excluded or (set(conditions.locations.include) <= excluded and ALL not in
                               conditions.locations.include and ALL_TRUSTED not in conditions.locations.include):
            return "every location it includes is excluded"
    return None


def covered_resources(config: Config) -> tuple[set[str], dict[str, str]]:
    """The resources an enabled policy with grant controls guards for everyone, and those only a
    rollout cohort's policy guards (with that policy's name)."""
    covered: set[str] = set()
    cohort_only: dict[str, str] = {}
    for policy in config.policies:
        if policy.state is PolicyState.enabled and policy.grant_controls is not None:  # session-only gates nothing
            resources = resources_of(policy, set(config.resources))
            if policy.rollout is None:
                covered |= resources
            else:
                cohort_only.update({r: policy.name for r in resources if r not in cohort_only})
    return covered, cohort_only


def _uncovered_resources(config: Config) -> Iterator[ConfigProblem]:
    """A policy with a rollout covers its cohort only: a resource that only such policies cover is
    reached by any valid token outside the cohorts. A resource covered only for some users or
    client app types is reached by any valid token of the others (``coverage``)."""
    name, data = config.source(GATEWAY_FILE)
    covered, cohort_only = covered_resources(config)
    enforced = [p for p in config.policies if _enforced_for_everyone(p)]
    for resource_name, resource in config.resources.items():
        if resource.public:
            continue
        own = resource_name in config.gateway_file.resources
        loc = ("resources", resource_name) if own else ("resourcePresets",)
        if resource_name not in covered:
            message = (f"resource {resource_name!r} is covered only for the rollout cohort of policy "
                       f"{cohort_only[resource_name]!r}: outside it any valid token reaches it"
                       if resource_name in cohort_only else
                       f"resource {resource_name!r} is covered by no enabled policy: any valid token reaches it")
            yield locate(data, loc, name, message, at_value=False)
        elif cohorts := uncovered_cohorts(resource_name, enforced, set(config.resources)):
            yield locate(data, loc, name, f"resource {resource_name!r} is covered only in part: any valid token "
                         f"reaches it for {'; and for '.join(cohorts)}", at_value=False)


def _enforced_for_everyone(policy: ConditionalAccessPolicy) -> bool:
    """Enabled, with grant controls, and no rollout (which enforces for its cohort only)."""
    return policy.state is PolicyState.enabled and policy.grant_controls is not None and policy.rollout is None


def _rollouts_without_their_listener(config: Config) -> Iterator[ConfigProblem]:
    configured = {Listener.gateway, *([Listener.kiosk] if config.gateway_file.kiosk is not None else []),
                  *([Listener.forward_auth] if config.gateway_file.forward_auth is not None else [])}
    name, data = config.source(POLICIES_FILE)
    for index, policy in enumerate(config.policies):
        listeners = policy.rollout.listeners if policy.rollout else []
        for at, listener in enumerate(listeners):
            if listener not in configured:
                what = "kiosk" if listener is Listener.kiosk else "forwardAuth"
                yield locate(data, ("policies", index, "rollout", "listeners", at), name,
                             f"policy {policy.name!r}: no {what} listener is configured, so its rollout never "
                             f"includes {what} requests")


EDGE_CANNOT_ENFORCE = (
    "policy {name!r} sets {control} on {hosts}, decided for an edge proxy (forwardAuth): the edge cannot "
    "{why}, so the requests there this policy applies to are refused (403); serve those hosts through "
    "Portcullis's reverse proxy, or leave them out of forwardAuth.hosts (docs/forward-auth.md)")
EDGE_WHY = {"blockDownloads": "replace a download in the answer, which Portcullis never sees",
            "tokenProtection": "present the client's device certificate, which its TLS ends"}


def _session_controls_an_edge_cannot_enforce(config: Config) -> Iterator[ConfigProblem]:
    """blockDownloads needs the answer, tokenProtection the client's certificate: neither reaches forward-auth."""
    forward_auth = config.gateway_file.forward_auth
    if forward_auth is None:
        return
    at_edge = set(forward_auth.hosts or config.gateway_file.protected_hosts)
    name, data = config.source(POLICIES_FILE)
    for index, policy in enumerate(config.policies):
        controls = policy.session_controls
        if policy.state is PolicyState.disabled or controls is None or _only_through_the_kiosk(config, policy):
            continue
        applies_to = resources_of(policy, set(config.resources)) | _carrying(config, policy)
        hosts = sorted(at_edge & {host for resource in applies_to for host in config.resources[resource].hosts})
        for control, key in (("blockDownloads", controls.block_downloads),
                             ("tokenProtection", controls.token_protection)):
            if key and hosts:
                yield locate(data, ("policies", index, "sessionControls", control), name,
                             EDGE_CANNOT_ENFORCE.format(name=policy.name, control=control, hosts=", ".join(hosts),
                                                        why=EDGE_WHY[control]))


def _only_through_the_kiosk(config: Config, policy: ConditionalAccessPolicy) -> bool:
    """The policy's locations are the kiosk's only: no request an edge asks about is ever in it."""
    kiosk, locations = config.gateway_file.kiosk, policy.conditions.locations
    return kiosk is not None and locations is not None and set(locations.include) == {kiosk.location} and \
        kiosk.location not in config.gateway_file.named_locations


def _apps_listed_twice(config: Config) -> Iterator[ConfigProblem]:
    name, data = config.source(GATEWAY_FILE)
    owners = Counter(client_id.lower() for ids in config.gateway_file.applications.values() for client_id in ids)
    for app, ids in config.gateway_file.applications.items():
        for index, client_id in enumerate(ids):
            if owners[client_id.lower()] > 1:
                yield locate(data, ("applications", app, index), name,
                             f"client id {client_id} is listed under more than one application")
    policies_name, policies_data = config.source(POLICIES_FILE)
    for index, policy in enumerate(config.policies):
        approved = policy.grant_controls.approved_applications if policy.grant_controls else []
        for app, count in Counter(approved).items():
            if count > 1:
                yield locate(policies_data, ("policies", index, "grantControls", "approvedApplications"),
                             policies_name, f"{app!r} is listed {count} times")


def _admin_off_loopback(config: Config) -> Iterator[ConfigProblem]:
    """Allowed (a container's port mapping needs it), but the admin API speaks plain HTTP."""
    admin = config.gateway_file.admin
    if admin is None or admin.on_loopback:
        return
    name, data = config.source(GATEWAY_FILE)
    yield locate(data, ("admin", "listen", "host"), name,
                 f"the admin API listens on {admin.listen.host} in plain HTTP: bearer tokens and decision records "
                 "would cross the network unencrypted; keep it on 127.0.0.1 behind a TLS reverse proxy")


def _forward_auth_in_plain_http(config: Config) -> Iterator[ConfigProblem]:
    """Allowed (an edge on another host needs it), but without ``tls`` every question carries the
    client's bearer token or session cookie in the clear."""
    forward_auth = config.gateway_file.forward_auth
    if forward_auth is None or forward_auth.on_loopback or forward_auth.tls is not None:
        return
    name, data = config.source(GATEWAY_FILE)
    yield locate(data, ("forwardAuth", "listen", "host"), name,
                 f"the forward-auth listener listens on {forward_auth.listen.host} in plain HTTP: each question "
                 "carries the client's bearer token or session cookie across the network unencrypted; set "
                 "forwardAuth.tls (with proxyCaFiles, so only the edges' certificates are answered) or keep it "
                 "on 127.0.0.1")


APPROVED_APPLICATION_RETIRED = (
    "policy {name!r}: Entra retired the approvedApplication grant (\"Require approved client app\") in March "
    "2026; give it compliantApplication (\"Require app protection policy\") as an alternative (operator: OR, "
    "builtInControls: [approvedApplication, compliantApplication]), or move to compliantApplication "
    "(see docs/configuration.md, \"Migrating from approvedApplication\")")


def _approved_application_retired(config: Config) -> Iterator[ConfigProblem]:
    """Entra's migration: every policy that requires an approved client app requires it OR an app
    protection policy. Portcullis still enforces approvedApplication (the client id of a signed token)."""
    name, data = config.source(POLICIES_FILE)
    for index, policy in enumerate(config.policies):
        grant = policy.grant_controls
        if grant is None or BuiltInControl.approved_application not in grant.built_in_controls:
            continue
        if grant.operator is GrantOperator.OR and BuiltInControl.compliant_application in grant.built_in_controls:
            continue
        at = grant.built_in_controls.index(BuiltInControl.approved_application)
        yield locate(data, ("policies", index, "grantControls", "builtInControls", at), name,
                     APPROVED_APPLICATION_RETIRED.format(name=policy.name))
