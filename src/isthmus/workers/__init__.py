"""xDS serving spread over worker processes (``isthmus serve --xds-workers N``).

The main process keeps discovery, the admin API, drains and the configuration API, and serves
xDS itself; N-1 worker processes serve xDS on the same address (SO_REUSEPORT: the kernel hands each
new connection to one of them), each with its own cache fed every mesh view by the main process
(pool.py: only what changed since the view the worker holds). Workers report what the main
process needs of their streams (worker.py: which proxies lag, which gateways are connected).
"""
