#!/usr/bin/env bash
# Builds istiod (istio.io/istio/pilot/cmd/pilot-discovery at ISTIO_VERSION of hack/versions.env) from the Go
# module proxy for the istiod benchmark peer (bench/istiod.py, bench/peers/istiod/README.md), into a cache
# outside the repository keyed by version, beside the module's 15 Istio CRDs (taken from the module cache at
# build time, never committed):
#   ${ISTHMUS_CACHE:-~/.cache/isthmus}/istiod/<ISTIO_VERSION>/bin/pilot-discovery
#   ${ISTHMUS_CACHE:-~/.cache/isthmus}/istiod/<ISTIO_VERSION>/crd-all.gen.yaml
# Does nothing when both are cached. Prints the binary's path on its last line.
#
#   hack/istiod.sh      # 4-8 min cold on 2 cores (~2.3-2.7 GB peak), a 124 MiB binary (stripped); then ~0 s
#
# istio's module has no replace directives, so `go install pkg@version` works as it is.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
cache="${ISTHMUS_CACHE:-$HOME/.cache/isthmus}/istiod/${ISTIO_VERSION}"
bin="$cache/bin"
crds="$cache/crd-all.gen.yaml"
if [[ -x "$bin/pilot-discovery" && -s "$crds" ]]; then echo "$bin/pilot-discovery"; exit 0; fi

command -v go >/dev/null || { echo "istiod: Go is needed to build istiod $ISTIO_VERSION (https://go.dev/dl)" >&2; exit 1; }
export GOFLAGS= CGO_ENABLED=0 GOTOOLCHAIN=local
start=$SECONDS
if [[ ! -x "$bin/pilot-discovery" ]]; then
  mkdir -p "$bin/.tmp"
  echo "istiod: building pilot-discovery $ISTIO_VERSION (the first build takes minutes)" >&2
  ldflags="-s -w -X istio.io/istio/pkg/version.buildVersion=$ISTIO_VERSION -X istio.io/istio/pkg/version.buildStatus=Clean"
  GOBIN="$bin/.tmp" go install -trimpath -ldflags "$ldflags" "istio.io/istio/pilot/cmd/pilot-discovery@$ISTIO_VERSION"
  mv "$bin/.tmp/pilot-discovery" "$bin/pilot-discovery"
  rmdir "$bin/.tmp" 2>/dev/null || true
fi
if [[ ! -s "$crds" ]]; then
  # `go install` above put the module into the module cache; -json names its directory.
  dir="$(go mod download -json "istio.io/istio@$ISTIO_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
  [[ -n "$dir" && -s "$dir/manifests/charts/base/files/crd-all.gen.yaml" ]] \
    || { echo "istiod: no manifests/charts/base/files/crd-all.gen.yaml in istio.io/istio@$ISTIO_VERSION ($dir)" >&2; exit 1; }
  rm -f "$crds.tmp"
  cp "$dir/manifests/charts/base/files/crd-all.gen.yaml" "$crds.tmp" && chmod 644 "$crds.tmp" && mv "$crds.tmp" "$crds"
fi
echo "istiod: built pilot-discovery $ISTIO_VERSION in $((SECONDS - start)) s" >&2
echo "$bin/pilot-discovery"
