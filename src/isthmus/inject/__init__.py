"""Sidecar injection: the pure pod -> JSONPatch logic (pod.py), the capture rules (capture.py), the
admission webhook (webhook.py) and offline injection of manifests (manifests.py)."""
