"""Command line: ``isthmus serve`` runs the control plane; ``isthmus bootstrap`` writes an Envoy
bootstrap; ``isthmus drain`` drains (or undrains) a member cluster through the admin server."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from isthmus import __version__
from isthmus.admin import tables
from isthmus.app import ControlPlane
from isthmus.discovery.clusterset import DEFAULT_RANGE as DEFAULT_CLUSTERSET_RANGE
from isthmus.discovery.file import MeshFileError
from isthmus.discovery.kube import registration
from isthmus.discovery.kube.kubeconfig import Credentials, KubeconfigError
from isthmus.inject.manifests import inject_documents
from isthmus.inject.pod import DEFAULT_CAPTURE_IMAGE, DEFAULT_PROXY_IMAGE, InjectError, InjectSettings
from isthmus.settings import (
    INSECURE_KEYS_FLAG,
    INSECURE_PLAINTEXT_FLAG,
    INSECURE_UNAUTHENTICATED_FLAG,
    ServeSettings,
    SettingsError,
    parse_cluster,
    parse_cluster_gateway,
    parse_gateway_identity,
    parse_hostport,
    parse_xds_address,
)
from isthmus.xds.ca import CAError
from isthmus.xds.generate.bootstrap import BootstrapOptions, bootstrap_dict
from isthmus.xds.proxy import DEFAULT_INBOUND_PORT, DEFAULT_OUTBOUND_PORT, OutboundTraffic, Role

TEXT_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339, UTC), level, logger, message (and the exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="isthmus", description="Multi-cluster Envoy xDS control plane.")
    parser.add_argument("--version", action="version", version=f"isthmus {__version__}")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="json: one JSON object per line (time, level, logger, message), for log collectors",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the control plane (ADS server and admin endpoints)")
    serve.add_argument(
        "--xds-address",
        default="127.0.0.1:15010",
        metavar="HOST:PORT",
        help="gRPC ADS listen address, or unix:/PATH (default %(default)s)",
    )
    serve.add_argument(
        "--admin-address",
        default="127.0.0.1:15014",
        metavar="HOST:PORT",
        help="admin HTTP listen address: /healthz, /readyz (default %(default)s)",
    )
    serve.add_argument(
        "--mesh",
        type=Path,
        metavar="PATH",
        help="YAML mesh file (file source, watched for changes); "
        "without any discovery flag the built-in example mesh is served",
    )
    serve.add_argument(
        "--send-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="close a stream whose Envoy does not read a response within this time",
    )
    serve.add_argument(
        "--send-budget-mib",
        type=int,
        default=64,
        metavar="MIB",
        help="responses sent and not yet ACKed, over all streams: bounds memory when many proxies "
        "connect at once (a larger one may speed up their cold start)",
    )
    serve.add_argument(
        "--xds-workers",
        type=int,
        default=1,
        metavar="N",
        help="processes that serve xDS on --xds-address: this one and N-1 workers sharing its port, "
        "each fed every mesh view (docs/architecture.md, Worker processes); about one per core",
    )
    ident = serve.add_argument_group("mTLS and the mesh CA (docs/security.md)")
    ident.add_argument("--no-mtls", action="store_true", help="no certificates, plain text everywhere")
    ident.add_argument("--trust-domain", default="cluster.local", help="SPIFFE trust domain")
    ident.add_argument("--ca-cert", type=Path, metavar="PEM", help="mesh root certificate (with --ca-key)")
    ident.add_argument("--ca-key", type=Path, metavar="PEM", help="mesh root private key (EC)")
    ident.add_argument(
        "--ca-dir",
        type=Path,
        metavar="DIR",
        help="development only: keep a generated root in DIR (made on first start)",
    )
    ident.add_argument(
        "--cert-ttl", type=float, default=24 * 3600.0, metavar="SECONDS", help="workload certificate lifetime"
    )
    ident.add_argument(
        "--xds-san",
        action="append",
        default=[],
        metavar="NAME",
        help="serve xDS over TLS with a mesh-CA certificate for this DNS name or IP (repeatable)",
    )
    ident.add_argument(
        "--xds-token-file",
        type=Path,
        metavar="FILE",
        help="authenticate proxies: lines token,namespace,service-account[,cluster] (re-read on change)",
    )
    ident.add_argument(
        "--admin-token-file",
        type=Path,
        metavar="FILE",
        help="the admin API (but /healthz, /readyz) needs a token of FILE: lines token,name,read|drain",
    )
    ident.add_argument(
        "--admin-kube-auth",
        action="store_true",
        help="the admin API (but /healthz, /readyz) needs a token the home cluster's RBAC allows: "
        "TokenReview, then SubjectAccessReview of the path (get: read, create: drain); see --home-kubeconfig",
    )
    ident.add_argument(
        "--gateway-identity",
        action="append",
        default=[],
        metavar="[CLUSTER=]NS/SA",
        help="the service account east-west gateways authenticate as, for one member cluster or all "
        "(repeatable; default isthmus-system/isthmus-gateway)",
    )
    ident.add_argument(
        "--token-audience",
        default="isthmus",
        help="audience of the service-account tokens proxies present (default %(default)s)",
    )
    ident.add_argument(
        INSECURE_UNAUTHENTICATED_FLAG,
        dest="insecure_unauthenticated_xds",
        action="store_true",
        help="with member clusters, serve proxies that present no token (logged loudly)",
    )
    ident.add_argument(
        INSECURE_PLAINTEXT_FLAG,
        dest="insecure_plaintext_xds",
        action="store_true",
        help="serve xDS in plain text on a non-loopback address (logged loudly)",
    )
    ident.add_argument(
        INSECURE_KEYS_FLAG,
        dest="insecure_keys_on_network",
        action="store_true",
        help="serve private keys on a non-loopback xDS address although proxies are not authenticated",
    )
    serve.add_argument(
        "--drain-step",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="time between the steps of a drain, once every proxy has ACKed the previous one",
    )
    serve.add_argument(
        "--gateway-grace",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="an east-west gateway whose xDS stream has been gone this long is treated as dead",
    )
    kube = serve.add_argument_group("Kubernetes member clusters (docs/discovery.md)")
    kube.add_argument(
        "--cluster",
        action="append",
        default=[],
        metavar="NAME=KUBECONFIG",
        help="watch this member cluster (repeatable; the file is re-read when it changes)",
    )
    kube.add_argument(
        "--kubeconfig-dir",
        type=Path,
        metavar="DIR",
        help="watch a directory of kubeconfigs, one per member cluster (file name = cluster)",
    )
    kube.add_argument(
        "--cluster-gateway",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help="east-west gateway address of a member cluster (default: its Service labelled "
        "isthmus.io/gateway=eastwest)",
    )
    kube.add_argument(
        "--cluster-secrets-namespace",
        metavar="NAMESPACE",
        help="watch Secrets labelled isthmus.io/member-cluster=true in this namespace of the control "
        "plane's own cluster; each data key is a cluster name, its value a kubeconfig",
    )
    kube.add_argument(
        "--home-kubeconfig",
        metavar="PATH",
        help="kubeconfig of the control plane's own cluster (default: in-cluster service account)",
    )
    kube.add_argument(
        "--ready-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="become ready after this long even if some clusters have not synced",
    )
    kube.add_argument(
        "--export-policy",
        choices=["all", "serviceexport"],
        default="all",
        help="export every Service, or only those with an MCS ServiceExport",
    )
    kube.add_argument(
        "--require-namespace-label",
        action="store_true",
        help="only namespaces labelled isthmus.io/mesh=enabled are in the mesh",
    )
    kube.add_argument(
        "--max-staleness",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="an unreachable cluster's endpoints are demoted to the last priority after this",
    )
    kube.add_argument(
        "--withdraw-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="... and withdrawn after this (default: never)",
    )
    kube.add_argument(
        "--debounce",
        type=float,
        default=0.1,
        metavar="SECONDS",
        help="a change after this long without a push is pushed at once; one sooner waits until no "
        "change came for this long (a burst)",
    )
    kube.add_argument(
        "--debounce-max",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="maximum delay of a change while changes keep coming",
    )
    kube.add_argument(
        "--clusterset-range",
        default=DEFAULT_CLUSTERSET_RANGE,
        metavar="CIDR",
        help="where services' clusterset IPs are chosen (the same in every replica; docs/capture.md)",
    )
    kube.add_argument(
        "--config-namespace",
        metavar="NS",
        help="read MemberCluster objects (isthmus.io/v1alpha1: drains every replica follows) in this "
        "namespace of the home cluster (--home-kubeconfig, else in-cluster)",
    )
    kube.add_argument(
        "--no-service-imports",
        dest="service_imports",
        action="store_false",
        help="do not write MCS ServiceImports into member clusters (written where the CRD exists)",
    )
    kube.add_argument(
        "--no-route-status",
        dest="route_status",
        action="store_false",
        help="do not write status.parents of HTTPRoutes and GRPCRoutes into member clusters "
        "(docs/routing.md; needs update on httproutes/status, grpcroutes/status)",
    )

    hook = serve.add_argument_group("sidecar injection (docs/injection.md)")
    hook.add_argument(
        "--webhook-address",
        metavar="HOST:PORT",
        help="serve the admission webhook (HTTPS, POST /inject/CLUSTER) here (default: off)",
    )
    hook.add_argument(
        "--webhook-san",
        action="append",
        default=[],
        metavar="NAME",
        help="DNS name or IP of the webhook's mesh-CA certificate (repeatable; e.g. its Service's name)",
    )
    _injection_arguments(hook)

    inject = sub.add_parser("inject", help="inject sidecars into the pods of manifests (prints them)")
    inject.add_argument("-f", "--filename", required=True, help="YAML file of objects, - for stdin")
    inject.add_argument("--cluster", required=True, help="member cluster the pods will run in")
    inject.add_argument("--namespace", default="default", help="for objects that name none")
    inject.add_argument("--root-ca", type=Path, required=True, metavar="PEM", help="the mesh root")
    _injection_arguments(inject)

    drain = sub.add_parser(
        "drain", help="drain a member cluster for an upgrade (or --undo), and follow its progress"
    )
    drain.add_argument("cluster", help="member cluster name")
    drain.add_argument("--undo", action="store_true", help="bring the cluster's traffic back")
    drain.add_argument("--no-wait", action="store_true", help="start it and return")
    drain.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS")
    _admin_arguments(drain)

    status = sub.add_parser(
        "status", help="connected proxies and where their configuration stands (like istioctl proxy-status)"
    )
    status.add_argument("proxy", nargs="?", help="one proxy's node id: what it was sent, ACKed, NACKed")
    status.add_argument("-o", "--output", choices=["table", "json"], default="table")
    _admin_arguments(status)
    clusters = sub.add_parser("clusters", help="member clusters: state, gateway, weight, drain")
    clusters.add_argument("-o", "--output", choices=["table", "json"], default="table")
    _admin_arguments(clusters)

    _cluster_arguments(sub)

    boot = sub.add_parser("bootstrap", help="write an Envoy bootstrap that connects to `isthmus serve`")
    boot.add_argument("--role", choices=[r.value for r in Role], required=True)
    boot.add_argument("--cluster", required=True, help="member cluster this Envoy runs in")
    boot.add_argument("--namespace", required=True)
    boot.add_argument("--service", required=True)
    boot.add_argument("--service-account", default="default")
    boot.add_argument(
        "--pod-name", default="", help="the pod this Envoy runs in (its pod-bound token must be this pod's)"
    )
    boot.add_argument(
        "--node-name", default="", help="the Kubernetes node it runs on (isthmus reads the locality from it)"
    )
    boot.add_argument("--node-id", default="", help="unique node id (default ROLE~SERVICE.NAMESPACE~CLUSTER)")
    boot.add_argument("--region", default="")
    boot.add_argument("--zone", default="")
    boot.add_argument(
        "--xds-address", default="127.0.0.1:15010", metavar="HOST:PORT", help="or unix:/PATH (a socket file)"
    )
    boot.add_argument(
        "--xds-root-ca",
        type=Path,
        metavar="PEM",
        help="connect over TLS, trusting this file (the mesh root, e.g. a mounted ConfigMap)",
    )
    boot.add_argument(
        "--xds-server-name",
        default="",
        metavar="NAME",
        help="with --xds-root-ca: the DNS name or IP the serving certificate must name (default: the host)",
    )
    boot.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="authenticate with the bearer token in FILE, sent as it is: no trailing newline (a projected "
        "service-account token has none)",
    )
    boot.add_argument("--admin-port", type=int, default=15000)
    boot.add_argument("--listen-address", default="0.0.0.0", help="address the proxy's listeners bind")
    boot.add_argument(
        "--app-address", default="127.0.0.1", help="address of the local application behind the sidecar"
    )
    boot.add_argument("--outbound-port", type=int, default=DEFAULT_OUTBOUND_PORT)
    boot.add_argument(
        "--readiness-port", type=int, default=0, help="serve GET /ready (Envoy is configured) on this port"
    )
    boot.add_argument("--inbound-port", type=int, default=DEFAULT_INBOUND_PORT)
    boot.add_argument(
        "--capture",
        action="store_true",
        help="the proxy's traffic is captured (the nftables rules of isthmus inject): "
        "listen by original destination",
    )
    boot.add_argument(
        "--outbound-traffic",
        choices=[t.value for t in OutboundTraffic],
        default=OutboundTraffic.ALLOW_ANY.value,
        help="with --capture: where connections to addresses of no mesh service go",
    )
    boot.add_argument("--delta", action="store_true", help="use incremental xDS (DELTA_GRPC)")
    boot.add_argument("--format", choices=["json", "yaml"], help="default: from -o's extension, else json")
    boot.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    return parser


def _admin_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the admin API is and how to authenticate to it (drain, status, clusters)."""
    parser.add_argument("--admin-address", default="127.0.0.1:15014", metavar="HOST:PORT")
    who = parser.add_mutually_exclusive_group()
    who.add_argument(
        "--token-file", type=Path, metavar="FILE", help="bearer token for the admin API (--admin-token-file)"
    )
    who.add_argument(
        "--kubeconfig-token",
        nargs="?",
        const="",
        metavar="KUBECONFIG",
        help="send the bearer token of the kubeconfig's current user (default $KUBECONFIG, else "
        "~/.kube/config), for a control plane with --admin-kube-auth",
    )


