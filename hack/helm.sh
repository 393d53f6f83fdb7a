#!/usr/bin/env bash
# Builds the helm binary the chart tests and operators use (helm.sh/helm/v3/cmd/helm at HELM_VERSION of
# hack/versions.env) from the Go module proxy, into a cache outside the repository keyed by version:
#   ${ISTHMUS_CACHE:-~/.cache/isthmus}/helm/<HELM_VERSION>/bin/helm
# Does nothing when it is cached. Prints the binary's path on its last line.
#
#   hack/helm.sh        # ~2-4 min cold on 2 cores, then ~0 s
#
# helm's module has no replace directives, so `go install pkg@version` works as it is; the version is stamped
# into the binary as helm's own Makefile does (`helm version` prints it).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
cache="${ISTHMUS_CACHE:-$HOME/.cache/isthmus}/helm/${HELM_VERSION}"
bin="$cache/bin"
if [[ -x "$bin/helm" ]]; then echo "$bin/helm"; exit 0; fi

command -v go >/dev/null || { echo "helm: Go is needed to build helm $HELM_VERSION (https://go.dev/dl)" >&2; exit 1; }
mkdir -p "$bin/.tmp"
start=$SECONDS
echo "helm: building helm $HELM_VERSION (the first build takes minutes)" >&2
ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
GOBIN="$bin/.tmp" GOFLAGS= CGO_ENABLED=0 GOTOOLCHAIN=local \
  go install -trimpath -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
mv "$bin/.tmp/helm" "$bin/helm"
rmdir "$bin/.tmp" 2>/dev/null || true
echo "helm: built helm $HELM_VERSION in $((SECONDS - start)) s" >&2
echo "$bin/helm"
