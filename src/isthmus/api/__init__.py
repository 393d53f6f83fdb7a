"""isthmus's own configuration API (the MeshConfig and MemberCluster kinds of isthmus.io).

``v1alpha1/`` holds the Python classes protoc generates from ``api/protos/isthmus/api/v1alpha1``:
never edit them, change the .proto files and run ``make api`` (``generate.py``), which also
rewrites the CRDs in ``deploy/crds`` from the same descriptors (``crds.py``).
"""
