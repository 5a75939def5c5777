"""Prometheus metrics of one gateway process, in a registry of its own (not the global one), so
tests and embedded use can run several gateways in one process.

Label values are bounded: ``app`` is a configured application name or ``unregistered``, ``policy``
a configured policy name or ``none``, ``reason`` a fixed word derived from the decision. Values a
client controls (paths, client ids, user names) never become labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.policy.model import Decision, DecisionResult, ErrorCode

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

type AgeSource = Callable[[], Iterable[tuple[str, float | None]]]


def reason_label(decision: Decision) -> str:
    """A fixed vocabulary for why: what refused it besides policy (the ActiveSync device binding,
    a session control), Entra's error code names, or what happened before policy."""
    if decision.restriction is not None:
        return decision.restriction.value
    if decision.error_code is not None:
        if decision.error_code is ErrorCode.blocked_by_conditional_access and decision.status_code != 403:
            return {400: "badRequest", 421: "misdirected", 503: "signalUnavailable"}.get(decision.status_code,
                                                                                     "refused")
        return _ERROR_NAMES[decision.error_code]
    if decision.result is DecisionResult.unauthenticated:
        return "signInRequired" if decision.status_code == 302 else "invalidToken"
    if decision.result is DecisionResult.allow:
        return "public" if not decision.policies else "granted"
    return "blocked"


_ERROR_NAMES = {
    ErrorCode.mfa_required: "mfaRequired",
    ErrorCode.device_not_compliant: "deviceNotCompliant",
    ErrorCode.app_not_approved: "appNotApproved",
    ErrorCode.blocked_by_conditional_access: "blockedByConditionalAccess",
    ErrorCode.blocked_due_to_risk: "blockedDueToRisk",
    ErrorCode.app_protection_required: "appProtectionRequired",
    ErrorCode.misdirected_request: "misdirected",
    ErrorCode.internal_error: "internalError",
    ErrorCode.insufficient_claims: "insufficientClaims",
}


class GatewayMetrics:
    """What operators graph and alert on. Counters are cheap enough for the request path
    (a dict lookup and a lock per label set)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self._children: dict[tuple[int, tuple[str, ...]], Counter] = {}
        self.decisions = Counter("portcullis_decisions", "Access decisions",
                                 ["result", "policy", "reason", "app"], registry=registry)
        self.policy_results = Counter("portcullis_policy_results", "Per-policy results of decisions (Entra's "
                                      "success, failure, notApplied, reportOnly*...)", ["policy", "result"],
                                      registry=registry)
        self.decision_seconds = Histogram("portcullis_decision_seconds", "Time to decide one request, "
                                          "including token validation and signal lookups",
                                          buckets=LATENCY_BUCKETS, registry=registry)
        self.upstream_errors = Counter("portcullis_upstream_errors", "Allowed requests whose upstream failed "
                                       "(connection refused, reset, timeout; not clients that hung up)", ["host"],
                                       registry=registry)
        self.reloads = Counter("portcullis_config_reloads", "Configuration reloads by outcome",
                               ["result", "trigger"], registry=registry)
        self.config_valid = Gauge("portcullis_config_last_reload_successful", "1 if the last reload "
                                  "attempt succeeded (the running rules are the files' rules), else 0",
                                  registry=registry)
        self.config_valid.set(1)
        self.log_dropped = Counter("portcullis_decision_log_dropped", "Decision log records dropped because "
                                   "the write queue was full", registry=registry)
        self.log_errors = Counter("portcullis_decision_log_write_errors", "Decision log records that could "
                                  "not be written", registry=registry)
        self.admin_requests = Counter("portcullis_admin_requests", "Admin API requests by action and outcome",
                                      ["action", "outcome"], registry=registry)

    def record_decision(self, decision: Decision, app_name: str | None) -> None:
        self._child(self.decisions, (decision.result.value, decision.failed_policy_id or "none",
                                     reason_label(decision), app_name or "unregistered")).inc()
        for result in decision.policies:
            self._child(self.policy_results, (result.name, result.result.value)).inc()

    def _child(self, metric: Counter, labels: tuple[str, ...]) -> Counter:
        """``metric.labels(*labels)``, kept: prometheus_client validates and locks on every call,
        and keeps every child anyway (the label values are the config's and fixed vocabularies)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def policy_hits(self) -> dict[str, dict[str, int]]:
        """Per policy, how many decisions had each result since start (the dashboard's table)."""
        hits: dict[str, dict[str, int]] = {}
        for family in self.policy_results.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    hits.setdefault(sample.labels["policy"], {})[sample.labels["result"]] = int(sample.value)
        return hits

    def watch(self, collector: Collector) -> None:
        """Add a collector whose values are read at scrape time (cache ratios, signal ages)."""
        self.registry.register(collector)


class CacheCollector:
    """Hit and miss counts of the caches, read from the caches themselves at scrape time."""

    def __init__(self, caches: Callable[[], Iterable[tuple[str, int, int]]]) -> None:
        self._caches = caches

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        hits = CounterMetricFamily("portcullis_cache_hits", "Cache hits", labels=["cache"])
        misses = CounterMetricFamily("portcullis_cache_misses", "Cache misses", labels=["cache"])
        ratio = GaugeMetricFamily("portcullis_cache_hit_ratio", "Hits / (hits + misses) since start",
                                  labels=["cache"])
        for name, hit_count, miss_count in self._caches():
            hits.add_metric([name], hit_count)
            misses.add_metric([name], miss_count)
            total = hit_count + miss_count
            ratio.add_metric([name], hit_count / total if total else 0.0)
        yield from (hits, misses, ratio)


class SignalAgeCollector:
    """Seconds since each signal source last answered; NaN for one that never did."""

    def __init__(self, ages: AgeSource) -> None:
        self._ages = ages

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("portcullis_signal_age_seconds", "Seconds since the signal source last "
                                   "delivered fresh data (JWKS fetch, inventory sync, MTD partner contact)",
                                   labels=["source"])
        for source, age in self._ages():
            family.add_metric([source], float("nan") if age is None else age)
        yield family
