"""FakeKubeApi: an in-process Kubernetes API server (aiohttp) with kube-apiserver's REST and watch semantics.

One instance is one member cluster; several run at once on different ports and share nothing. Tests
change the cluster through the Python API (``create``/``update``/``apply``/``delete``; plain dicts in
Kubernetes JSON form) and inject faults at runtime (``stop``/``start``, ``hang``, ``fail_with``,
``slow``, ``drop_watches``, ``rotate_token``, ``forbid``, ``throttle``, ``compact``,
``set_installed``). Clients
only read over HTTP: GET (get, list, watch) and discovery; other methods get 405 MethodNotAllowed,
but for one write: ``POST /apis/authentication.k8s.io/v1/tokenreviews``, answered (201) as
kube-apiserver does for the service-account tokens ``issue_token`` made (audiences, expiry, a
pod-bound token's pod and its ``extra``), with its refusals' wording for the others.

Semantics, as kube-apiserver with its watch cache behaves:

* resourceVersion: one counter per server across all kinds (etcd's revision), bumped by every
  write, a string of an int. A write that changes nothing (``update`` with an identical object) is
  a no-op: no new resourceVersion, no event. ``metadata.uid``/``creationTimestamp`` are set on
  create and kept on update; an ``update`` whose ``metadata.resourceVersion`` is set and stale
  raises a 409 Conflict.
* List: ``{"kind": "<Kind>List", "apiVersion", "metadata": {"resourceVersion"}, "items"}``; items
  sorted by namespace/name (etcd key order); items of built-in kinds carry no ``kind``/``apiVersion``
  (as on the wire from a real server), custom resources keep theirs. ``labelSelector``: ``k=v``,
  ``k==v``, ``k!=v``, ``k``, ``!k``, ``k in (a,b)``, ``k notin (a,b)``, ``k>n``, ``k<n``.
  ``fieldSelector``: ``metadata.name``, ``metadata.namespace`` (``=``, ``==``, ``!=``) and a few
  per-kind fields (pods ``spec.nodeName``/``status.phase``..., secrets ``type``); anything else is
  400 ``field label not supported``. resourceVersion: unset/"0"/NotOlderThan serve the current state
  (an RV ahead of the server waits ``too_large_rv_wait`` then 504 "Too large resource version");
  ``resourceVersionMatch=Exact`` serves the state at that RV, rebuilt from the history, or 410
  Expired if it was compacted. ``limit``/``continue`` are implemented: pages of one consistent
  snapshot; a continue token older than the history is 410 Expired.
* Watch (``watch=1|true``, also on a single object's path): ``200``, chunked, one JSON event per
  line. resourceVersion unset or "0": synthetic ADDED for every current matching object (key
  order), then changes, exactly what kube-apiserver does when ``sendInitialEvents`` is not set
  (both cases; a real server may pick a slightly older cache state for "0", this one uses the
  newest). resourceVersion X: every retained event with RV > X, then live changes. X older than the
  kind's retained history: 200, then one ``ERROR`` event whose object is the Status
  ``too old resource version: X (Y)``, reason Expired, code 410 (Y = oldest RV still servable),
  then the stream ends. With a label/field selector an object that stops matching is sent as
  DELETED, one that starts matching as ADDED (the cacher's rule). DELETED carries the object's last
  state with the deletion's resourceVersion. ``allowWatchBookmarks=true``: a BOOKMARK every
  ``bookmark_interval`` seconds while the stream is idle, object ``{"kind", "apiVersion",
  "metadata": {"resourceVersion": <server's current RV>}}`` (every event up to that RV has been
  sent). ``sendInitialEvents=true`` (watch-list): initial ADDED events then a BOOKMARK annotated
  ``k8s.io/initial-events-end: "true"``. ``timeoutSeconds``: the server ends the stream cleanly
  (terminating chunk) after that time; without it the stream lasts ``default_watch_timeout``
  (None = forever; a real server picks 30-60 min). Open watches are not affected by token rotation.
* History (the watch cache window): each kind keeps its last ``history`` events; ``compact()``
  drops all of them (every older RV becomes 410). A restart (``stop`` then ``start``) drops the
  history too unless ``keep_history_on_restart`` (a real apiserver rebuilds its watch cache from a
  fresh list, so resuming from an RV older than the restart gets 410); objects and the RV counter
  survive (they live in etcd).
* Errors are ``Status`` bodies (``kind: Status``, ``status: Failure``, ``reason``, ``code``): 401
  Unauthorized without a valid bearer token (no anonymous access, as with
  ``--anonymous-auth=false``; checked before everything but faults), 403 Forbidden for a kind
  passed to ``forbid``, 404 for unknown paths ("the server could not find the requested
  resource"), a plain-text ``404 page not found`` under a group/version nobody serves (a CRD not
  installed), 429 TooManyRequests with Retry-After for a kind passed to
  ``throttle`` (a real server's "storage is (re)initializing"), 404 NotFound ``services "x" not
  found`` for a missing object.
* A CRD (serviceexports; trafficsplits, httproutes, grpcroutes, authorizationpolicies,
  traffictargets, httproutegroups and tcproutes are not installed until ``set_installed``) can be
  not installed: its paths 404, its group is absent from ``/apis``.
  Uninstalling at runtime deletes its objects (DELETED events), then ends its open watches cleanly.

Not faithful (on purpose or not needed): no TLS, no protobuf, no aggregated discovery (v2), no
write verbs over HTTP, no namespace lifecycle (objects may live in namespaces that do not exist,
deleting a namespace deletes nothing), no graceful deletion, no ``generateName``, no subresources,
no legacy ``/api/v1/watch/...`` paths, bookmarks far more often than the real ~1/min.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime
import json
import re
import secrets
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Obj = dict[str, Any]

DEFAULT_TOKEN = "test-token"
USER = "system:serviceaccount:isthmus-system:isthmus"


@dataclass(frozen=True, slots=True)
class ResourceType:
    """One served resource (a kind) and where it lives in the URL space."""

    group: str
    version: str
    plural: str
    singular: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    crd: bool = False
    # Extra fieldSelector fields (beyond metadata.name/namespace) this kind supports.
    fields: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def group_resource(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


RESOURCES: tuple[ResourceType, ...] = (
    ResourceType("", "v1", "namespaces", "namespace", "Namespace", False, ("ns",), fields=("status.phase",)),
    ResourceType("", "v1", "nodes", "node", "Node", False, ("no",), fields=("spec.unschedulable",)),
    ResourceType("", "v1", "services", "service", "Service", True, ("svc",)),
    ResourceType(
        "",
        "v1",
        "pods",
        "pod",
        "Pod",
        True,
        ("po",),
        fields=(
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ),
    ),
    ResourceType("", "v1", "secrets", "secret", "Secret", True, fields=("type",)),
    ResourceType("", "v1", "serviceaccounts", "serviceaccount", "ServiceAccount", True, ("sa",)),
    ResourceType("discovery.k8s.io", "v1", "endpointslices", "endpointslice", "EndpointSlice", True),
    ResourceType(
        "multicluster.x-k8s.io",
        "v1alpha1",
        "serviceexports",
        "serviceexport",
        "ServiceExport",
        True,
        ("svcex",),
        crd=True,
    ),
    ResourceType(
        "split.smi-spec.io", "v1alpha2", "trafficsplits", "trafficsplit", "TrafficSplit", True, crd=True
    ),
    ResourceType("gateway.networking.k8s.io", "v1", "httproutes", "httproute", "HTTPRoute", True, crd=True),
    ResourceType("gateway.networking.k8s.io", "v1", "grpcroutes", "grpcroute", "GRPCRoute", True, crd=True),
    ResourceType(
        "isthmus.io",
        "v1alpha1",
        "authorizationpolicies",
        "authorizationpolicy",
        "AuthorizationPolicy",
        True,
        crd=True,
    ),
    ResourceType(
        "access.smi-spec.io", "v1alpha3", "traffictargets", "traffictarget", "TrafficTarget", True, crd=True
    ),
    ResourceType(
        "specs.smi-spec.io", "v1alpha4", "httproutegroups", "httproutegroup", "HTTPRouteGroup", True, crd=True
    ),
    ResourceType("specs.smi-spec.io", "v1alpha4", "tcproutes", "tcproute", "TCPRoute", True, crd=True),
)


class KubeApiError(Exception):
    """A failure with its Kubernetes Status (raised by the Python API, served as a Status body)."""

    def __init__(self, code: int, reason: str, message: str, details: Mapping[str, Any] | None = None):
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.details = dict(details) if details else None

    def status(self) -> Obj:
        return status_body(self.code, self.reason, self.message, self.details)


_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def status_body(code: int, reason: str | None, message: str, details: Mapping[str, Any] | None = None) -> Obj:
    """A ``v1.Status`` failure as kube-apiserver serializes it."""
    body: Obj = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
    }
    reason = _REASONS.get(code, "") if reason is None else reason
    if reason:
        body["reason"] = reason
    if details:
        body["details"] = dict(details)
    body["code"] = code
    return body


# ---------------------------------------------------------------------------------------------------
# Selectors


_KEY_RE = r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?/)?[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?"
_VALUE_RE = r"(?:(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?)"
_SET_TERM = re.compile(rf"^({_KEY_RE})\s+(in|notin)\s*\((.*)\)$")
_EQ_TERM = re.compile(rf"^({_KEY_RE})\s*(==|=|!=)\s*({_VALUE_RE})$")
_CMP_TERM = re.compile(rf"^({_KEY_RE})\s*(<|>)\s*(-?[0-9]+)$")
_KEY_ONLY = re.compile(rf"^({_KEY_RE})$")
_VALUE_ONLY = re.compile(rf"^{_VALUE_RE}$")


@dataclass(frozen=True, slots=True)
class Requirement:
    """One label selector requirement (``op``: =, !=, in, notin, exists, !, gt, lt)."""

    key: str
    op: str
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op in ("=", "in"):
            return present and value in self.values
        if self.op in ("!=", "notin"):
            return not present or value not in self.values
        if self.op == "exists":
            return present
        if self.op == "!":
            return not present
        if not present:
            return False
        try:
            number = int(value or "")
        except ValueError:
            return False
        bound = int(self.values[0])
        return number > bound if self.op == "gt" else number < bound


def _split_top_level(text: str) -> list[str]:
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_label_selector(text: str) -> list[Requirement]:
    """Parse a label selector string; raises KubeApiError(400) when it does not parse."""
    if not text.strip():
        return []
    out: list[Requirement] = []
    for raw in _split_top_level(text):
        term = raw.strip()
        if term.startswith("!") and _KEY_ONLY.match(term[1:].strip()):
            out.append(Requirement(term[1:].strip(), "!"))
        elif match := _SET_TERM.match(term):
            values = tuple(v.strip() for v in match.group(3).split(","))
            if not all(_VALUE_ONLY.match(v) for v in values):
                raise _bad_selector(text)
            out.append(Requirement(match.group(1), match.group(2), values))
        elif match := _EQ_TERM.match(term):
            op = "!=" if match.group(2) == "!=" else "="
            out.append(Requirement(match.group(1), op, (match.group(3),)))
        elif match := _CMP_TERM.match(term):
            out.append(
                Requirement(match.group(1), "gt" if match.group(2) == ">" else "lt", (match.group(3),))
            )
        elif _KEY_ONLY.match(term):
            out.append(Requirement(term, "exists"))
        else:
            raise _bad_selector(text)
    return out


def _bad_selector(text: str) -> KubeApiError:
    return KubeApiError(400, "BadRequest", f"unable to parse requirement: invalid label selector {text!r}")


@dataclass(frozen=True, slots=True)
class FieldRequirement:
    """One field selector term: ``path`` (dotted) ``=``/``!=`` value."""

    path: str
    negate: bool
    value: str

    def matches(self, obj: Mapping[str, Any]) -> bool:
        return (_field_value(obj, self.path) == self.value) != self.negate


def _field_value(obj: Mapping[str, Any], path: str) -> str:
    current: Any = obj
    for part in path.split("."):
        current = current.get(part) if isinstance(current, Mapping) else None
    if isinstance(current, bool):
        return "true" if current else "false"
    if current is None:
        return "false" if path in ("spec.unschedulable", "spec.hostNetwork") else ""
    return str(current)


def parse_field_selector(text: str, rtype: ResourceType) -> list[FieldRequirement]:
    """Parse a field selector for ``rtype``; raises KubeApiError(400) for unsupported fields."""
    if not text.strip():
        return []
    out: list[FieldRequirement] = []
    for raw in text.split(","):
        term = raw.strip()
        match = re.match(r"^([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*)$", term)
        if not match:
            raise KubeApiError(400, "BadRequest", f"invalid selector: {text!r}; can't understand {term!r}")
        path, op, value = match.groups()
        if path not in ("metadata.name", "metadata.namespace", *rtype.fields):
            raise KubeApiError(400, "BadRequest", f"field label not supported: {path}")
        out.append(FieldRequirement(path, op == "!=", value))
    return out


# ---------------------------------------------------------------------------------------------------
# Events and watchers

Key = tuple[str, str]  # (namespace or "", name)

_ABORT = "abort"
_CLOSE = "close"


@dataclass(frozen=True, slots=True)
class _Event:
    rv: int
    type: str  # ADDED | MODIFIED | DELETED
    key: Key
    obj: Obj  # the new state; for DELETED the last state carrying the deletion's RV
    prev: Obj | None  # the state before (None for ADDED)


@dataclass(eq=False, slots=True)
class _Watcher:
    rtype: ResourceType
    namespace: str | None
    labels: list[Requirement]
    fields: list[FieldRequirement]
    pending: deque[Any] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def matches(self, obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        labels = meta.get("labels") or {}
        return all(r.matches(labels) for r in self.labels) and all(f.matches(obj) for f in self.fields)

    def translate(self, event: _Event) -> tuple[str, Obj] | None:
        """The event this watcher sees (selector transitions become ADDED/DELETED), or None."""
        was = event.prev is not None and self.matches(event.prev)
        if event.type == "DELETED":
            return ("DELETED", event.obj) if was else None
        now = self.matches(event.obj)
        if now and was:
            return ("MODIFIED", event.obj)
        if now:
            return ("ADDED", event.obj)
        if was:
            return ("DELETED", event.obj)
        return None

    def push(self, item: Any) -> None:
        self.pending.append(item)
        self.wake.set()


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request the server received (for assertions)."""

    method: str
    path: str
    query: Mapping[str, str]
    authorized: bool

    @property
    def watch(self) -> bool:
        return _parse_bool(self.query.get("watch"))


