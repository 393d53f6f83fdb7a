"""State-of-the-world ADS: DiscoveryRequest in, DiscoveryResponse out.

* A request whose response_nonce is not the latest nonce sent for its type is stale and ignored.
* A request with the latest nonce ACKs (or, with error_detail, NACKs) that response; if its
  resource_names differ from the subscription, the new names are answered at once.
* A bare ACK gets no response.
* CDS and LDS responses carry the full state; EDS, RDS and SDS responses carry only the
  requested resources that the client does not hold yet.
* Wildcard: a first request with no names (legacy) or an explicit "*". Legacy wildcard ends
  with the first request that names resources; an empty list after that means no resources.
"""

from __future__ import annotations

from typing import Any

from isthmus.xds import types
from isthmus.xds.cache import ResourceSet
from isthmus.xds.resources import Resource, sotw_response, state_version
from isthmus.xds.server.stream import Plan, Stream, TypeState, response_version


class SotwStream(Stream):
    mode = "sotw"

    def handle_request(self, request: Any) -> None:
        self._identify(request)
        state = self._state(request.type_url)
        names = list(request.resource_names)
        self._check_names(len(names))
        nonce = request.response_nonce
        if state.subscription.started and nonce != state.in_flight.last_nonce:
            return  # stale (or never sent): ignored, as the protocol says
        if nonce and state.in_flight.nonce == nonce:
            if request.HasField("error_detail"):
                self._nack(state, nonce, request.error_detail)
            else:
                self._ack(state, request.version_info, nonce)
        self._subscribe(state, names)

    def _subscribe(self, state: TypeState, names: list[str]) -> None:
        sub, held = state.subscription, state.delivery
        if not sub.started:
            sub.started = True
            sub.legacy_wildcard = not names
            state.resubscribed()
        elif names:
            sub.legacy_wildcard = False  # once resources are named, an empty list means none
        wildcard = "*" in names or (not names and sub.legacy_wildcard)
        new_names = set(names)
        new_names.discard("*")
        if wildcard != sub.wildcard or new_names != sub.names:
            sub.wildcard = wildcard
            sub.names = new_names
            if state.type_url not in types.FULL_STATE:
                # The client dropped what it no longer asks for; forget it so a re-subscription resends.
                for name in list(held.known):
                    if name not in new_names and not wildcard:
                        del held.known[name]
            state.resubscribed()

    def plan(self, state: TypeState, current: ResourceSet, allow_removals: bool) -> Plan | None:
        sub, held = state.subscription, state.delivery
        names = self.candidates(state, current)
        if names is not None and state.type_url not in types.FULL_STATE:
            return self._plan_names(state, current, names)
        if names is not None and sub.wildcard and not sub.names:
            # Full state from a successor set: every name is sent, but only candidates are compared.
            removed = [n for n in names if n not in current.by_name and n in held.known]
            if not removed or allow_removals:
                return self._plan_full_state(state, current, names, removed)
        plan = self._plan_all(state, current, allow_removals)
        if held.deferred_removals:
            held.basis = ""  # the removals are found again by the next full plan
        else:
            self.planned(state, current)
        return plan

    def _plan_names(self, state: TypeState, current: ResourceSet, names: set[str]) -> Plan | None:
        """EDS, RDS, SDS: send the candidates whose version the client does not hold."""
        updated: list[Resource] = []
        for name in names:
            resource = self.desired_one(state, current, name)
            if resource is not None and state.delivery.known.get(name) != resource.version:
                updated.append(resource)
        self.planned(state, current)
        if not updated:
            return None
        for r in updated:
            state.delivery.known[r.name] = r.version
        return Plan(updated, [], response_version(state, current), [r.name for r in updated])

    def _plan_full_state(
        self, state: TypeState, current: ResourceSet, names: set[str], removed: list[str]
    ) -> Plan | None:
        """CDS, LDS (wildcard): the whole set again, if any candidate changed for the client."""
        held = state.delivery
        updated = [
            n for n in names if n in current.by_name and held.known.get(n) != current.by_name[n].version
        ]
        self.planned(state, current)
        if not updated and not removed:
            return None
        for name in updated:
            held.known[name] = current.by_name[name].version
        for name in removed:
            del held.known[name]
        held.last_full = current.by_name
        return Plan(list(current.by_name.values()), [], current.version, updated)

    def _plan_all(self, state: TypeState, current: ResourceSet, allow_removals: bool) -> Plan | None:
        sub, held = state.subscription, state.delivery
        desired = self.desired(state, current)
        updated = [name for name, r in desired.items() if held.known.get(name) != r.version]
        if state.type_url in types.FULL_STATE:
            removed = [name for name in held.known if name not in desired]
            if not updated and not removed and held.responded:
                return None
            if removed and not allow_removals:
                held.deferred_removals = True
                if not updated and held.responded:
                    return None
                # Make-before-break: keep the resources being removed until additions are ACKed.
                kept = {n: held.last_full[n] for n in removed if n in held.last_full}
                sent = {**kept, **desired}
            else:
                sent = desired
            held.last_full = sent
            held.known = {name: r.version for name, r in sent.items()}
            resources = list(sent.values())
            return Plan(resources, [], state_version(resources), updated)
        if not updated and (held.responded or not sub.wildcard):
            return None
        for name in updated:
            held.known[name] = desired[name].version
        return Plan([desired[n] for n in updated], [], response_version(state, current), updated)

    def encode(self, state: TypeState, plan: Plan, nonce: str) -> bytes:
        return sotw_response(state.type_url, plan.version, nonce, plan.resources)
