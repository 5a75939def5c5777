"""ContinuousAccess: every flow the rules allowed is kept while it is open, whether or not its
decision used a device (a kiosk's never does). When a device's signals change (MTD webhook,
inventory sync, CLI), every open flow of that device is decided again, and its connection closed
if it is no longer allowed (so too every open flow whose decision read a user's app protection
registrations, when those change: flagged, removed): an ActiveSync Ping long-poll or a streamed
download does not outlive a risk raise. A reload of the rules decides again every flow still open two seconds after it
started, with a device or without: a tightening reload closes a kiosk's long request too.

A change can also land while a flow is being decided: after its decision read the device (or the
rules), before it is registered as open. ``DecisionsUnderWay`` (before AccessGate in the chain)
notes every flow from its first hook on, the changes heard meanwhile are kept with it, and a flow
registered with one that concerns it is decided again at once (after the grace, for a reload).

mitmproxy cannot kill a flow in transit (``Flow.kill`` only marks it), so the client connection
is closed through the proxyserver's connection handler (``mitm_internals.close_client_connection``).
"""

from __future__ import annotations

import asyncio
import logging
import time

from mitmproxy import http

from addons.flow_state import state
from addons.mitm_internals import close_client_connection
from addons.safety import fail_closed
from gateway.decision.service import AccessService
from gateway.events import RULES_RELOADED, AllDevicesChanged, AppRegistrationsChanged, ChangeEvent, RulesReloaded

logger = logging.getLogger(__name__)

RELOAD_GRACE_SECONDS = 2.0  # a request in flight this long when the rules change is decided again


class ContinuousAccess:
    def __init__(self, service: AccessService) -> None:
        self.service = service
        self.open_flows: set[http.HTTPFlow] = set()  # every allowed flow still open: a reload decides them again
        self.by_device: dict[str, set[http.HTTPFlow]] = {}  # those whose decision used a device
        self.by_app_user: dict[str, set[http.HTTPFlow]] = {}  # those whose decision read a user's app registrations
        self.deciding: dict[str, set[ChangeEvent]] = {}  # flow id -> changes heard while it was being decided
        self._tasks: set[asyncio.Task[None]] = set()
        service.subscribe(self.changed)

    @fail_closed
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        heard = self.deciding.pop(flow.id, set())
        flow_state = state(flow)
        if not flow_state.allowed or flow_state.access_request is None:
            return  # refused, or never decided by the rules (a destination the kiosk passes through)
        self.open_flows.add(flow)
        device_id = flow_state.device_id
        if device_id:
            self.by_device.setdefault(device_id, set()).add(flow)
        users = flow_state.app_users
        for user in users:
            self.by_app_user.setdefault(user, set()).add(flow)
        if (device_id and any(event.touches(device_id) for event in heard)) or \
                any(isinstance(event, AppRegistrationsChanged) and event.concerns(users) for event in heard):
            self._start(flow)  # its decision may have read the signals from before the change
        elif RULES_RELOADED in heard:
            self._decide_after_grace(flow, asyncio.get_running_loop(), time.time())

    @fail_closed
    def response(self, flow: http.HTTPFlow) -> None:
        self._forget(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.deciding.pop(flow.id, None)
        self._forget(flow)

    def changed(self, event: ChangeEvent) -> None:
        """A device change concerns the flows decided with that device; a reload, every open flow."""
        for heard in self.deciding.values():
            heard.add(event)
        if isinstance(event, RulesReloaded):
            self._rules_changed()
            return
        if isinstance(event, AppRegistrationsChanged):
            users = set(self.by_app_user) if event.every else event.users
            for flow in {f for user in users for f in self.by_app_user.get(user, ())}:
                self._start(flow)
            return
        device_ids = set(self.by_device) if isinstance(event, AllDevicesChanged) else event.device_ids
        for device_id in device_ids:
            for flow in list(self.by_device.get(device_id, ())):
                self._start(flow)

    def _rules_changed(self) -> None:
        """A reload: short requests in flight finish under the rules they started with; a flow
        still open ``RELOAD_GRACE_SECONDS`` after it started is decided again."""
        loop = asyncio.get_running_loop()
        now = time.time()
        for flow in list(self.open_flows):
            self._decide_after_grace(flow, loop, now)

    def _decide_after_grace(self, flow: http.HTTPFlow, loop: asyncio.AbstractEventLoop, now: float) -> None:
        delay = max(0.0, RELOAD_GRACE_SECONDS - (now - flow.request.timestamp_start))
        loop.call_later(delay, self._start_if_open, flow)

    def _start_if_open(self, flow: http.HTTPFlow) -> None:
        if flow in self.open_flows:
            self._start(flow)

    def _start(self, flow: http.HTTPFlow) -> None:
        task = asyncio.get_running_loop().create_task(self._decide_again(flow))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _decide_again(self, flow: http.HTTPFlow) -> None:
        flow_state = state(flow)
        try:
            if flow_state.access_request is None:
                raise LookupError("no access request kept to decide again")  # only allowed flows are registered
            outcome = await self.service.decide_again(flow_state.access_request, flow_state.authorization,
                                                      flow_state.cookies)
            allowed = outcome.forward
        except Exception:  # an edge: a failed re-decision closes the flow
            logger.exception("[%s] re-evaluation failed; closing", flow_state.correlation_id)
            allowed = False
        if not allowed:
            logger.info("[%s] device signals or rules changed: access withdrawn, closing the connection",
                        flow_state.correlation_id)
            close_client(flow)
            self._forget(flow)

    def _forget(self, flow: http.HTTPFlow) -> None:
        self.open_flows.discard(flow)
        device_id = state(flow).device_id
        flows = self.by_device.get(device_id) if device_id else None
        if device_id and flows is not None:
            flows.discard(flow)
            if not flows:
                del self.by_device[device_id]
        for user in state(flow).app_users:
            flows = self.by_app_user.get(user)
            if flows is not None:
                flows.discard(flow)
                if not flows:
                    del self.by_app_user[user]


class DecisionsUnderWay:
    """Runs before AccessGate: from here on, ContinuousAccess keeps the changes heard while this
    flow is decided (it takes them when it registers the flow, after AccessGate)."""

    def __init__(self, continuous: ContinuousAccess) -> None:
        self.continuous = continuous

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.continuous.deciding[flow.id] = set()


def close_client(flow: http.HTTPFlow) -> None:
    if flow.killable:
        flow.kill()
    close_client_connection(flow.client_conn)
