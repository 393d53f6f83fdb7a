"""Kubernetes discovery: the only package that talks to Kubernetes API servers (kubernetes_asyncio).

Kubernetes objects never leave it: watchers keep raw objects per member cluster and
convert.py turns them into model objects (discovery.model) and shards (discovery.aggregate).
"""
