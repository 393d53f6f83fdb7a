#!/usr/bin/env bash
# Installs the Debian packages a real Kubernetes node of the tests needs (containerd, runc, the CNI
# plugins, iptables, nftables for the sidecar capture rules, curl for the
# client pods of the capture tests), and chromium for the web view's browser test, if they are missing. Needs root (the tests that run real nodes need it too).
# Does nothing when they are installed, or when not root (those tests then skip, and say why).
set -euo pipefail
need=()
command -v containerd >/dev/null || need+=(containerd)
command -v runc >/dev/null || need+=(runc)
[[ -x /usr/lib/cni/bridge ]] || need+=(containernetworking-plugins)
command -v iptables >/dev/null || need+=(iptables)
command -v nft >/dev/null || need+=(nftables)
command -v curl >/dev/null || need+=(curl)  # the HTTP client of tests/realkube/test_real_capture.py
command -v chromium >/dev/null || need+=(chromium)  # headless, for tests/envoy/test_web_view.py
[[ ${#need[@]} -eq 0 ]] && exit 0
if [[ $(id -u) -ne 0 ]]; then
  echo "node-packages: not root; real-node tests will skip (they need: ${need[*]})" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "node-packages: installed ${need[*]}" >&2
