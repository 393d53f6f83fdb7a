"""isthmus: a multi-cluster Envoy xDS control plane.

One ADS server watches every member cluster, merges services and endpoints into
one endpoint graph (a MeshView) and pushes Envoy configuration generated from it.
"""

__version__ = "0.1.0"
