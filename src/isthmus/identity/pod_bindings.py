"""Pod-bound service-account tokens: the streams admitted with one, and their end when the pod goes.

A projected token is bound to its pod (the TokenReview's ``extra`` names the pod and its uid): the
API server stops accepting it once that pod is deleted. A stream is authenticated once, when it
opens, so isthmus closes the open streams of a deleted pod itself: each such stream holds a
``Revocation`` registered here under (member cluster, namespace, pod name, uid), and when the
member cluster's pod watch reports a change of that pod (or relists), a pod that is gone, or
replaced by another of the same name (another uid), revokes them: the stream ends with
UNAUTHENTICATED, and so does the proxy's reconnect: the API server accepts a deleted pod's token
for a few seconds more (its token cache), isthmus does not once its watch saw the deletion (the
pods seen gone are remembered, at most ``remember`` of them).

What a pod is, and whether it still exists, is asked through ``PodUid`` (``Members.pod_uid`` in
discovery.kube); this module does not talk to Kubernetes. A binding lives as long as its stream:
revocations are held weakly.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection

import grpc

from isthmus.xds.server.auth import AuthFailure, Revocation

log = logging.getLogger(__name__)

# (member cluster, namespace, pod name) -> the uid of the pod the cluster's watch holds; None: no
# such pod; "" : not known (the cluster's pods are not listed yet).
PodUid = Callable[[str, str, str], str | None]
# (member cluster, namespace, pod name, uid): a stream of that pod's token was admitted.
OnBind = Callable[[str, str, str, str], None]

POD_NAME_KEY = "authentication.kubernetes.io/pod-name"
POD_UID_KEY = "authentication.kubernetes.io/pod-uid"

_Key = tuple[str, str, str]  # cluster, namespace, pod name


class PodBindings:
    """The open streams of pod-bound tokens, by pod; revoked when their pod is deleted."""

    def __init__(self, pod_uid: PodUid, remember: int = 10_000, on_bind: OnBind | None = None) -> None:
        self._pod_uid = pod_uid
        self._on_bind = on_bind
        self._bound: dict[_Key, dict[str, weakref.WeakSet[Revocation]]] = {}
        # Pods (key, uid) seen gone while a stream of their token had been admitted, newest last.
        self._gone: OrderedDict[tuple[str, str, str, str], None] = OrderedDict()
        self._remember = remember
        self.revoked = 0  # streams ended because their pod was deleted
        # Bindings for streams another process holds (bind(elsewhere=True)): the pod is followed
        # and remembered gone for them, but they are not this process's streams.
        self._elsewhere: weakref.WeakSet[Revocation] = weakref.WeakSet()

    def __len__(self) -> int:
        """This process's open streams of pod-bound tokens."""
        every = sum(len(revs) for by_uid in self._bound.values() for revs in by_uid.values())
        return every - len(self._elsewhere)

    def bind(self, cluster: str, namespace: str, pod: str, uid: str, elsewhere: bool = False) -> Revocation:
        """A Revocation for a stream of ``pod``'s token; revoked at once if the watch already holds
        another pod of that name (a pod it does not list yet is not taken for deleted: the review
        just said it exists). ``elsewhere``: the stream is another process's, which holds the
        Revocation until its stream or the pod goes."""
        revocation = Revocation()
        if elsewhere:
            self._elsewhere.add(revocation)
        key = (cluster, namespace, pod)
        self._bound.setdefault(key, {}).setdefault(uid, weakref.WeakSet()).add(revocation)
        if self._on_bind is not None:
            self._on_bind(cluster, namespace, pod, uid)
        current = self._pod_uid(*key)
        if current and current != uid:
            self._check(key)
        return revocation

    @staticmethod
    def deleted(cluster: str, namespace: str, pod: str, uid: str) -> AuthFailure:
        return AuthFailure(
            grpc.StatusCode.UNAUTHENTICATED,
            "pod-deleted",
            f"pod {namespace}/{pod} (uid {uid}) of member cluster {cluster!r} was deleted: "
            "its token is no longer valid",
        )

    def may_exist(self, cluster: str, namespace: str, pod: str, uid: str) -> bool:
        """False once the watch has shown that pod gone (a stream of its token had been admitted) or
        holds another pod of its name: a review of its token, cached or fresh, is stale. A pod the
        watch does not hold (yet) is not taken for gone: a new pod's sidecar may connect before the
        watch has seen the pod."""
        if (cluster, namespace, pod, uid) in self._gone:
            return False
        current = self._pod_uid(cluster, namespace, pod)
        return current is None or current in ("", uid)

    def gone(self, cluster: str, namespace: str, pod: str, uid: str) -> None:
        """That pod was seen deleted (here, or by the process whose watch says so): its token admits
        nothing more, whatever a review says."""
        self._gone[(cluster, namespace, pod, uid)] = None
        self._gone.move_to_end((cluster, namespace, pod, uid))
        while len(self._gone) > self._remember:
            self._gone.popitem(last=False)

    def pods_changed(self, cluster: str, keys: Collection[str] | None) -> None:
        """Cluster ``cluster``'s watch changed the pods ``keys`` ("namespace/name"; None: relisted)."""
        if keys is None:
            for key in [k for k in self._bound if k[0] == cluster]:
                self._check(key)
            return
        for name in keys:
            namespace, _, pod = name.partition("/")
            key = (cluster, namespace, pod)
            if key in self._bound:
                self._check(key)

    def _check(self, key: _Key) -> None:
        by_uid = self._bound[key]
        current = self._pod_uid(*key)
        for uid in list(by_uid):
            revocations = list(by_uid.pop(uid))
            if current in ("", uid):
                if revocations:
                    by_uid[uid] = weakref.WeakSet(revocations)
                continue  # still there (or not listed yet); a uid whose streams all ended is dropped
            self.gone(*key, uid)
            failure = self.deleted(*key, uid)
            here = [r for r in revocations if r not in self._elsewhere]
            if here:
                log.info("%s: closing %d stream(s)", failure.details, len(here))
                self.revoked += len(here)
            for revocation in revocations:
                revocation.revoke(failure)
        if not by_uid:
            del self._bound[key]
