"""Incremental (Delta) ADS: DeltaDiscoveryRequest in, DeltaDiscoveryResponse out.

* Subscriptions change with every request, even one carrying a stale nonce.
* The first request of a type may carry initial_resource_versions (a reconnect): only
  resources whose version differs are resent, and those the server no longer has are
  reported in removed_resources.
* Wildcard: a first request with no names (legacy) or an explicit "*". Unsubscribing a name
  that the wildcard still covers resends it (or reports it removed): the client cannot tell
  whether the wildcard includes it and waits for the server to say.
* A name subscribed that does not exist is reported once in removed_resources, except for
  EDS and RDS, which get an empty resource so that nothing stays warming.
"""

from __future__ import annotations

from typing import Any

from isthmus.xds.cache import ResourceSet
from isthmus.xds.resources import Resource, delta_response
from isthmus.xds.server.stream import Plan, Stream, TypeState, response_version


class DeltaStream(Stream):
    mode = "delta"

    def handle_request(self, request: Any) -> None:
        self._identify(request)
        state = self._state(request.type_url)
        sub, held = state.subscription, state.delivery
        subscribe = list(request.resource_names_subscribe)
        unsubscribe = list(request.resource_names_unsubscribe)
        self._check_names(len(subscribe) + len(unsubscribe) + len(request.initial_resource_versions))
        nonce = request.response_nonce
        if nonce and nonce == state.in_flight.nonce:
            if request.HasField("error_detail"):
                self._nack(state, nonce, request.error_detail)
            else:
                self._ack(state, state.status.last_sent_version, nonce)
        changed = False
        if not sub.started:
            sub.started = True
            changed = True
            sub.legacy_wildcard = not subscribe
            sub.wildcard = sub.legacy_wildcard
            self._check_names(len(held.known) + len(request.initial_resource_versions))
            held.known.update(dict(request.initial_resource_versions))
        for name in subscribe:
            if name == "*":
                sub.wildcard = True
            elif name not in sub.names:
                sub.names.add(name)
                changed = True
        for name in unsubscribe:
            if name == "*":
                sub.wildcard = False
                sub.legacy_wildcard = False
            elif sub.wildcard and name in sub.names and name in held.known:
                held.known[name] = ""  # not a version: resent if the wildcard has it, else removed
            elif not sub.wildcard:
                held.known.pop(name, None)
            sub.names.discard(name)
            held.missing_reported.discard(name)
            changed = True
        if changed or "*" in subscribe:
            state.resubscribed()
        if len(sub.names) > self.limits.max_resource_names:
            self._check_names(len(sub.names))

    def plan(self, state: TypeState, current: ResourceSet, allow_removals: bool) -> Plan | None:
        names = self.candidates(state, current)
        plan = (
            self._plan_all(state, current, allow_removals)
            if names is None
            else self._plan_names(state, current, names, allow_removals)
        )
        if state.delivery.deferred_removals:
            state.delivery.basis = ""  # the removals are found again by the next full plan
        else:
            self.planned(state, current)
        return plan

    def _plan_names(
        self, state: TypeState, current: ResourceSet, names: set[str], allow_removals: bool
    ) -> Plan | None:
        sub, held = state.subscription, state.delivery
        updated: list[Resource] = []
        gone: list[str] = []
        missing: list[str] = []
        for name in names:
            resource = self.desired_one(state, current, name)
            if resource is not None:
                if held.known.get(name) != resource.version:
                    updated.append(resource)
            elif name in held.known:
                gone.append(name)
            elif name in sub.names and name not in held.missing_reported:
                missing.append(name)
        if gone and not allow_removals:
            held.deferred_removals = True
            gone = []
        if not updated and not gone and not missing:
            return None
        for r in updated:
            held.known[r.name] = r.version
            held.missing_reported.discard(r.name)
        for name in gone:
            del held.known[name]
        held.missing_reported.update(missing)
        version = response_version(state, current)
        return Plan(updated, gone + missing, version, [r.name for r in updated])

    def _plan_all(self, state: TypeState, current: ResourceSet, allow_removals: bool) -> Plan | None:
        sub, held = state.subscription, state.delivery
        desired = self.desired(state, current)
        updated = [name for name, r in desired.items() if held.known.get(name) != r.version]
        gone = [name for name in held.known if name not in desired]
        missing = [
            n
            for n in sub.names
            if n not in desired and n not in held.known and n not in held.missing_reported
        ]
        if gone and not allow_removals:
            held.deferred_removals = True
            gone = []
        removed = gone + missing
        if not updated and not removed and (held.responded or not sub.wildcard):
            return None
        for name in updated:
            held.known[name] = desired[name].version
            held.missing_reported.discard(name)
        for name in gone:
            del held.known[name]
        held.missing_reported.update(missing)
        return Plan([desired[n] for n in updated], removed, response_version(state, current), updated)

    def encode(self, state: TypeState, plan: Plan, nonce: str) -> bytes:
        return delta_response(state.type_url, plan.version, nonce, plan.resources, plan.removed)
