"""Cross-cluster data-path tier: member clusters in Linux network namespaces, real Envoys, test agents.

* ``netns``: the network topology (namespaces, bridge, veths, addresses) and processes run inside it.
* ``agent``: a small aiohttp program run inside each cluster namespace (apps, requests, fetch, connect),
  controlled over a Unix socket.
* ``harness``: the pytest-side API: agent client, mesh file writer, control plane (xDS on a Unix socket,
  or over TLS with proxy tokens on the transit network), Envoys in namespaces.
* ``scenario``: building blocks of scenarios (pods, mesh entries, request streams).

(A package named ``datapath``, importable because pytest has ``pythonpath = ["tests"]``.)
"""