def _injection_arguments(group: Any) -> None:
    group.add_argument(
        "--inject-xds-address",
        metavar="HOST:PORT",
        help="where injected sidecars reach isthmus (serve: default the first --xds-san, the xDS port)",
    )
    group.add_argument("--inject-xds-server-name", default="", metavar="NAME", help="its certificate's name")
    group.add_argument("--inject-proxy-image", default=DEFAULT_PROXY_IMAGE, metavar="IMAGE")
    group.add_argument("--inject-capture-image", default=DEFAULT_CAPTURE_IMAGE, metavar="IMAGE")
    group.add_argument(
        "--inject-outbound-traffic",
        choices=[t.value for t in OutboundTraffic],
        default=OutboundTraffic.ALLOW_ANY.value,
        help="where injected pods' connections to addresses of no mesh service go "
        "(per pod: annotation isthmus.io/outbound-traffic)",
    )


def _inject(args: argparse.Namespace) -> int:
    if not args.inject_xds_address:
        raise SettingsError("isthmus inject: --inject-xds-address HOST:PORT is required")
    host, port = parse_hostport(args.inject_xds_address, "--inject-xds-address")
    settings = InjectSettings(
        cluster=args.cluster,
        xds_host=host,
        xds_port=port,
        xds_server_name=args.inject_xds_server_name,
        root_pem=args.root_ca.read_text(),
        proxy_image=args.inject_proxy_image,
        capture_image=args.inject_capture_image,
        outbound_traffic=args.inject_outbound_traffic,
    )
    text = sys.stdin.read() if args.filename == "-" else Path(args.filename).read_text()
    try:
        documents = list(yaml.safe_load_all(text))
        injected = inject_documents(documents, settings, args.namespace)
    except (yaml.YAMLError, InjectError) as exc:
        print(f"isthmus inject: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(yaml.safe_dump_all(injected, sort_keys=False))
    return 0


def _cluster_arguments(sub: Any) -> None:
    cluster = sub.add_parser("cluster", help="register member clusters (docs/discovery.md)")
    verbs = cluster.add_subparsers(dest="verb", required=True)

    def home(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--home-kubeconfig",
            metavar="FILE",
            help="the home cluster (default: in-cluster, else ~/.kube/config)",
        )
        parser.add_argument("--home-context", metavar="NAME")
        parser.add_argument(
            "--namespace",
            default="isthmus-system",
            help="where isthmus watches member Secrets (--cluster-secrets-namespace)",
        )

    add = verbs.add_parser(
        "add", help="make a read-only account in the member cluster and register it at home"
    )
    add.add_argument("name", help="the member cluster's name in the mesh (a lowercase DNS label)")
    add.add_argument(
        "--kubeconfig", metavar="FILE", help="the member cluster, as you reach it (default ~/.kube/config)"
    )
    add.add_argument("--context", metavar="NAME", help="its context (default: the current one)")
    add.add_argument(
        "--server", metavar="URL", help="the API server URL isthmus uses (default: the kubeconfig's)"
    )
    add.add_argument(
        "--dry-run", action="store_true", help="print the member Secret as YAML; change nothing at home"
    )
    add.add_argument(
        "--allow-exec-auth", action="store_true", help="let the kubeconfig's exec plugin run (never copied)"
    )
    home(add)
    remove = verbs.add_parser(
        "remove", help="unregister a member cluster (and with --kubeconfig, its account)"
    )
    remove.add_argument("name")
    remove.add_argument(
        "--kubeconfig", metavar="FILE", help="also delete the account made in the member cluster"
    )
    remove.add_argument("--context", metavar="NAME")
    home(remove)
    listing = verbs.add_parser(
        "list", help="the registered member clusters (and their state, from --admin-address)"
    )
    listing.add_argument(
        "--admin-address", metavar="HOST:PORT", help="a running isthmus: add its view of each"
    )
    listing.add_argument("-o", "--output", choices=["table", "json"], default="table")
    home(listing)


def _cluster(args: argparse.Namespace) -> int:
    """isthmus cluster add | remove | list."""
    try:
        home = (
            registration.read_target(args.home_kubeconfig, args.home_context, True)
            if args.home_kubeconfig
            else None
        )
        if args.verb == "add":
            member = registration.read_target(args.kubeconfig, args.context, args.allow_exec_auth)
            added = asyncio.run(
                registration.add(
                    args.name, member, home, args.namespace, server=args.server, dry_run=args.dry_run
                )
            )
            if not added.written:
                print(yaml.safe_dump(added.secret, sort_keys=False), end="")
            else:
                print(
                    f"cluster {args.name} added: Secret {args.namespace}/{added.secret['metadata']['name']}"
                )
            return 0
        if args.verb == "remove":
            owned = registration.read_target(args.kubeconfig, args.context, True) if args.kubeconfig else None
            for line in asyncio.run(registration.remove(args.name, home, args.namespace, owned)):
                print(f"deleted {line}")
            return 0
        rows = [
            {"name": n, "source": s} for n, s in asyncio.run(registration.registered(home, args.namespace))
        ]
        if args.admin_address:
            host, port = parse_hostport(args.admin_address, "--admin-address")
            state = _admin_call("GET", f"http://{host}:{port}/readyz").get("member_clusters", {})
            for row in rows:
                seen = state.get(row["name"], {})
                row |= {
                    "state": seen.get("state", "unknown"),
                    "last_sync": seen.get("last_sync", "-"),
                    "detail": seen.get("detail", ""),
                }
        if args.output == "json":
            print(json.dumps(rows, indent=2))
        else:
            columns = list(rows[0]) if rows else ["name", "source"]
            header = [c.upper().replace("_", "-") for c in columns]
            print(tables.table(header, [[str(row[c]) for c in columns] for row in rows]), end="")
        return 0
    except registration.RegistrationError as exc:
        print(f"isthmus: {exc}", file=sys.stderr)
        return 2
    except (OSError, urllib.error.URLError) as exc:
        print(f"isthmus: {exc}", file=sys.stderr)
        return 1


def _drain(args: argparse.Namespace) -> int:
    """POST /drain (or /undrain) to the admin server, then print progress until it is done."""
    host, port = parse_hostport(args.admin_address, "--admin-address")
    base = f"http://{host}:{port}"
    action = "undrain" if args.undo else "drain"
    try:
        token = _drain_token(args)
    except (OSError, KubeconfigError) as exc:
        print(f"isthmus: {exc}", file=sys.stderr)
        return 1
    try:
        progress = _admin_call("POST", f"{base}/{action}/{args.cluster}", token)
        shown = ""
        deadline = time.monotonic() + args.timeout
        # "requested": written into the cluster's MemberCluster object (configuration API); the
        # replicas take it from there, and the progress shows once one has started.
        while (
            not args.no_wait
            and progress.get("state") in ("running", "requested")
            and time.monotonic() < deadline
        ):
            line = f"{args.cluster}: {action} at {progress['weight']}%"
            if progress.get("waiting_for"):
                line += f", waiting for {len(progress['waiting_for'])} proxies to ACK"
            if line != shown:
                print(line, flush=True)
                shown = line
            time.sleep(0.5)
            now = _admin_call("GET", f"{base}/drain", token).get(args.cluster)
            target = 0 if action == "drain" else 100
            if now is not None and (now["state"] != "done" or now["weight"] == target):
                progress = now
    except urllib.error.HTTPError as exc:
        print(f"isthmus: {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"isthmus: cannot reach the admin server at {base}: {exc}", file=sys.stderr)
        return 1
    print(f"{args.cluster}: {action} {progress.get('state')} at {progress.get('weight')}%")
    if progress.get("timed_out"):
        print(f"  proxies that did not ACK in time: {', '.join(progress['timed_out'])}")
    return 0 if progress.get("state") in ("done", "running", "requested") else 1


def _status(args: argparse.Namespace) -> int:
    """GET the admin API's status pages and print them (tables, or JSON with -o json)."""
    host, port = parse_hostport(args.admin_address, "--admin-address")
    base = f"http://{host}:{port}"
    try:
        token = _drain_token(args)
        if args.command == "clusters":
            found: Any = _admin_call("GET", f"{base}/debug/clusters", token)
            text = tables.clusters_table(found)
        elif args.proxy:
            syncz = _admin_call("GET", f"{base}/debug/syncz", token)
            query = urllib.parse.urlencode({"proxy": args.proxy})
            dump = _admin_call("GET", f"{base}/debug/config_dump?{query}", token)
            found = {"syncz": [p for p in syncz if p["proxy"] == args.proxy], "config_dump": dump}
            text = tables.proxy_detail(args.proxy, syncz, dump)
        else:
            found = _admin_call("GET", f"{base}/debug/syncz", token)
            text = tables.proxies_table(found)
    except (OSError, KubeconfigError) as exc:
        if isinstance(exc, urllib.error.HTTPError):
            print(f"isthmus: {exc.code}: {exc.read().decode(errors='replace')}", file=sys.stderr)
        else:
            print(f"isthmus: cannot reach the admin server at {base}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(found, indent=2, sort_keys=True) if args.output == "json" else text, end="")
    if args.output == "json":
        print()
    return 0


def _drain_token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        try:
            return str(args.token_file.read_text().strip())
        except OSError as exc:
            raise OSError(f"--token-file: {exc}") from exc
    if args.kubeconfig_token is None:
        return None
    path = Path(
        args.kubeconfig_token or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or "~/.kube/config"
    )
    path = path.expanduser()
    try:
        text = path.read_text()
    except OSError as exc:
        raise OSError(f"--kubeconfig-token: {exc}") from exc
    return Credentials.parse("admin", text, str(path)).bearer_token()


def _admin_call(method: str, url: str, token: str | None = None, tries: int = 3) -> Any:
    """One admin API call; a 429 (too many config dumps) is tried again after its Retry-After."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for attempt in range(tries):
        request = urllib.request.Request(url, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code != 429 or attempt == tries - 1:
                raise
            time.sleep(min(5.0, float(exc.headers.get("Retry-After") or 1)))
    raise AssertionError("unreachable")


def _bootstrap(args: argparse.Namespace) -> int:
    xds = parse_xds_address(args.xds_address, "--xds-address")
    for flag in ("admin_port", "outbound_port", "inbound_port", "readiness_port"):
        if not 0 < getattr(args, flag) < 65536 and not (
            flag == "readiness_port" and args.readiness_port == 0
        ):
            raise SettingsError(f"--{flag.replace('_', '-')}: {getattr(args, flag)} is not a port number")
    opts = BootstrapOptions(
        role=Role(args.role),
        cluster=args.cluster,
        namespace=args.namespace,
        service=args.service,
        service_account=args.service_account,
        pod=args.pod_name,
        node_name=args.node_name,
        node_id=args.node_id,
        region=args.region,
        zone=args.zone,
        xds_host=xds[0] if isinstance(xds, tuple) else "",
        xds_port=xds[1] if isinstance(xds, tuple) else 0,
        xds_socket=xds if isinstance(xds, str) else "",
        admin_port=args.admin_port,
        delta=args.delta,
        listen_address=args.listen_address,
        app_address=args.app_address,
        outbound_port=args.outbound_port,
        readiness_port=args.readiness_port,
        inbound_port=args.inbound_port,
        capture=args.capture,
        outbound_traffic=args.outbound_traffic,
        xds_root_ca=str(args.xds_root_ca) if args.xds_root_ca else "",
        xds_server_name=args.xds_server_name,
        token_file=str(args.token_file) if args.token_file else "",
    )
    if opts.token_file and not opts.xds_root_ca:
        raise SettingsError("--token-file needs --xds-root-ca: a token is sent over TLS only")
    if opts.xds_root_ca and not (opts.xds_server_name or opts.xds_host):
        raise SettingsError("--xds-root-ca over a Unix socket needs --xds-server-name (the SAN to expect)")
    fmt = args.format or ("yaml" if args.output and args.output.suffix in (".yaml", ".yml") else "json")
    data = bootstrap_dict(opts)
    text = yaml.safe_dump(data, sort_keys=False) if fmt == "yaml" else json.dumps(data, indent=2) + "\n"
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


async def _serve(settings: ServeSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await ControlPlane(settings).run(stop)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if args.log_format == "json" else logging.Formatter(TEXT_LOG_FORMAT))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    try:
        if args.command == "drain":
            return _drain(args)
        if args.command in ("status", "clusters"):
            return _status(args)
        if args.command == "bootstrap":
            return _bootstrap(args)
        if args.command == "inject":
            return _inject(args)
        if args.command == "cluster":
            return _cluster(args)
        settings = ServeSettings(
            xds_address=args.xds_address,
            admin_address=args.admin_address,
            mesh=args.mesh,
            send_timeout=args.send_timeout,
            send_budget=args.send_budget_mib * 2**20,
            xds_workers=args.xds_workers,
            mtls=not args.no_mtls,
            trust_domain=args.trust_domain,
            ca_cert=args.ca_cert,
            ca_key=args.ca_key,
            ca_dir=args.ca_dir,
            cert_ttl=args.cert_ttl,
            insecure_keys_on_network=args.insecure_keys_on_network,
            xds_sans=tuple(args.xds_san),
            xds_token_file=args.xds_token_file,
            token_audience=args.token_audience,
            gateway_identities=tuple(parse_gateway_identity(g) for g in args.gateway_identity),
            admin_token_file=args.admin_token_file,
            admin_kube_auth=args.admin_kube_auth,
            insecure_unauthenticated_xds=args.insecure_unauthenticated_xds,
            insecure_plaintext_xds=args.insecure_plaintext_xds,
            gateway_grace=args.gateway_grace,
            drain_step=args.drain_step,
            clusters=tuple(parse_cluster(c) for c in args.cluster),
            kubeconfig_dir=args.kubeconfig_dir,
            cluster_gateways=tuple(parse_cluster_gateway(g) for g in args.cluster_gateway),
            cluster_secrets_namespace=args.cluster_secrets_namespace,
            home_kubeconfig=args.home_kubeconfig,
            ready_timeout=args.ready_timeout,
            export_policy=args.export_policy,
            require_namespace_label=args.require_namespace_label,
            max_staleness=args.max_staleness,
            withdraw_after=args.withdraw_after,
            debounce_quiet=args.debounce,
            debounce_max=args.debounce_max,
            clusterset_range=args.clusterset_range,
            service_imports=args.service_imports,
            route_status=args.route_status,
            config_namespace=args.config_namespace,
            webhook_address=args.webhook_address,
            webhook_sans=tuple(args.webhook_san),
            inject_xds_address=args.inject_xds_address,
            inject_xds_server_name=args.inject_xds_server_name,
            inject_proxy_image=args.inject_proxy_image,
            inject_capture_image=args.inject_capture_image,
            inject_outbound_traffic=args.inject_outbound_traffic,
        )
        asyncio.run(_serve(settings))
        return 0
    except (SettingsError, MeshFileError, CAError) as exc:
        print(f"isthmus: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"isthmus: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
