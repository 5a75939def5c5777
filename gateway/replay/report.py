"""The replay diff: decisions that flip, grouped by policy, app, user and resource, with examples;
policies that never matched; what was skipped and why. ``as_text`` prints it; ``gateway.replay.html``
renders the same report as a self-contained page.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC

from gateway.config import Config
from gateway.policy.model import PolicyState
from gateway.replay.engine import DecisionSummary, Replayed
from gateway.replay.recorded import Skipped
from gateway.terminal import printable

ALLOW_TO_BLOCK = "allow→block"
BLOCK_TO_ALLOW = "block→allow"
DIMENSIONS = ("policy", "app", "user", "resource")
URL_WIDTH = 110


@dataclass(frozen=True, slots=True)
class Group:
    key: str
    label: str  # the key, with a policy's display name
    items: tuple[Replayed, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplayReport:
    baseline: str
    candidate: str
    sources: tuple[str, ...]
    replayed: tuple[Replayed, ...]
    skipped: tuple[Skipped, ...]
    never_matched: tuple[tuple[str, str, str], ...]  # id, display name, state
    notes: tuple[str, ...]
    examples: int = 3

    def changes(self) -> dict[str, list[Replayed]]:
        """allow→block and block→allow first (always present), then other result changes."""
        found: dict[str, list[Replayed]] = {ALLOW_TO_BLOCK: [], BLOCK_TO_ALLOW: []}
        for item in self.replayed:
            if item.change is not None:
                found.setdefault(item.change, []).append(item)
        return found

    @property
    def unchanged(self) -> int:
        return sum(item.change is None for item in self.replayed)

    @property
    def other_reason(self) -> list[Replayed]:
        return [item for item in self.replayed if item.other_reason]

    def groups(self, change: str, dimension: str) -> list[Group]:
        """The requests of one kind of change, grouped, largest group first."""
        key = GROUP_KEYS[dimension]
        grouped: dict[str, list[Replayed]] = {}
        labels: dict[str, str] = {}
        for item in self.changes().get(change, []):
            name, label = key(item)
            grouped.setdefault(name, []).append(item)
            labels[name] = label
        return [Group(name, labels[name], tuple(items))
                for name, items in sorted(grouped.items(), key=lambda pair: (-len(pair[1]), pair[0]))]

    def flips_per_policy(self) -> list[tuple[str, str, int, int]]:
        """(policy, label, allow→block, block→allow) for the chart."""
        counts: dict[str, list[int]] = {}
        labels: dict[str, str] = {}
        for column, change in enumerate((ALLOW_TO_BLOCK, BLOCK_TO_ALLOW)):
            for group in self.groups(change, "policy"):
                counts.setdefault(group.key, [0, 0])[column] = len(group.items)
                labels[group.key] = group.label
        return [(key, labels[key], a, b) for key, (a, b) in sorted(counts.items(), key=lambda kv: (-sum(kv[1]), kv[0]))]

    def skipped_by_reason(self) -> list[tuple[str, list[str]]]:
        places: dict[str, list[str]] = {}
        for item in self.skipped:
            places.setdefault(item.reason, []).append(item.place)
        return sorted(places.items(), key=lambda pair: -len(pair[1]))


def deciding(item: Replayed) -> DecisionSummary:
    """The side whose decision explains the change: the candidate's block, or the baseline's
    block that no longer holds."""
    return item.baseline if item.change == BLOCK_TO_ALLOW else item.candidate


def _policy(item: Replayed) -> tuple[str, str]:
    summary = deciding(item)
    if summary.policy_id is None:
        return f"({summary.reason})", f"no policy: {summary.reason}"
    return summary.policy_id, f"{summary.policy_id} ({summary.policy_name})" if summary.policy_name else \
        summary.policy_id


def _resource(item: Replayed) -> tuple[str, str]:
    name = item.candidate.resource or item.baseline.resource or f"(none) {item.request.host}"
    return name, name


def _app(item: Replayed) -> tuple[str, str]:
    name = item.app or "(no app)"
    return name, name


def _user(item: Replayed) -> tuple[str, str]:
    name = item.user or "(no user)"
    return name, name


GROUP_KEYS: dict[str, Callable[[Replayed], tuple[str, str]]] = {
    "policy": _policy, "app": _app, "user": _user, "resource": _resource}


def never_matched(config: Config, replayed: Iterable[Replayed]) -> tuple[tuple[str, str, str], ...]:
    """Enabled and report-only policies of the candidate that applied to no replayed request."""
    applied = {name for item in replayed for name in item.candidate.applied}
    return tuple((p.name, p.display_name or p.name, p.state.value) for p in config.policies
                 if p.state is not PolicyState.disabled and p.name not in applied)


def notes(replayed: Iterable[Replayed], default_ip: str, pseudonym_key: bool) -> tuple[str, ...]:
    """What the reader must know to trust the numbers."""
    items = list(replayed)
    counts: Counter[str] = Counter()
    for item in items:
        counts["current"] += item.current_inventory
        counts["unverified"] += item.unverified_token
        counts["no address"] += item.request.client_ip is None
        counts["pseudonyms"] += item.request.pseudonymized
    found = []
    if counts["current"]:
        found.append(f"{counts['current']} requests had no decision log record with the device of the time: their "
                     "device was looked up in today's inventory (add the decision log to the sources to replay the "
                     "signals as recorded)")
    if counts["unverified"]:
        found.append(f"{counts['unverified']} requests carry a token that nothing recorded as accepted by the "
                     "gateway: replay decodes tokens without checking signatures, so their claims were taken as "
                     "given")
    if counts["no address"]:
        found.append(f"{counts['no address']} requests (HAR) carry no client address: evaluated from {default_ip} "
                     "(--client-ip)")
    if counts["pseudonyms"]:
        found.append(f"{counts['pseudonyms']} decision records carry pseudonymised users: " + (
            "the policies' user lists were keyed with the same pseudonym key" if pseudonym_key else
            "no pseudonym key is available here, so conditions naming users cannot match them (groups still do)"))
    kept = [item for item in items if item.cohort_kept]
    if kept:
        found.append(f"{len(kept)} requests by pseudonymised users fall under a percentOfUsers rollout "
                     f"({', '.join(sorted({p for item in kept for p in item.cohort_kept}))}): a share cannot be "
                     "drawn from a pseudonym, so the cohort the gateway recorded was kept; that is exact only if "
                     "the rollout is as it was when the log was written (give that config as --baseline DIR to "
                     "have changed rollouts found and counted)")
    unknown = [item for item in items if item.cohort_unknown]
    if unknown:
        found.append(f"{len(unknown)} requests by pseudonymised users fall under a percentOfUsers rollout that is "
                     f"not as it was when the log was written "
                     f"({', '.join(sorted({p for item in unknown for p in item.cohort_unknown}))}): their cohort "
                     "could not be recomputed from a pseudonym; they were counted in the share only if the gateway "
                     "recorded them in it, so their decisions are estimates")
    return tuple(found)


def as_text(report: ReplayReport) -> str:
    """Every line passes through ``printable``: paths, reasons, names and notes quote recorded
    traffic and configs, and a line break inside one of them would forge a line of the report."""
    changes = report.changes()
    lines = [f"Replay of {len(report.replayed)} requests from {', '.join(report.sources)}",
             f"  baseline:  {report.baseline}", f"  candidate: {report.candidate}",
             "  " + "   ".join([f"same result: {report.unchanged} ({len(report.other_reason)} of them blocked "
                                "for another reason)",
                                *(f"{change}: {len(items)}" for change, items in changes.items()),
                                f"skipped: {len(report.skipped)}"])]
    for change, items in changes.items():
        lines += ["", f"{change}: {len(items) or 'none'}"]
        for dimension in DIMENSIONS if items else ():
            lines.append(f"  by {dimension}:")
            for group in report.groups(change, dimension):
                lines.append(f"    {group.label}: {len(group.items)}")
                if dimension == "policy":
                    lines += [f"      {example_line(item)}" for item in group.items[:report.examples]]
    if report.other_reason:
        lines += ["", f"still blocked, another reason: {len(report.other_reason)}"]
        lines += [f"  {example_line(item)}" for item in report.other_reason[:report.examples]]
    lines += ["", f"policies that never matched under the candidate: {len(report.never_matched) or 'none'}"]
    lines += [f"  {name} [{state}] ({display})" for name, display, state in report.never_matched]
    if report.skipped:
        lines += ["", f"skipped: {len(report.skipped)}"]
        for reason, places in report.skipped_by_reason():
            shown = ", ".join(places[:report.examples]) + (", ..." if len(places) > report.examples else "")
            lines.append(f"  {len(places)}: {reason} ({shown})")
    if report.notes:
        lines += ["", "notes:"] + [f"  - {note}" for note in report.notes]
    return "\n".join(printable(line) for line in lines)


def example_line(item: Replayed) -> str:
    request = item.request
    return (f"{when(item)} {request.method} {url(item)}  {item.user or '-'}, {item.app or '-'}: "
            f"{summary_text(item.baseline)} → {summary_text(item.candidate)}  "
            f"[{request.correlation_id or '-'} {request.place}]")


def summary_text(summary: DecisionSummary) -> str:
    if summary.policy_id:
        return f"{summary.result.value} ({summary.policy_id}: {summary.reason})"
    return f"{summary.result.value} ({summary.reason})"


def when(item: Replayed) -> str:
    return item.request.time.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def url(item: Replayed, width: int = URL_WIDTH) -> str:
    text = f"https://{item.request.host}{item.request.target}"
    return text if len(text) <= width else text[:width - 1] + "…"
