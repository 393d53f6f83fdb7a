"""The admission webhook: AdmissionReview v1 over HTTPS, answered with inject.pod's JSONPatch.

``POST /inject/{cluster}``: each member cluster's MutatingWebhookConfiguration names its own
cluster in the path (deploy/member-cluster/webhook.yaml), since one isthmus serves them all. The
answer is always an AdmissionReview with the request's uid:

* a pod to inject: allowed, with the patch (``patchType: JSONPatch``);
* a pod that gets no sidecar (already injected, opted out, host network): allowed, no patch;
* a pod whose annotations ask for something impossible: refused (400) with the reason, so the
  user sees it in the ReplicaSet's events instead of a pod silently without its sidecar.

A body that is not an AdmissionReview gets HTTP 400 with a JSON error, and a member cluster isthmus
does not know 404; nothing in a request can stop the server. ``GET /healthz`` for probes.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from isthmus.inject.pod import InjectError, InjectSettings, decide, patch

log = logging.getLogger(__name__)

MAX_BODY = 4 * 2**20  # an AdmissionReview of a pod is kilobytes; the API server's limit is 3 MiB


class Webhook:
    """Answers admission requests with the settings of the member cluster named in the path."""

    def __init__(self, settings_of: Callable[[str], InjectSettings | None]) -> None:
        self.settings_of = settings_of
        self.answered: dict[str, int] = {"injected": 0, "skipped": 0, "refused": 0, "bad-request": 0}

    def review(self, body: Any, cluster: str) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) for one request body."""
        if not isinstance(body, dict) or body.get("kind") != "AdmissionReview":
            return self._bad("the body is not an AdmissionReview")
        request = body.get("request")
        if not isinstance(request, dict) or not request.get("uid"):
            return self._bad("the AdmissionReview has no request uid")
        settings = self.settings_of(cluster)
        if settings is None:
            self.answered["bad-request"] += 1
            return 404, {"error": f"no member cluster named {cluster!r}"}
        uid = str(request["uid"])
        pod = request.get("object")
        kind = (request.get("kind") or {}).get("kind")
        if kind != "Pod" or not isinstance(pod, dict):
            return self._answer(uid, refused=f"expected a Pod, got {kind!r}")
        namespace = str(request.get("namespace") or (pod.get("metadata") or {}).get("namespace") or "")
        try:
            why = decide(pod)
            ops = [] if why else patch(pod, settings, namespace)
        except InjectError as exc:
            return self._answer(uid, refused=str(exc))
        name = (pod.get("metadata") or {}).get("name") or (pod.get("metadata") or {}).get("generateName", "")
        if not ops:
            self.answered["skipped"] += 1
            log.debug("pod %s/%s: no sidecar: %s", namespace, name, why)
            return self._answer(uid)
        if request.get("dryRun"):  # kubectl --dry-run=server: answered the same, not counted
            log.debug("pod %s/%s in cluster %s: sidecar injected (dry run)", namespace, name, cluster)
        else:
            self.answered["injected"] += 1
            log.info("pod %s/%s in cluster %s: sidecar injected", namespace, name, cluster)
        return self._answer(uid, ops=ops)

    def _bad(self, why: str) -> tuple[int, dict[str, Any]]:
        self.answered["bad-request"] += 1
        return 400, {"error": why}

    def _answer(
        self, uid: str, ops: list[dict[str, Any]] | None = None, refused: str = ""
    ) -> tuple[int, dict[str, Any]]:
        response: dict[str, Any] = {"uid": uid, "allowed": not refused}
        if refused:
            self.answered["refused"] += 1
            response["status"] = {"code": 400, "message": f"isthmus sidecar injection: {refused}"}
        if ops:
            response["patchType"] = "JSONPatch"
            response["patch"] = base64.b64encode(json.dumps(ops).encode()).decode()
        return 200, {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}

    def app(self) -> web.Application:
        async def inject(request: web.Request) -> web.Response:
            started = time.perf_counter()
            try:
                body = json.loads(await request.read())
            except (ValueError, UnicodeDecodeError) as exc:
                status, answer = self._bad(f"the body is not JSON: {exc}")
            else:
                status, answer = self.review(body, request.match_info["cluster"])
            log.debug("admission answered in %.1f ms", (time.perf_counter() - started) * 1000)
            return web.json_response(answer, status=status)

        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_post("/inject/{cluster}", inject)
        app.router.add_get("/healthz", healthz)
        return app
