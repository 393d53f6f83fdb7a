"""A Kubernetes API server written for the tests (aiohttp), one instance per simulated member cluster.

``server.FakeKubeApi`` serves the REST list/get/watch semantics that ``kubernetes_asyncio`` relies on;
``kubeconfig.write_kubeconfig`` writes a kubeconfig pointing at one instance.
"""
