#!/usr/bin/env bash
# Builds the real Kubernetes binaries the test suite runs (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet, kube-proxy, kubectl) from the Go module proxy, and the test images' binary
# (hack/images/testapp.go), into a cache outside the repository keyed by version:  ${ISTHMUS_CACHE:-~/.cache/isthmus}/kube/<KUBE_VERSION>-etcd<ETCD_VERSION>/
# Does nothing when every binary is cached. Prints the bin directory on its last line.
#
#   hack/kube-binaries.sh            # all seven binaries (~13 min cold on 2 cores, then ~0 s)
#   hack/kube-binaries.sh control    # etcd, kube-apiserver, kube-controller-manager only (~5 min cold)
#   hack/kube-binaries.sh previous   # the five upgraded components of KUBE_PREVIOUS_VERSION (the upgrade
#                                    # test's starting point; no etcd: the upgrade keeps the same one)
#
# Why a script and not `go install`: k8s.io/kubernetes has `replace ./staging/...` directives, which
# `go install pkg@version` refuses. In a writable copy of the module we drop them and require the published
# k8s.io/X modules of the same minor version instead.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
what="${1:-all}"
control=(kube-apiserver kube-controller-manager)
node=(kube-scheduler kubelet kube-proxy kubectl)
case "$what" in
  control) cmds=("${control[@]}") ;;
  all) cmds=("${control[@]}" "${node[@]}") ;;
  previous) cmds=("${control[@]}" kube-scheduler kubelet kube-proxy); KUBE_VERSION="$KUBE_PREVIOUS_VERSION" ;;
  *) echo "usage: $0 [all|control|previous]" >&2; exit 2 ;;
esac
if [[ "$what" == previous ]]; then
  cache="${ISTHMUS_CACHE:-$HOME/.cache/isthmus}/kube/${KUBE_VERSION}"
else
  cache="${ISTHMUS_CACHE:-$HOME/.cache/isthmus}/kube/${KUBE_VERSION}-etcd${ETCD_VERSION}"
fi
bin="$cache/bin"

# The test images' one binary (hack/images/testapp.go, standard library only): rebuilt when its
# source is newer than the cached binary (about 2 s).
if [[ "$what" == all && ( ! -x "$bin/testapp" || "$here/images/testapp.go" -nt "$bin/testapp" ) ]]; then
  command -v go >/dev/null || { echo "kube-binaries: Go is needed to build testapp" >&2; exit 1; }
  mkdir -p "$bin"
  (cd "$here/images" && CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS= go build -trimpath -ldflags "-s -w" \
    -o "$bin/testapp.tmp" testapp.go && mv "$bin/testapp.tmp" "$bin/testapp")
fi

missing=()
[[ "$what" == previous || -x "$bin/etcd" ]] || missing+=(etcd)
for c in "${cmds[@]}"; do [[ -x "$bin/$c" ]] || missing+=("$c"); done
if [[ ${#missing[@]} -eq 0 ]]; then echo "$bin"; exit 0; fi

command -v go >/dev/null || { echo "kube-binaries: Go is needed to build ${missing[*]} (https://go.dev/dl)" >&2; exit 1; }
mkdir -p "$bin" "$cache/src"
export GOFLAGS="-mod=mod" CGO_ENABLED=0 GOTOOLCHAIN=local
start=$SECONDS

if [[ " ${missing[*]} " == *" etcd "* ]]; then
  echo "kube-binaries: building etcd $ETCD_VERSION" >&2
  src="$cache/src/etcd"
  rm -rf "$src" && mkdir -p "$src"
  cat >"$src/main.go" <<'GO'
// etcd for isthmus's tests: the upstream server's own main.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  (cd "$src" && go mod init isthmus.test/etcd >/dev/null 2>&1 \
    && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null 2>&1 \
    && go mod tidy >/dev/null 2>&1 \
    && go build -trimpath -ldflags "-s -w" -o "$bin/etcd.tmp" . && mv "$bin/etcd.tmp" "$bin/etcd")
fi

kube=()
for c in "${missing[@]}"; do [[ "$c" == etcd ]] || kube+=("$c"); done
if [[ ${#kube[@]} -gt 0 ]]; then
  echo "kube-binaries: building ${kube[*]} $KUBE_VERSION (the first build takes minutes)" >&2
  dir="$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
  src="$cache/src/kubernetes"
  if [[ ! -f "$src/.prepared" ]]; then
    rm -rf "$src" && mkdir -p "$src"
    cp -r "$dir/." "$src/" && chmod -R u+w "$src"
    rm -rf "$src/go.work" "$src/go.work.sum" "$src/vendor"
    staged=$(sed -n 's#^\t\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$src/go.mod")
    pub="v0.${KUBE_VERSION#v1.}"
    args=()
    for m in $staged; do args+=("-dropreplace=$m" "-require=$m@$pub"); done
    (cd "$src" && go mod edit "${args[@]}")
    # Modules the commands import but that the root module reaches only through the workspace.
    (cd "$src" && go mod download k8s.io/cri-api k8s.io/cri-client k8s.io/cri-streaming k8s.io/cli-runtime)
    touch "$src/.prepared"
  fi
  pkgs=()
  for c in "${kube[@]}"; do pkgs+=("./cmd/$c"); done
  (cd "$src" && go list -deps "${pkgs[@]}" >/dev/null)
  ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitTreeState=clean"
  ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=$KUBE_VERSION"
  (cd "$src" && go build -trimpath -ldflags "$ldflags" -o "$bin/.tmp/" "${pkgs[@]}")
  for c in "${kube[@]}"; do mv "$bin/.tmp/$c" "$bin/$c"; done
  rmdir "$bin/.tmp" 2>/dev/null || true
fi
echo "kube-binaries: built ${missing[*]} in $((SECONDS - start)) s" >&2
echo "$bin"