def _parse_bool(value: str | None) -> bool:
    return value in ("1", "t", "T", "true", "TRUE", "True")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dumps(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------------------------------
# The server


@dataclass(frozen=True)
class IssuedToken:
    namespace: str
    service_account: str
    audiences: tuple[str, ...]
    expiry: float
    pod: tuple[str, str] | None  # (name, uid) of a pod-bound token


class FakeKubeApi:
    """A Kubernetes API server for tests. See the module docstring for the semantics."""

    def __init__(
        self,
        *,
        tokens: Iterable[str] = (DEFAULT_TOKEN,),
        host: str = "127.0.0.1",
        port: int = 0,
        serviceexports_installed: bool = True,
        history: int = 1000,
        bookmark_interval: float = 1.0,
        default_watch_timeout: float | None = None,
        too_large_rv_wait: float = 0.5,
        keep_history_on_restart: bool = False,
        start_resource_version: int = 1,
        git_version: str = "v1.31.0",
        resources: Iterable[ResourceType] = RESOURCES,
    ) -> None:
        self._tokens = set(tokens)
        self._host = host
        self._port = port
        self.history = history
        self.bookmark_interval = bookmark_interval
        self.default_watch_timeout = default_watch_timeout
        self.too_large_rv_wait = too_large_rv_wait
        self.keep_history_on_restart = keep_history_on_restart
        self.git_version = git_version
        self._types = {r.plural: r for r in resources}
        # CRDs: ServiceExport as asked; TrafficSplit, HTTPRoute and GRPCRoute absent until
        # set_installed (as on most clusters).
        self._installed = {
            r.plural: (serviceexports_installed if r.plural == "serviceexports" else False) if r.crd else True
            for r in resources
        }
        self._rv = start_resource_version
        self._store: dict[str, dict[Key, Obj]] = {p: {} for p in self._types}
        self._logs: dict[str, deque[_Event]] = {p: deque() for p in self._types}
        self._floor: dict[str, int] = dict.fromkeys(self._types, 0)
        self._watchers: set[_Watcher] = set()
        self._forbidden: set[str] = set()
        self._issued: dict[str, IssuedToken] = {}  # service-account tokens TokenReviews know
        self.token_reviews = 0
        self._throttled: dict[str, tuple[float, int]] = {}  # plural ("*": all) -> (until, Retry-After)
        self._fail: tuple[int, str] | None = None
        self._delay = 0.0
        self._running = asyncio.Event()  # cleared while hung
        self._running.set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runner: web.ServerRunner | None = None
        self._started_once = False
        self.requests: list[RequestRecord] = []

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> str:
        """Listen (port 0 = a free port, then the same port on every restart); return the base URL.

        Objects and the RV counter survive a restart; the watch history does not (unless
        ``keep_history_on_restart``); fault switches (hang, fail_with, slow, forbid, tokens) stay as set.
        """
        if self._runner is not None:
            return self.url
        if self._started_once and not self.keep_history_on_restart:
            self.compact()
        server = web.Server(self._handle, access_log=None)
        runner = web.ServerRunner(server, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._port = runner.addresses[0][1]
        self._runner = runner
        self._started_once = True
        return self.url

    async def stop(self) -> None:
        """Go down like a killed process: every connection reset, new connections refused."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        for watcher in list(self._watchers):
            watcher.push(_ABORT)
        if runner.server is not None:
            for handler in runner.server.connections:
                if handler.transport is not None:
                    handler.transport.abort()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        await runner.cleanup()
        self._watchers.clear()

    async def __aenter__(self) -> FakeKubeApi:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    @property
    def running(self) -> bool:
        return self._runner is not None

    @property
    def token(self) -> str:
        """One valid token (any of them, when several are valid)."""
        return sorted(self._tokens)[0]

    @property
    def resource_version(self) -> str:
        """The server's current resourceVersion (the last write's)."""
        return str(self._rv)

    @property
    def open_watches(self) -> int:
        """How many watch streams are open now."""
        return len(self._watchers)

    def watch_count(self, plural: str) -> int:
        return sum(1 for w in self._watchers if w.rtype.plural == plural)

    # -- auth and faults -----------------------------------------------------------------------------

    def rotate_token(self, new: str) -> None:
        """``new`` becomes the only valid token; the old ones get 401 (open watches stay open)."""
        self._tokens = {new}

    def add_token(self, token: str) -> None:
        self._tokens.add(token)

    def issue_token(
        self,
        namespace: str,
        service_account: str,
        audiences: Iterable[str] = ("isthmus",),
        seconds: float = 3600.0,
        pod: tuple[str, str] | None = None,
    ) -> str:
        """A service-account token this server's TokenReviews know (as from the TokenRequest API):
        for ``audiences``, valid ``seconds``, bound to ``pod`` (name, uid) if given. Not a bearer
        token for this server's own API. A JWT in form (claims readable, signature not real)."""
        expiry = time.time() + seconds
        claims = {
            "iss": "fake",
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
            "exp": int(expiry),
        }
        payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
        token = f"eyJhbGciOiJSUzI1NiJ9.{payload}.{secrets.token_urlsafe(16)}"
        self._issued[token] = IssuedToken(namespace, service_account, tuple(audiences), expiry, pod)
        return token

    def _token_review(self, body: Any) -> Obj:
        """The answer of kube-apiserver's TokenReview (authentication.k8s.io/v1), in its shape."""
        spec = body.get("spec") if isinstance(body, dict) else None
        if not isinstance(spec, dict) or not spec.get("token"):
            raise KubeApiError(
                400, "BadRequest", "TokenReview.authentication.k8s.io is invalid: spec.token: Required value"
            )
        wanted = list(spec.get("audiences") or ["https://kubernetes.default.svc"])
        issued = self._issued.get(str(spec["token"]))
        status: Obj = {"user": {}}  # a refusal: no "authenticated" (false is omitted), an error
        if issued is None or issued.expiry < time.time():
            status["error"] = (
                "[invalid bearer token, service account token has expired]"
                if issued
                else "[invalid bearer token]"
            )
        elif not set(issued.audiences) & set(wanted):
            status["error"] = (
                f"[invalid bearer token, token audiences {json.dumps(list(issued.audiences))} is invalid for "
                f"the target audiences {json.dumps(wanted)}]"
            )
        elif issued.pod is not None and not any(
            (o.get("metadata") or {}).get("uid") == issued.pod[1]
            for o in self._store["pods"].values()
            if (o.get("metadata") or {}).get("name") == issued.pod[0]
        ):
            status["error"] = f'[invalid bearer token, pod "{issued.pod[0]}" not found]'
        else:
            extra: dict[str, list[str]] = {}
            if issued.pod is not None:
                extra = {
                    "authentication.kubernetes.io/pod-name": [issued.pod[0]],
                    "authentication.kubernetes.io/pod-uid": [issued.pod[1]],
                }
            status = {
                "authenticated": True,
                "user": {
                    "username": f"system:serviceaccount:{issued.namespace}:{issued.service_account}",
                    "uid": str(
                        uuid.uuid5(uuid.NAMESPACE_URL, f"{issued.namespace}/{issued.service_account}")
                    ),
                    "groups": [
                        "system:serviceaccounts",
                        f"system:serviceaccounts:{issued.namespace}",
                        "system:authenticated",
                    ],
                    **({"extra": extra} if extra else {}),
                },
                "audiences": sorted(set(issued.audiences) & set(wanted)),
            }
        return {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": {"token": spec["token"], "audiences": wanted},
            "status": status,
        }

    def forbid(self, plural: str) -> None:
        """Every request on this resource (by plural; also "tokenreviews") gets 403 Forbidden."""
        self._forbidden.add(plural if plural == "tokenreviews" else self._resolve(plural).plural)

    def allow(self, plural: str) -> None:
        self._forbidden.discard(plural if plural == "tokenreviews" else self._resolve(plural).plural)

    def throttle(self, plural: str = "*", seconds: float = 5.0, retry_after: int = 1) -> None:
        """For ``seconds`` from now, answer every GET of this kind ("*": every kind) with 429
        TooManyRequests "storage is (re)initializing" and ``Retry-After``, as a real kube-apiserver
        does for a CRD just installed and for every kind right after a restart (0 s: stop)."""
        key = "*" if plural == "*" else self._resolve(plural).plural
        loop = asyncio.get_running_loop()
        self._throttled[key] = (loop.time() + seconds, retry_after)

    def _throttle_of(self, plural: str) -> int | None:
        now = asyncio.get_running_loop().time()
        for key in (plural, "*"):
            until, retry_after = self._throttled.get(key, (0.0, 0))
            if now < until:
                return retry_after
        return None

    def hang(self, on: bool = True) -> None:
        """Accept connections but answer nothing; open watches freeze (no events, no bookmarks, no
        timeout) until ``hang(False)``, then everything held resumes."""
        if on:
            self._running.clear()
        else:
            self._running.set()

    def fail_with(self, code: int | None, message: str | None = None) -> None:
        """Every new request gets HTTP ``code`` with a Status body (None: stop failing). Open watches
        are not affected."""
        self._fail = None if code is None else (code, message or f"injected failure ({code})")

    def slow(self, seconds: float) -> None:
        """Delay every response (the headers of a watch) by ``seconds`` (0: no delay)."""
        self._delay = seconds

    def drop_watches(self, abrupt: bool = True) -> int:
        """End every open watch: abruptly (connection reset mid-stream, no terminating chunk) or, with
        ``abrupt=False``, cleanly (as a server-side timeout does). Returns how many were open."""
        watchers = list(self._watchers)
        for watcher in watchers:
            watcher.push(_ABORT if abrupt else _CLOSE)
        return len(watchers)

    def compact(self) -> None:
        """Drop all watch history: every RV older than the current one is now 410 Expired."""
        for plural, log in self._logs.items():
            log.clear()
            self._floor[plural] = self._rv

    def set_installed(self, plural: str, installed: bool) -> None:
        """Install or remove a CRD. Removing deletes its objects (DELETED events) then ends its open
        watches cleanly; afterwards its paths 404 and its group leaves discovery."""
        rtype = self._resolve(plural)
        if not rtype.crd:
            raise ValueError(f"{rtype.plural} is not a CRD")
        if installed == self._installed[rtype.plural]:
            return
        if installed:
            self._installed[rtype.plural] = True
            self._logs[rtype.plural].clear()
            self._floor[rtype.plural] = self._rv
            return
        for namespace, name in sorted(self._store[rtype.plural]):
            self.delete(rtype.plural, namespace or None, name)
        for watcher in list(self._watchers):
            if watcher.rtype is rtype:
                watcher.push(_CLOSE)
        self._installed[rtype.plural] = False

    def installed(self, plural: str) -> bool:
        return self._installed[self._resolve(plural).plural]

    # -- the object API -------------------------------------------------------------------------------

    def create(self, obj: Mapping[str, Any]) -> Obj:
        """Create ``obj`` (needs apiVersion, kind, metadata.name; namespace defaults to "default")."""
        rtype = self._type_of(obj)
        new = copy.deepcopy(dict(obj))
        meta = new.setdefault("metadata", {})
        key = self._key_of(rtype, meta)
        if key in self._store[rtype.plural]:
            raise KubeApiError(
                409,
                "AlreadyExists",
                f'{rtype.group_resource} "{key[1]}" already exists',
                self._details(rtype, key),
            )
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        self._store[rtype.plural][key] = new
        self._record(rtype, "ADDED", key, new, None)
        return copy.deepcopy(new)

    def update(self, obj: Mapping[str, Any]) -> Obj:
        """Replace an existing object. A set, stale ``metadata.resourceVersion`` is a 409 Conflict;
        an update that changes nothing is a no-op (no RV bump, no event), as in kube-apiserver."""
        rtype = self._type_of(obj)
        new = copy.deepcopy(dict(obj))
        meta = new.setdefault("metadata", {})
        key = self._key_of(rtype, meta)
        old = self._store[rtype.plural].get(key)
        if old is None:
            raise self._not_found(rtype, key)
        given = meta.get("resourceVersion")
        if given and given != old["metadata"]["resourceVersion"]:
            raise KubeApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {rtype.group_resource} "{key[1]}": the object has been '
                "modified; please apply your changes to the latest version and try again",
                self._details(rtype, key),
            )
        for kept in ("uid", "creationTimestamp", "resourceVersion"):
            meta[kept] = old["metadata"][kept]
        if new == old:
            return copy.deepcopy(old)
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        self._store[rtype.plural][key] = new
        self._record(rtype, "MODIFIED", key, new, old)
        return copy.deepcopy(new)

    def apply(self, obj: Mapping[str, Any]) -> Obj:
        """Create or update (ignoring any resourceVersion in ``obj``)."""
        rtype = self._type_of(obj)
        key = self._key_of(rtype, dict(obj.get("metadata") or {}))
        if key not in self._store[rtype.plural]:
            return self.create(obj)
        new = copy.deepcopy(dict(obj))
        new.setdefault("metadata", {}).pop("resourceVersion", None)
        return self.update(new)

    def delete(self, kind: str, namespace: str | None, name: str) -> Obj:
        """Delete by kind (plural, Kind, short name or ``apiVersion/Kind``), namespace, name; returns the
        last state (with the deletion's resourceVersion, as in the DELETED event)."""
        rtype = self._resolve(kind)
        self._check_installed(rtype)
        key = (namespace or "" if rtype.namespaced else "", name)
        old = self._store[rtype.plural].pop(key, None)
        if old is None:
            raise self._not_found(rtype, key)
        self._rv += 1
        last = copy.deepcopy(old)
        last["metadata"]["resourceVersion"] = str(self._rv)
        self._record(rtype, "DELETED", key, last, old)
        return copy.deepcopy(last)

    def get(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        rtype = self._resolve(kind)
        obj = self._store[rtype.plural].get((namespace or "" if rtype.namespaced else "", name))
        return copy.deepcopy(obj) if obj is not None else None

    def objects(self, kind: str) -> list[Obj]:
        rtype = self._resolve(kind)
        return [copy.deepcopy(self._store[rtype.plural][k]) for k in sorted(self._store[rtype.plural])]

    # -- internals: types, keys, history ----------------------------------------------------------------

    def _resolve(self, kind: str) -> ResourceType:
        api_version, _, name = kind.rpartition("/")
        lowered = name.lower()
        for rtype in self._types.values():
            if api_version and api_version != rtype.api_version:
                continue
            if lowered in (
                rtype.plural,
                rtype.singular,
                rtype.kind.lower(),
                rtype.group_resource,
                *rtype.short_names,
            ):
                return rtype
        raise ValueError(f"unknown resource {kind!r}")

    def _type_of(self, obj: Mapping[str, Any]) -> ResourceType:
        api_version, kind = obj.get("apiVersion"), obj.get("kind")
        if not api_version or not kind:
            raise ValueError("object needs apiVersion and kind")
        rtype = self._resolve(f"{api_version}/{kind}")
        self._check_installed(rtype)
        return rtype

    def _check_installed(self, rtype: ResourceType) -> None:
        if not self._installed[rtype.plural]:
            raise KubeApiError(404, "NotFound", "the server could not find the requested resource")

    @staticmethod
    def _key_of(rtype: ResourceType, meta: dict[str, Any]) -> Key:
        name = meta.get("name")
        if not name:
            raise ValueError("object needs metadata.name")
        if rtype.namespaced:
            meta["namespace"] = meta.get("namespace") or "default"
            return (meta["namespace"], name)
        meta.pop("namespace", None)
        return ("", name)

    @staticmethod
    def _details(rtype: ResourceType, key: Key) -> dict[str, Any]:
        details: dict[str, Any] = {"name": key[1], "kind": rtype.plural}
        if rtype.group:
            details["group"] = rtype.group
        return details

    def _not_found(self, rtype: ResourceType, key: Key) -> KubeApiError:
        return KubeApiError(
            404, "NotFound", f'{rtype.group_resource} "{key[1]}" not found', self._details(rtype, key)
        )

    def _record(self, rtype: ResourceType, etype: str, key: Key, obj: Obj, prev: Obj | None) -> None:
        event = _Event(self._rv, etype, key, obj, prev)
        log = self._logs[rtype.plural]
        log.append(event)
        while len(log) > self.history:
            dropped = log.popleft()
            self._floor[rtype.plural] = log[0].rv - 1 if log else dropped.rv
        for watcher in list(self._watchers):
            if watcher.rtype is rtype and (translated := watcher.translate(event)) is not None:
                watcher.push(translated)

    def _snapshot(self, rtype: ResourceType, rv: int) -> dict[Key, Obj]:
        """The objects of ``rtype`` as they were at ``rv`` (caller checked rv >= floor)."""
        state = dict(self._store[rtype.plural])
        for event in reversed(self._logs[rtype.plural]):
            if event.rv <= rv:
                break
            if event.prev is None:
                state.pop(event.key, None)
            else:
                state[event.key] = event.prev
        return state

    def _expired(self, rtype: ResourceType, rv: int) -> bool:
        return rv < self._floor[rtype.plural]

    # -- HTTP ----------------------------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            return await self._serve(request)
        except KubeApiError as err:
            return self._status_response(err.status())
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _serve(self, request: web.BaseRequest) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        token = header[len("Bearer ") :].strip() if header.startswith("Bearer ") else None
        authorized = token is not None and token in self._tokens
        self.requests.append(RequestRecord(request.method, request.path, dict(request.query), authorized))
        await self._running.wait()
        if self._delay:
            await asyncio.sleep(self._delay)
            await self._running.wait()
        if self._fail is not None:
            code, message = self._fail
            return self._status_response(status_body(code, None, message))
        # Authentication is decided when the request is served (a token rotated meanwhile counts).
        token_ok = token is not None and token in self._tokens
        if not token_ok:
            return self._status_response(status_body(401, "Unauthorized", "Unauthorized"))
        return await self._route(request)

    @staticmethod
    def _status_response(body: Obj, headers: Mapping[str, str] | None = None) -> web.Response:
        return web.Response(
            status=body["code"], body=_dumps(body), content_type="application/json", headers=headers
        )

    @staticmethod
    def _json(data: Any) -> web.Response:
        return web.Response(status=200, body=_dumps(data), content_type="application/json")

    async def _route(self, request: web.BaseRequest) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if parts in (["healthz"], ["livez"], ["readyz"]):
            return web.Response(text="ok")
        if parts == ["version"]:
            return self._json(self._version())
        if parts == ["api"]:
            return self._json(
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self._host}:{self._port}"}
                    ],
                }
            )
        if parts == ["apis"]:
            return self._json({"kind": "APIGroupList", "apiVersion": "v1", "groups": self._groups()})
        if parts == ["api", "v1"]:
            return self._json(self._resource_list("", "v1"))
        if parts == ["apis", "authentication.k8s.io", "v1", "tokenreviews"]:
            if request.method != "POST":
                raise KubeApiError(
                    405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
                )
            if "tokenreviews" in self._forbidden:
                raise KubeApiError(
                    403,
                    "Forbidden",
                    f'tokenreviews.authentication.k8s.io is forbidden: User "{USER}" cannot create resource '
                    '"tokenreviews" in API group "authentication.k8s.io" at the cluster scope',
                    {"group": "authentication.k8s.io", "kind": "tokenreviews"},
                )
            try:
                body = json.loads(await request.read())
            except ValueError:
                raise KubeApiError(400, "BadRequest", "the body is not JSON") from None
            self.token_reviews += 1
            return web.Response(
                status=201, body=_dumps(self._token_review(body)), content_type="application/json"
            )
        if len(parts) == 3 and parts[0] == "apis" and not self._serves(parts[1], parts[2]):
            return _page_not_found()
        if len(parts) == 2 and parts[0] == "apis":
            for group in self._groups():
                if group["name"] == parts[1]:
                    return self._json({"kind": "APIGroup", "apiVersion": "v1", **group})
            raise _path_not_found()
        if len(parts) == 3 and parts[0] == "apis":
            listing = self._resource_list(parts[1], parts[2])
            if not listing["resources"]:
                raise _path_not_found()
            return self._json(listing)
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif len(parts) > 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise _path_not_found()
        return await self._serve_resource(request, group, version, rest)

    def _version(self) -> Obj:
        major, minor = self.git_version.lstrip("v").split(".")[:2]
        return {
            "major": major,
            "minor": minor,
            "gitVersion": self.git_version,
            "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean",
            "buildDate": "2024-08-13T00:00:00Z",
            "goVersion": "go1.22.5",
            "compiler": "gc",
            "platform": "linux/amd64",
        }

    def _serves(self, group: str, version: str) -> bool:
        return any((r.group, r.version) == (group, version) for r in self._served())

    def _served(self) -> list[ResourceType]:
        return [r for r in self._types.values() if self._installed[r.plural]]

    def _groups(self) -> list[Obj]:
        groups: dict[str, list[str]] = {}
        for rtype in self._served():
            if rtype.group:
                versions = groups.setdefault(rtype.group, [])
                if rtype.version not in versions:
                    versions.append(rtype.version)
        out = []
        for name, versions in groups.items():
            entries = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
            out.append({"name": name, "versions": entries, "preferredVersion": entries[0]})
        return out

    def _resource_list(self, group: str, version: str) -> Obj:
        resources = []
        for rtype in self._served():
            if (rtype.group, rtype.version) != (group, version):
                continue
            entry: Obj = {
                "name": rtype.plural,
                "singularName": rtype.singular,
                "namespaced": rtype.namespaced,
                "kind": rtype.kind,
                "verbs": ["get", "list", "watch"],
            }
            if rtype.short_names:
                entry["shortNames"] = list(rtype.short_names)
            resources.append(entry)
        group_version = f"{group}/{version}" if group else version
        out: Obj = {"kind": "APIResourceList", "groupVersion": group_version, "resources": resources}
        if not group:
            out["apiVersion"] = "v1"
        return out

    async def _serve_resource(
        self, request: web.BaseRequest, group: str, version: str, rest: list[str]
    ) -> web.StreamResponse:
        namespace: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, plural, name = rest[1], rest[2], (rest[3] if len(rest) > 3 else None)
            if len(rest) > 4:
                raise _path_not_found()
        elif len(rest) in (1, 2):
            plural, name = rest[0], (rest[1] if len(rest) == 2 else None)
        else:
            raise _path_not_found()
        query = request.query
        watching = _parse_bool(query.get("watch"))
        verb = "watch" if watching else ("get" if name else "list")
        if plural in self._forbidden:
            scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
            details: Obj = {"kind": plural}
            if group:
                details["group"] = group
            raise KubeApiError(
                403,
                "Forbidden",
                f'{plural}{"." + group if group else ""} is forbidden: User "{USER}" cannot {verb} resource '
                f'"{plural}" in API group "{group}" {scope}',
                details,
            )
        throttled = self._throttle_of(plural)
        if throttled is not None:
            return self._status_response(
                status_body(
                    429, "TooManyRequests", "storage is (re)initializing", {"retryAfterSeconds": throttled}
                ),
                {"Retry-After": str(throttled)},
            )
        if group and not self._serves(group, version):
            return _page_not_found()
        rtype = self._types.get(plural)
        if (
            rtype is None
            or (rtype.group, rtype.version) != (group, version)
            or not self._installed[rtype.plural]
            or (namespace is not None and not rtype.namespaced)
        ):
            raise _path_not_found()
        if request.method != "GET":
            raise KubeApiError(
                405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
            )
        if watching:
            return await self._watch(request, rtype, namespace, name)
        if name is not None:
            obj = self._store[rtype.plural].get((namespace or "", name))
            if obj is None:
                raise self._not_found(rtype, (namespace or "", name))
            return self._json(obj)
        return await self._list(request, rtype, namespace)

    def _selectors(
        self, query: Mapping[str, str], rtype: ResourceType, namespace: str | None, name: str | None
    ) -> _Watcher:
        fields = parse_field_selector(query.get("fieldSelector", ""), rtype)
        if name is not None:
            fields.append(FieldRequirement("metadata.name", False, name))
        return _Watcher(rtype, namespace, parse_label_selector(query.get("labelSelector", "")), fields)

    @staticmethod
    def _parse_rv(text: str | None) -> int | None:
        if not text:
            return None
        try:
            value = int(text)
        except ValueError:
            raise KubeApiError(400, "BadRequest", f"invalid resource version: {text!r}") from None
        if value < 0:
            raise KubeApiError(400, "BadRequest", f"invalid resource version: {text!r}")
        return value

    async def _wait_for_rv(self, rv: int) -> KubeApiError | None:
        """kube-apiserver waits a little for an RV ahead of its cache, then answers 504."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.too_large_rv_wait
        while self._rv < rv and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self._rv >= rv:
            return None
        return KubeApiError(
            504,
            "Timeout",
            f"Too large resource version: {rv}, current: {self._rv}",
            {
                "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
                "retryAfterSeconds": 1,
            },
        )

    async def _list(
        self, request: web.BaseRequest, rtype: ResourceType, namespace: str | None
    ) -> web.Response:
        query = request.query
        matcher = self._selectors(query, rtype, namespace, None)
        rv = self._parse_rv(query.get("resourceVersion"))
        match = query.get("resourceVersionMatch", "")
        token = query.get("continue", "")
        if token:
            if rv is not None:
                raise KubeApiError(
                    400, "BadRequest", "specifying resource version is not allowed when using continue"
                )
            try:
                decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
                snapshot_rv, start = int(decoded["rv"]), tuple(decoded["start"])
            except (ValueError, KeyError, TypeError):
                raise KubeApiError(400, "BadRequest", "continue key is not valid") from None
            if self._expired(rtype, snapshot_rv):
                raise KubeApiError(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result. You can "
                    "start a new list without the continue parameter.",
                )
        else:
            start = ("", "")
            if rv is not None and rv > 0 and rv > self._rv:
                error = await self._wait_for_rv(rv)
                if error is not None:
                    raise error
            if match == "Exact" and rv is not None:
                if self._expired(rtype, rv):
                    raise KubeApiError(
                        410, "Expired", "The resourceVersion for the provided list is too old."
                    )
                snapshot_rv = rv
            else:
                snapshot_rv = self._rv
        state = self._snapshot(rtype, snapshot_rv) if snapshot_rv != self._rv else self._store[rtype.plural]
        keys = [k for k in sorted(state) if (not token or k > start) and matcher.matches(state[k])]
        limit = _int_param(query, "limit")
        meta: Obj = {"resourceVersion": str(snapshot_rv)}
        if limit > 0 and len(keys) > limit:
            page, remaining = keys[:limit], len(keys) - limit
            next_token = {"rv": snapshot_rv, "start": list(page[-1])}
            meta["continue"] = base64.urlsafe_b64encode(_dumps(next_token)).decode()
            if not query.get("labelSelector") and not query.get("fieldSelector"):
                meta["remainingItemCount"] = remaining
        else:
            page = keys
        items = [self._list_item(rtype, state[k]) for k in page]
        return self._json(
            {"kind": rtype.list_kind, "apiVersion": rtype.api_version, "metadata": meta, "items": items}
        )

    @staticmethod
    def _list_item(rtype: ResourceType, obj: Obj) -> Obj:
        if rtype.crd:
            return obj
        return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}

    def _bookmark(self, rtype: ResourceType, annotations: Mapping[str, str] | None = None) -> Obj:
        meta: Obj = {"resourceVersion": str(self._rv)}
        if annotations:
            meta["annotations"] = dict(annotations)
        return {
            "type": "BOOKMARK",
            "object": {"kind": rtype.kind, "apiVersion": rtype.api_version, "metadata": meta},
        }

    async def _watch(
        self, request: web.BaseRequest, rtype: ResourceType, namespace: str | None, name: str | None
    ) -> web.StreamResponse:
        query = request.query
        watcher = self._selectors(query, rtype, namespace, name)
        rv = self._parse_rv(query.get("resourceVersion"))
        bookmarks = _parse_bool(query.get("allowWatchBookmarks"))
        send_initial = _parse_bool(query.get("sendInitialEvents"))
        if send_initial and not bookmarks:
            raise KubeApiError(
                422,
                "Invalid",
                "sendInitialEvents: Forbidden: sendInitialEvents requires setting allowWatchBookmarks "
                "to true",
            )
        timeout_text = query.get("timeoutSeconds")
        timeout = _int_param(query, "timeoutSeconds") if timeout_text else self.default_watch_timeout
        error: KubeApiError | None = None
        if rv is not None and rv > 0 and rv > self._rv:
            error = await self._wait_for_rv(rv)
        # From here to registering the watcher nothing awaits: no event can slip between the initial
        # events and the live ones.
        initial: list[tuple[str, Obj]] = []
        if error is None:
            if send_initial or not rv:
                store = self._store[rtype.plural]
                initial = [("ADDED", store[k]) for k in sorted(store) if watcher.matches(store[k])]
            elif self._expired(rtype, rv):
                error = KubeApiError(
                    410, "Expired", f"too old resource version: {rv} ({self._floor[rtype.plural]})"
                )
            else:
                for event in self._logs[rtype.plural]:
                    if event.rv > rv and (translated := watcher.translate(event)) is not None:
                        initial.append(translated)
        if error is None:
            self._watchers.add(watcher)
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            if error is not None:
                await response.write(_dumps({"type": "ERROR", "object": error.status()}) + b"\n")
                await response.write_eof()
                return response
            for etype, obj in initial:
                await response.write(_dumps({"type": etype, "object": obj}) + b"\n")
            if send_initial:
                initial_end = {"k8s.io/initial-events-end": "true"}
                await response.write(_dumps(self._bookmark(rtype, initial_end)) + b"\n")
            if await self._stream(request, response, watcher, rtype, bookmarks, timeout):
                await response.write_eof()
        except ConnectionResetError:  # the client went away
            if request.transport is not None:
                request.transport.abort()
        except asyncio.CancelledError:  # stop()
            if request.transport is not None:
                request.transport.abort()
            raise
        finally:
            self._watchers.discard(watcher)
        return response

    async def _stream(
        self,
        request: web.BaseRequest,
        response: web.StreamResponse,
        watcher: _Watcher,
        rtype: ResourceType,
        bookmarks: bool,
        lifetime: float | None,
    ) -> bool:
        """Send live events until the timeout or a drop; True to end cleanly, False after an abort."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + lifetime if lifetime else None
        next_bookmark = loop.time() + self.bookmark_interval if bookmarks else None
        while True:
            if not watcher.pending:
                watcher.wake.clear()
                wakeups = [t for t in (deadline, next_bookmark) if t is not None]
                wait = max(0.0, min(wakeups) - loop.time()) if wakeups else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(watcher.wake.wait(), wait)
            if watcher.pending and watcher.pending[0] == _ABORT:
                if request.transport is not None:
                    request.transport.abort()
                return False
            await self._running.wait()  # a hung server freezes its open watches
            if watcher.pending:
                item = watcher.pending.popleft()
                if item == _ABORT:
                    if request.transport is not None:
                        request.transport.abort()
                    return False
                if item == _CLOSE:
                    return True
                etype, obj = item
                await response.write(_dumps({"type": etype, "object": obj}) + b"\n")
                continue
            now = loop.time()
            if deadline is not None and now >= deadline:
                return True
            if next_bookmark is not None and now >= next_bookmark:
                await response.write(_dumps(self._bookmark(rtype)) + b"\n")
                next_bookmark = now + self.bookmark_interval


def _int_param(query: Mapping[str, str], name: str) -> int:
    text = query.get(name) or "0"
    try:
        return int(text)
    except ValueError:
        raise KubeApiError(400, "BadRequest", f"invalid {name}: {text!r}") from None


def _page_not_found() -> web.Response:
    """What kube-apiserver's mux answers under a group/version nothing registered (a CRD not
    installed): plain text, not a Status (after authorization, so a 403 comes first)."""
    return web.Response(status=404, text="404 page not found\n")


def _path_not_found() -> KubeApiError:
    return KubeApiError(404, "NotFound", "the server could not find the requested resource")
